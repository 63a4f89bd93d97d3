"""neurolight-browser --samples runs/demo/interpret/samples --sqlite runs/demo/interpret/interpretations.sqlite \
    --output runs/demo/interpret/browser.html
ES_API_KEY=... neurolight-browser --samples DIR --elasticsearch https://es.example.org:9200 --output browser.html
"""

from __future__ import annotations

from neurolight.callbacks.interpret.feature_browser import write_feature_browser
from neurolight.callbacks.interpret.stores import ElasticsearchStore, LatentStoreError, SQLiteStore, sae_index_name
from neurolight.datamodules.interpret.samples import InterpretationSamples
from neurolight.datamodules.llm.models import load_tokenizer


def main(argv: list[str] | None = None) -> None:
    """Console script ``neurolight-browser``: the feature browser of a samples directory and a store (SQLite or
    Elasticsearch), with a column per scorer that wrote to it."""
    import argparse
    import sqlite3

    parser = argparse.ArgumentParser(prog="neurolight-browser", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("--samples", required=True, help="Interpretation-samples directory of the SAE.")
    store_group = parser.add_mutually_exclusive_group(required=True)
    store_group.add_argument("--sqlite", help="SQLite store the InterpretationWriter wrote.")
    store_group.add_argument(
        "--elasticsearch", metavar="URL", help="Elasticsearch server the InterpretationWriter wrote to, with scheme."
    )
    parser.add_argument("--output", required=True, help="HTML file to write.")
    parser.add_argument(
        "--index", help="Index (SQLite sae) of the SAE; default: named from the samples' metadata, as the writer does."
    )
    es = parser.add_argument_group("Elasticsearch (as ElasticsearchStore takes them)")
    es.add_argument(
        "--api-key-env",
        default="ES_API_KEY",
        help="Environment variable holding the API key (default ES_API_KEY; unset or empty: no key).",
    )
    es.add_argument("--ssl-cert", help="CA certificate file (PEM) of the server; default: the public CAs.")
    es.add_argument(
        "--no-verify-certs", action="store_true", help="Do not verify the server's certificate (throw-away servers)."
    )
    parser.add_argument("--tokenizer", help="Short model name, HF id or directory; default: the samples' model.")
    parser.add_argument("--title", help="Page title; default: model, layer and SAE sizes.")
    args = parser.parse_args(argv)
    try:
        samples = InterpretationSamples(args.samples)
        if args.sqlite:
            store = SQLiteStore(args.sqlite)
        else:
            store = ElasticsearchStore(
                args.elasticsearch,
                api_key_env=args.api_key_env or None,
                ssl_cert=args.ssl_cert,
                verify_certs=not args.no_verify_certs,
            )
        try:
            store.open(args.index or sae_index_name(samples.metadata), samples.metadata, create=False)
            documents, scorers = store.documents(), store.scorers
        finally:
            store.close()
        tokenizer = load_tokenizer(args.tokenizer or samples.metadata["model_name"])
        path = write_feature_browser(samples, documents, tokenizer, args.output, title=args.title, scorers=scorers)
    # A bad path, setting or store: its message, without a traceback.
    except (ValueError, OSError, KeyError, LatentStoreError, sqlite3.Error) as error:
        raise SystemExit(f"neurolight-browser: error: {error}") from error
    print(
        f"wrote the feature browser of {len(samples)} latents ({len(documents)} interpreted), scored by "
        f"{', '.join(scorers) or 'no scorer'}, to {path}"
    )


if __name__ == "__main__":
    main()
