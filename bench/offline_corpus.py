"""A larger offline English corpus for the SAE benchmarks than pydoc's help topics (1,500 64-token contexts): the
long descriptions of the installed packages (their READMEs, in ``*.dist-info/METADATA``), the ``.md`` / ``.rst``
files of site-packages and the docstrings of the standard library, about 4.5 MB of text, tokenized with
SmolLM2's tokenizer into one shard of 64-token contexts, shuffled (seed 0) so that the last contexts, which the
benchmarks hold out, are a sample of every document (bench/README.md, "Real activations at 4096-token steps").

    .venv/bin/python bench/offline_corpus.py /tmp/realtext     # WORK/docs.txt and WORK/corpus (16384 contexts)
    .venv/bin/python bench/sae_sweep.py --corpus /tmp/realtext/corpus ...

Nothing is downloaded: the text is what this environment has installed, so the corpus differs a little between
environments (the counts are printed and kept in the corpus's metadata.json).
"""

import argparse
import ast
import glob
import random
import site
import sysconfig
from pathlib import Path

from neurolight.datamodules.sae.tokenized_corpus import build_tokenized_corpus

MIN_CHARS = 400  # a document shorter than this is mostly headers or a one-line summary


def one_paragraph(text: str) -> str:
    """The text with its whitespace collapsed: the tokenizer's .txt reader splits documents at blank lines."""
    return " ".join(text.split())


def package_readmes(packages: list[str]) -> list[str]:
    docs = []
    for metadata in sorted(f for root in packages for f in glob.glob(f"{root}/*.dist-info/METADATA")):
        text = Path(metadata).read_text(errors="ignore")
        docs.append(text.split("\n\n", 1)[1] if "\n\n" in text else "")  # the headers end at the first blank line
    return docs


def package_docs(packages: list[str]) -> list[str]:
    patterns = [f"{root}/**/*.{ext}" for root in packages for ext in ("md", "rst")]
    files = sorted(f for pattern in patterns for f in glob.glob(pattern, recursive=True))
    return [Path(f).read_text(errors="ignore") for f in files]


def stdlib_docstrings() -> list[str]:
    docs = []
    for file in sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/**/*.py", recursive=True)):
        if "/test" in file or "site-packages" in file:
            continue
        try:
            tree = ast.parse(Path(file).read_text(errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)))
        docs.append("\n\n".join(d for n in nodes if (d := ast.get_docstring(n)) and len(d) > 80))
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", help="directory for docs.txt and corpus/")
    parser.add_argument("--contexts", type=int, default=16384, help="64-token contexts to write")
    parser.add_argument("--tokenizer", default="smollm2-135m")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    packages = site.getsitepackages()
    sources = {"package READMEs": package_readmes(packages), "package .md/.rst files": package_docs(packages),
               "standard library docstrings": stdlib_docstrings()}  # fmt: skip
    documents = []
    for name, docs in sources.items():
        kept = [one_paragraph(d) for d in docs if len(one_paragraph(d)) >= MIN_CHARS]
        documents += kept
        print(f"{name}: {len(kept)} documents, {sum(map(len, kept)):,} characters")
    random.Random(0).shuffle(documents)  # a corpus cut short by --contexts still draws on every source
    text = work / "docs.txt"
    text.write_text("".join(d + "\n\n" for d in documents))
    corpus = build_tokenized_corpus(
        work / "corpus",
        tokenizer=args.tokenizer,
        data_files=str(text),
        min_tokens=64,
        context_length=64,
        num_files=1,  # one shard, shuffled whole: the held-out tail samples every document
        num_samples_per_file=args.contexts,
        overwrite=True,
    )
    print(f"corpus: {corpus}")


if __name__ == "__main__":
    main()
