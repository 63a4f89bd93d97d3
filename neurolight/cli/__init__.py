"""The command line: the top floor, the only package that imports every folder. Import-free, so that the
tokenizer's console script does not import Lightning."""
