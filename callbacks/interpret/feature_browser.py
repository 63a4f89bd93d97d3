"""The feature browser: one static, self-contained HTML page per SAE to read its interpreted latents.

    neurolight-browser --samples runs/demo/interpret/samples --sqlite runs/demo/interpret/interpretations.sqlite \\
        --output runs/demo/interpret/feature_browser.html
    neurolight-browser --samples ... --elasticsearch https://es.example.org:9200 --output ...   # key: $ES_API_KEY

The page needs no server and no network (inline CSS and JS; it works from ``file://``). It lists every sampled
latent, sortable by each score (a column per scorer of the store: ``score``, ``detection``, ``fuzzing``, ...),
frequency or max activation and filtered by a search box over explanations and context text, 50 per page; each
latent shows its explanation, scores, firing frequency, max activation and its top contexts with every token
shaded by ``activation / max activation`` (hover for the value); quantile and random contexts sit in a collapsed
section. The data is one JSON blob in a ``<script type="application/json">`` element
(every ``<`` escaped, so token text cannot end the element), rendered by a small script. The view is kept in the
URL hash (``#q=paris&sort=frequency&page=2``), so a search can be bookmarked or opened directly.

The page's markup, style and script are ``feature_browser_template.html`` in this package; this module prepares
the data (with the score columns: document field and sort key) and fills the template's ``@TITLE@``, ``@HEADER@``,
``@LEGEND@``, ``@SORTS@`` and ``@DATA@`` placeholders.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from neurolight.callbacks.interpret.stores.base import LEGACY_SCORERS
from neurolight.datamodules.files import atomic_path
from neurolight.datamodules.interpret.samples import InterpretationSamples
from neurolight.lightning_modules.interpret.scorers import ScoreField, score_fields

# Control characters would be invisible (a newline would even reflow the context): show their Unicode pictures.
_VISIBLE = str.maketrans({**{chr(c): chr(0x2400 + c) for c in range(32)}, "\n": "⏎", "\t": "⇥", "\x7f": "␡"})
_SIGNIFICANT_DIGITS = 6  # float32 holds ~7: the tooltips stay exact enough while the JSON stays small
_TEMPLATE = "feature_browser_template.html"
_PLACEHOLDER = re.compile(r"@(TITLE|HEADER|LEGEND|SORTS|DATA)@")
_SORTS = {  # after a sort per score column
    "frequency": "frequency ↓ (densest first)",
    "rarity": "frequency ↑ (rarest first)",
    "max_activation": "max activation ↓",
    "latent": "latent index",
}


def write_feature_browser(
    samples: InterpretationSamples,
    documents: list[dict],
    tokenizer,
    path: str | Path,
    title: str | None = None,
    num_top: int = 5,
    num_other: int = 2,
    page_size: int = 50,
    scorers: Sequence[str] = LEGACY_SCORERS,
) -> Path:
    """Write the feature browser of one SAE and return its path.

    Args:
        samples: The interpretation samples of the SAE (contexts, activations, frequencies).
        documents: Stored interpretations (one dict per latent, as a ``LatentStore`` returns them); sampled latents
            without one are listed as "not interpreted".
        tokenizer: Hugging Face tokenizer of the sampled model, to show token ids as text.
        path: HTML file to write (its folder is created).
        title: Page title; default: model, layer and SAE sizes from the samples' metadata.
        num_top: Top contexts shown per latent.
        num_other: Quantile and random contexts (each) in the collapsed section of a latent.
        page_size: Latents per page.
        scorers: The scorers whose fields are the page's score columns and sort keys, in order (the first is the
            default sort): a store's ``scorers``.
    """
    if num_top < 1 or num_other < 0 or page_size < 1:
        raise ValueError(
            f"need num_top >= 1, num_other >= 0 and page_size >= 1; got {num_top}, {num_other} and {page_size}"
        )
    meta = samples.metadata
    columns = score_fields(scorers)
    clash = [c.key for c in columns if c.key in _SORTS]
    if clash:
        raise ValueError(f"score keys {clash} are taken by the browser's own sorts ({', '.join(_SORTS)})")
    docs = _documents_by_latent(documents, meta, samples.path)
    rows = {int(latent): row for row, latent in enumerate(samples.latents.tolist())}
    token_ids: set[int] = set()
    entries = [
        _entry(latent, samples, rows.get(latent), docs.get(latent), columns, num_top, num_other, token_ids)
        for latent in sorted(set(rows) | set(docs))
    ]
    data = {
        "page_size": page_size,
        # Where the sampler left position 0 out, its stored 0 was never measured: shown unshaded and marked so.
        "first_measured": 1 if meta.get("exclude_first_position") else 0,
        "columns": [{"field": c.name, "key": c.key} for c in columns],
        "vocab": _token_strings(tokenizer, sorted(token_ids)),
        "latents": entries,
    }
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    sorts = {c.key: f"{c.title} ↓" for c in columns} | _SORTS
    fields = {
        "TITLE": html.escape(title or _default_title(meta)),
        "HEADER": _header(meta, docs, len(rows), columns),
        "LEGEND": "".join(f"{html.escape(c.key)}: {html.escape(c.legend)} · " for c in columns),
        "SORTS": "".join(f'<option value="{key}">{html.escape(label)}</option>' for key, label in sorts.items()),
        "DATA": blob,
    }
    # One pass over the template: a title, header or token text that happens to spell a placeholder stays as is.
    page = _PLACEHOLDER.sub(lambda match: fields[match[1]], _template())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, "feature browser page") as temporary:
        temporary.write_text(page, encoding="utf-8")
    return path


def _template() -> str:
    return resources.files(__package__).joinpath(_TEMPLATE).read_text(encoding="utf-8")


def _documents_by_latent(documents: list[dict], meta: dict, source: Path) -> dict[int, dict]:
    by_latent: dict[int, dict] = {}
    for doc in documents:
        latent = int(doc["latent"])
        for key, meta_key in (("layer", "layer_id"), ("layer_type", "layer_type")):
            if key in doc and meta_key in meta and doc[key] != meta[meta_key]:
                raise ValueError(
                    f"the document of latent {latent} has {key} {doc[key]!r} but the samples in {source} have "
                    f"{meta_key} {meta[meta_key]!r}; pass the documents of this SAE's index"
                )
        if latent in by_latent:
            raise ValueError(f"two documents for latent {latent}; a store holds one per latent")
        by_latent[latent] = doc
    return by_latent


def _entry(latent, samples, row, doc, columns: list[ScoreField], num_top, num_other, token_ids: set[int]) -> dict:
    contexts = {}
    for kind, limit in (("top", num_top), ("quantile", num_other), ("random", num_other)):
        records = samples.records(latent, kind)[:limit] if row is not None else []
        contexts[kind] = [
            {"i": r.context_index, "t": r.token_ids.tolist(), "a": [_number(a) for a in r.activations.tolist()]}
            for r in records
        ]
        token_ids.update(t for context in contexts[kind] for t in context["t"])
    if row is not None:
        frequency, max_activation = float(samples.frequency[latent]), float(samples.max_activation[row])
    else:  # interpreted from an earlier sampling run: the document carries what the samples would
        frequency, max_activation = float(doc["frequency"]), float(doc["max_activation"])
    return {
        "latent": latent,
        "explanation": None if doc is None else str(doc["explanation"]),
        **{c.name: None if doc is None else _finite(doc.get(c.name)) for c in columns},
        "frequency": _number(frequency),
        "max_activation": _number(max_activation),
        "top_tokens": [] if doc is None else [_visible(t) for t in doc.get("top_tokens") or []],
        "explainer": None if doc is None else doc.get("explainer"),
        "contexts": contexts,
    }


def _token_strings(tokenizer, ids: list[int]) -> dict[str, str]:
    """Display text of each token id, decoded alone (special tokens kept, whitespace made visible)."""
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    strings = {}
    for i, text, piece in zip(ids, texts, pieces, strict=True):
        # SentencePiece drops a token's word-start marker when it is decoded alone; readers need word boundaries.
        if isinstance(piece, str) and piece.startswith("▁") and not text.startswith(" "):
            text = " " + text
        strings[str(i)] = _visible(text)
    return strings


def _visible(text: str) -> str:
    return text.translate(_VISIBLE) if text else "∅"


def _number(value: float) -> float | int:
    return 0 if value == 0 else float(f"{value:.{_SIGNIFICANT_DIGITS}g}")


def _finite(value) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else _number(float(value))


def _default_title(meta: dict) -> str:
    model = str(meta.get("model_name", "model")).rstrip("/").split("/")[-1]
    return (
        f"{model} · layer {meta.get('layer_id', '?')} {meta.get('layer_type', '')} · "
        f"{meta.get('d_in', '?')} → {meta.get('d_sae', '?')} SAE latents"
    )


def _source(meta: dict) -> str | None:
    """The SAE's source format, and its hook name where a foreign library named the site its own way."""
    fmt, hook = meta.get("sae_source_format"), meta.get("sae_hook_name")
    if fmt is None:
        return None
    return f"{fmt} (hook {hook})" if hook and not str(fmt).startswith("neurolight") else fmt


def _header(meta: dict, docs: dict[int, dict], num_sampled: int, columns: list[ScoreField]) -> str:
    means = ""
    for column in columns:
        scores = [d[column.name] for d in docs.values() if _finite(d.get(column.name)) is not None]
        chance = "" if column.chance is None else f" (chance {column.chance:g})"
        means += f" · mean {column.title} {sum(scores) / len(scores):.3f}{chance}" if scores else ""
    explainers = sorted({str(d["explainer"]) for d in docs.values() if d.get("explainer")})
    band = ""
    if "log_freq_lower" in meta and "log_freq_upper" in meta:
        band = f"{meta['log_freq_lower']} < log₁₀ f < {meta['log_freq_upper']}"
        if "below_band" in meta and "above_band" in meta:
            band += f" ({meta['below_band']:,} latents below, {meta['above_band']:,} above)"
    rows = [
        ("model", meta.get("model_name")),
        ("layer", f"{meta['layer_id']} ({meta.get('layer_type', '?')})" if "layer_id" in meta else None),
        ("SAE", f"{meta['d_in']} → {meta['d_sae']} {meta.get('architecture', '')}" if "d_in" in meta else None),
        ("learning rate", meta.get("learning_rate")),
        ("l1 coefficient", meta.get("l1_coefficient")),
        ("tokens scanned", f"{meta['frequency_tokens']:,} (frequency pass)" if "frequency_tokens" in meta else None),
        (
            "contexts sampled",
            f"{meta['num_samples']:,} × {meta.get('num_tokens', '?')} tokens" if "num_samples" in meta else None,
        ),
        ("frequency band", band or None),
        (
            "latents",
            f"{len(docs):,} interpreted of {num_sampled:,} sampled{means}",
        ),
        ("explainer", ", ".join(explainers) or None),
        ("written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("format", _source(meta)),
        ("checkpoint", meta.get("sae_checkpoint")),
    ]
    return "".join(
        f"<div{' class=wide' if label == 'checkpoint' else ''}><dt>{html.escape(label)}</dt>"
        f"<dd>{html.escape(str(value))}</dd></div>"
        for label, value in rows
        if value is not None
    )
