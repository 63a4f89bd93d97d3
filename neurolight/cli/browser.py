"""neurolight-browser --samples runs/demo/interpret/samples --sqlite runs/demo/interpret/interpretations.sqlite \
    --output runs/demo/interpret/browser.html
"""

from __future__ import annotations

from pathlib import Path

from neurolight.callbacks.interpret.feature_browser import write_feature_browser
from neurolight.callbacks.interpret.stores import LatentStoreError, SQLiteStore, sae_index_name
from neurolight.datamodules.interpret.samples import InterpretationSamples
from neurolight.datamodules.llm.models import load_tokenizer


def main(argv: list[str] | None = None) -> None:
    """Console script ``neurolight-browser``: the feature browser of a samples directory and a SQLite store."""
    import argparse
    import sqlite3

    parser = argparse.ArgumentParser(prog="neurolight-browser", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("--samples", required=True, help="Interpretation-samples directory of the SAE.")
    parser.add_argument("--sqlite", required=True, help="SQLite store the InterpretationWriter wrote.")
    parser.add_argument("--output", required=True, help="HTML file to write.")
    parser.add_argument("--tokenizer", help="Short model name, HF id or directory; default: the samples' model.")
    parser.add_argument("--title", help="Page title; default: model, layer and SAE sizes.")
    args = parser.parse_args(argv)
    try:
        samples = InterpretationSamples(args.samples)
        if not Path(args.sqlite).is_file():
            raise FileNotFoundError(f"no SQLite store at {args.sqlite}; interpret the latents first")
        store = SQLiteStore(args.sqlite)
        try:
            store.open(sae_index_name(samples.metadata), samples.metadata)
            documents = store.documents()
        finally:
            store.close()
        tokenizer = load_tokenizer(args.tokenizer or samples.metadata["model_name"])
        path = write_feature_browser(samples, documents, tokenizer, args.output, title=args.title)
    # A bad path, setting or store file: its message, without a traceback.
    except (ValueError, OSError, KeyError, LatentStoreError, sqlite3.Error) as error:
        raise SystemExit(f"neurolight-browser: error: {error}") from error
    print(f"wrote the feature browser of {len(samples)} latents ({len(documents)} interpreted) to {path}")


if __name__ == "__main__":
    main()
