"""The feature browser: one static, self-contained HTML page per SAE to read its interpreted latents.

    neurolight-browser --samples runs/demo/interpret/samples --sqlite runs/demo/interpret/interpretations.sqlite \\
        --output runs/demo/interpret/feature_browser.html

The page needs no server and no network (inline CSS and JS; it works from ``file://``). It lists every sampled
latent, sortable by score, detection score or frequency and filtered by a search box over explanations and context
text, 50 per page; each latent shows its explanation, scores, firing frequency, max activation and its top
contexts with every token shaded by ``activation / max activation`` (hover for the value); quantile and random
contexts sit in a collapsed section. The data is one JSON blob in a ``<script type="application/json">`` element
(every ``<`` escaped, so token text cannot end the element), rendered by a small script. The view is kept in the
URL hash (``#q=paris&sort=frequency&page=2``), so a search can be bookmarked or opened directly.
"""

from __future__ import annotations

import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path

from datamodules.interpretation_samples import InterpretationSamples

# Control characters would be invisible (a newline would even reflow the context): show their Unicode pictures.
_VISIBLE = str.maketrans({**{chr(c): chr(0x2400 + c) for c in range(32)}, "\n": "⏎", "\t": "⇥", "\x7f": "␡"})
_SIGNIFICANT_DIGITS = 6  # float32 holds ~7: the tooltips stay exact enough while the JSON stays small
_SORTS = {
    "score": "score ↓",
    "detection": "detection score ↓",
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
) -> Path:
    """Write the feature browser of one SAE and return its path.

    Args:
        samples: The interpretation samples of the SAE (contexts, activations, frequencies).
        documents: Stored interpretations (one dict per latent, as ``callbacks.latent_stores`` returns them);
            sampled latents without one are listed as "not interpreted".
        tokenizer: Hugging Face tokenizer of the sampled model, to show token ids as text.
        path: HTML file to write (its folder is created).
        title: Page title; default: model, layer and SAE sizes from the samples' metadata.
        num_top: Top contexts shown per latent.
        num_other: Quantile and random contexts (each) in the collapsed section of a latent.
        page_size: Latents per page.
    """
    if num_top < 1 or num_other < 0 or page_size < 1:
        raise ValueError(
            f"need num_top >= 1, num_other >= 0 and page_size >= 1; got {num_top}, {num_other} and {page_size}"
        )
    meta = samples.metadata
    docs = _documents_by_latent(documents, meta, samples.path)
    rows = {int(latent): row for row, latent in enumerate(samples.latents.tolist())}
    token_ids: set[int] = set()
    entries = [
        _entry(latent, samples, rows.get(latent), docs.get(latent), num_top, num_other, token_ids)
        for latent in sorted(set(rows) | set(docs))
    ]
    data = {"page_size": page_size, "vocab": _token_strings(tokenizer, sorted(token_ids)), "latents": entries}
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    title = title or _default_title(meta)
    page = (
        _PAGE.replace("@TITLE@", html.escape(title))
        .replace("@HEADER@", _header(meta, docs, len(rows)))
        .replace("@SORTS@", "".join(f'<option value="{key}">{label}</option>' for key, label in _SORTS.items()))
        .replace("@SCRIPT@", _SCRIPT)
        .replace("@DATA@", blob)  # last: the blob is the only part that may contain the other placeholders
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


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


def _entry(latent, samples, row, doc, num_top, num_other, token_ids: set[int]) -> dict:
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
        "score": None if doc is None else _finite(doc.get("score")),
        "detection_score": None if doc is None else _finite(doc.get("detection_score")),
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


def _header(meta: dict, docs: dict[int, dict], num_sampled: int) -> str:
    scores = [d["score"] for d in docs.values() if _finite(d.get("score")) is not None]
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
            f"{len(docs):,} interpreted of {num_sampled:,} sampled"
            + (f" · mean score {sum(scores) / len(scores):.3f}" if scores else ""),
        ),
        ("explainer", ", ".join(explainers) or None),
        ("written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("checkpoint", meta.get("sae_checkpoint")),
    ]
    return "".join(
        f"<div{' class=wide' if label == 'checkpoint' else ''}><dt>{html.escape(label)}</dt>"
        f"<dd>{html.escape(str(value))}</dd></div>"
        for label, value in rows
        if value is not None
    )


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
    from callbacks.latent_stores import LatentStoreError, SQLiteStore, sae_index_name
    from lightning_modules.llm import load_tokenizer

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


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@TITLE@</title>
<style>
:root { --ink: #1d2330; --muted: #667085; --line: #e3e6ec; --accent: #d9480f; --bg: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
  background: var(--bg); }
header { padding: 18px 28px 10px; background: #fff; border-bottom: 1px solid var(--line); }
h1 { margin: 0 0 10px; font-size: 20px; font-weight: 650; }
dl { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 2px 28px; margin: 0; }
dl div { display: flex; gap: 8px; min-width: 0; } dl .wide { grid-column: 1 / -1; }
dt { color: var(--muted); white-space: nowrap; } dt::after { content: ":"; }
dd { margin: 0; overflow-wrap: anywhere; }
.legend { margin: 8px 0 0; color: var(--muted); font-size: 12.5px; }
.controls { position: sticky; top: 0; z-index: 1; display: flex; flex-wrap: wrap; gap: 10px; align-items: center;
  padding: 10px 28px; background: rgba(246, 247, 249, .96); border-bottom: 1px solid var(--line); }
.controls input { flex: 1 1 320px; max-width: 520px; padding: 6px 10px; border: 1px solid #c9ced8;
  border-radius: 6px; font: inherit; }
.controls select, .controls button { padding: 5px 10px; border: 1px solid #c9ced8; border-radius: 6px;
  background: #fff; font: inherit; }
.controls button:disabled { opacity: .4; }
#count, #pageinfo { color: var(--muted); }
main { padding: 14px 28px 40px; }
.latent { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px;
  margin: 0 0 12px; }
.head { display: flex; flex-wrap: wrap; gap: 6px 14px; align-items: baseline; }
.id { font-weight: 700; font-size: 15px; }
.stat { color: var(--muted); font-size: 12.5px; } .stat b { color: var(--ink); font-weight: 600; }
.expl { margin: 4px 0 6px; font-size: 15px; }
.expl.missing { color: var(--muted); font-style: italic; }
.toptokens { color: var(--muted); font-size: 12.5px; margin: 0 0 6px; }
.toptokens code { color: var(--ink); background: #eef0f4; border-radius: 4px; padding: 0 5px; margin: 0 3px;
  white-space: pre; }
.ctx { font: 12.5px/1.7 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; white-space: pre-wrap;
  word-break: break-word; padding: 3px 0; border-top: 1px dashed var(--line); }
.lab { display: inline-block; min-width: 4.5em; margin-right: 8px; color: var(--muted); font-size: 11px; }
.t { border-radius: 2px; }
.t:hover { outline: 1px solid var(--accent); }
details { margin-top: 4px; } summary { cursor: pointer; color: var(--muted); font-size: 12.5px; }
.kind { color: var(--muted); font-size: 11.5px; margin: 4px 0 0; text-transform: uppercase; letter-spacing: .04em; }
.empty { color: var(--muted); font-style: italic; }
</style></head>
<body>
<header><h1>@TITLE@</h1><dl>@HEADER@</dl>
<p class="legend">score: Pearson correlation of simulated and true activations over every token of the held-out
contexts · detection: balanced accuracy of telling activating from non-activating contexts · token shading:
activation / the latent's max activation (hover a token for its value; ⏎ is a newline)</p></header>
<div class="controls">
<input id="search" type="search" placeholder="Search explanations and contexts" aria-label="search">
<select id="sort" aria-label="sort">@SORTS@</select>
<span id="count"></span>
<button id="prev" type="button" aria-label="previous page">‹</button><span id="pageinfo"></span>
<button id="next" type="button" aria-label="next page">›</button>
</div>
<main id="latents"><noscript>Listing the latents needs JavaScript.</noscript></main>
<script type="application/json" id="browser-data">@DATA@</script>
<script>@SCRIPT@</script>
</body></html>
"""

_SCRIPT = """
"use strict";
(() => {
  const data = JSON.parse(document.getElementById("browser-data").textContent);
  const vocab = data.vocab, latents = data.latents, pageSize = data.page_size;
  const $ = (id) => document.getElementById(id);
  const list = $("latents"), search = $("search"), sortSelect = $("sort");
  const SORTS = {
    score: [(e) => e.score, -1], detection: [(e) => e.detection_score, -1], frequency: [(e) => e.frequency, -1],
    rarity: [(e) => e.frequency, 1], max_activation: [(e) => e.max_activation, -1], latent: [(e) => e.latent, 1],
  };
  const text = (c) => c.t.map((id) => vocab[id]).join("");
  const haystack = latents.map((e) => ["#" + e.latent, e.explanation || "", e.top_tokens.join(" "),
    ...["top", "quantile", "random"].flatMap((k) => e.contexts[k].map(text))].join("\\n").toLowerCase());
  let state = readHash();

  function readHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    const sort = p.get("sort") in SORTS ? p.get("sort") : "score";
    return { q: p.get("q") || "", sort, page: Math.max(1, parseInt(p.get("page"), 10) || 1) };
  }
  function writeHash() {
    const p = new URLSearchParams();
    if (state.q) p.set("q", state.q);
    if (state.sort !== "score") p.set("sort", state.sort);
    if (state.page > 1) p.set("page", state.page);
    history.replaceState(null, "", "#" + p.toString());
  }
  function el(tag, cls, content) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (content !== undefined) node.textContent = content;
    return node;
  }
  const fixed = (x, digits) => (x === null ? "—" : x.toFixed(digits));
  function stat(parent, name, value) {
    const s = el("span", "stat", name + " ");
    s.dataset.stat = name;
    s.append(el("b", null, value));
    parent.append(s);
  }
  function context(e, c) {
    const row = el("div", "ctx");
    const peak = Math.max(0, ...c.a);
    const lab = el("span", "lab", peak.toFixed(2));
    lab.title = "context " + c.i + " of the corpus; peak activation " + peak;
    row.append(lab);
    c.t.forEach((id, j) => {
      const s = el("span", "t", vocab[id]);
      s.title = String(c.a[j]);
      const share = e.max_activation > 0 ? Math.max(0, c.a[j]) / e.max_activation : 0;
      const alpha = Math.min(1, Math.round(1000 * share) / 1000);
      if (alpha > 0) s.setAttribute("style", "background-color:rgba(255,122,40," + alpha + ")");
      row.append(s);
    });
    return row;
  }
  function card(e) {
    const art = el("article", e.explanation === null ? "latent uninterpreted" : "latent");
    art.dataset.latent = e.latent;
    const head = el("div", "head");
    head.append(el("span", "id", "#" + e.latent));
    stat(head, "score", fixed(e.score, 3));
    stat(head, "detection", fixed(e.detection_score, 3));
    stat(head, "frequency", e.frequency > 0
      ? e.frequency.toExponential(2) + " (log₁₀ " + Math.log10(e.frequency).toFixed(2) + ")" : "0");
    stat(head, "max activation", fixed(e.max_activation, 3));
    art.append(head);
    const expl = e.explanation === null ? el("p", "expl missing", "not interpreted") : el("p", "expl", e.explanation);
    if (e.explainer) expl.title = "explained by " + e.explainer;
    art.append(expl);
    if (e.top_tokens.length) {
      const tops = el("div", "toptokens", "top tokens");
      e.top_tokens.forEach((t) => tops.append(el("code", null, t)));
      art.append(tops);
    }
    e.contexts.top.forEach((c) => art.append(context(e, c)));
    const others = e.contexts.quantile.length + e.contexts.random.length;
    if (!e.contexts.top.length && !others) art.append(el("p", "empty", "no contexts sampled for this latent"));
    if (others) {
      const more = el("details");
      const counts = e.contexts.quantile.length + " quantile · " + e.contexts.random.length + " random contexts";
      more.append(el("summary", null, counts));
      for (const kind of ["quantile", "random"]) {
        if (!e.contexts[kind].length) continue;
        more.append(el("p", "kind", kind));
        e.contexts[kind].forEach((c) => more.append(context(e, c)));
      }
      art.append(more);
    }
    return art;
  }
  function render() {
    const needle = state.q.trim().toLowerCase();
    const [key, dir] = SORTS[state.sort];
    const order = latents.filter((e, i) => !needle || haystack[i].includes(needle));
    order.sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === y) return a.latent - b.latent;
      if (x === null || y === null) return x === null ? 1 : -1;
      return dir * (x < y ? -1 : 1);
    });
    const pages = Math.max(1, Math.ceil(order.length / pageSize));
    state.page = Math.min(state.page, pages);
    const shown = order.slice((state.page - 1) * pageSize, state.page * pageSize);
    const fragment = document.createDocumentFragment();
    shown.forEach((e) => fragment.append(card(e)));
    if (!shown.length) fragment.append(el("p", "empty", "no latent matches “" + state.q + "”"));
    list.replaceChildren(fragment);
    $("count").textContent = order.length + " of " + latents.length + " latents";
    $("pageinfo").textContent = "page " + state.page + " / " + pages;
    $("prev").disabled = state.page <= 1;
    $("next").disabled = state.page >= pages;
    search.value = state.q;
    sortSelect.value = state.sort;
  }
  function update(change) {
    Object.assign(state, change);
    writeHash();
    render();
  }
  search.addEventListener("input", () => update({ q: search.value, page: 1 }));
  sortSelect.addEventListener("change", () => update({ sort: sortSelect.value, page: 1 }));
  $("prev").addEventListener("click", () => { update({ page: state.page - 1 }); scrollTo(0, 0); });
  $("next").addEventListener("click", () => { update({ page: state.page + 1 }); scrollTo(0, 0); });
  window.addEventListener("hashchange", () => { state = readHash(); render(); });
  render();
})();
"""

if __name__ == "__main__":
    main()
