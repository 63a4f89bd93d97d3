"""neurolight-tokenize --output_dir runs/demo/corpus --tokenizer smollm2-135m --dataset pydoc --context_length 64"""

from __future__ import annotations

from neurolight.datamodules.sae.tokenized_corpus import TokenizedCorpus, build_tokenized_corpus


def main(argv: list[str] | None = None) -> None:
    """Console script ``neurolight-tokenize``: every parameter of ``build_tokenized_corpus``, plus ``--config``."""
    import docstring_parser
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    parser = ArgumentParser(prog="neurolight-tokenize", description=build_tokenized_corpus.__doc__.split("\n")[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(build_tokenized_corpus, skip={"overwrite"})
    # A bool parameter would need `--overwrite true`; ActionYesNo also takes the bare flag the Makefile uses.
    docs = {p.arg_name: p.description for p in docstring_parser.parse(build_tokenized_corpus.__doc__).params}
    parser.add_argument("--overwrite", action=ActionYesNo, default=False, help=docs["overwrite"])
    config = parser.parse_args(argv).as_dict()
    config.pop("config", None)
    try:
        corpus = TokenizedCorpus(build_tokenized_corpus(**config))
    except (ValueError, OSError) as error:  # a bad setting or path: its message, without a traceback
        raise SystemExit(f"neurolight-tokenize: error: {error}") from error
    print(f"wrote {len(corpus)} contexts of {corpus.context_length} tokens to {corpus.path}")


if __name__ == "__main__":
    main()
