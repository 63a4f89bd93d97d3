"""The feature browser: the page's data and escaping, then the page as headless Chromium renders it."""

from __future__ import annotations

import copy
import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from neurolight.callbacks.interpret.feature_browser import write_feature_browser
from neurolight.callbacks.interpret.stores import ElasticsearchStore, SQLiteStore, sae_index_name, to_document
from neurolight.cli.browser import main
from neurolight.datamodules.interpret.samples import InterpretationSamples, save_interpretation_samples
from tests.helpers.noida import FaultProxy
from tests.helpers.store_documents import SECRET, page_data

# Debian's package; CHROMIUM points elsewhere (e.g. a Chrome binary on a CI image without Debian's chromium).
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
NASTY = "</script><b>&"
D_SAE, T, NUM_TOP = 16, 12, 2
SAMPLED = [1, 3, 4, 6, 9, 11, 13, 15]
# latent: (explanation, score, detection score); 11 and 15 are sampled but not interpreted.
DOCS = {
    1: ("numbers spelled out", 0.41, 0.70),
    3: ("Capital cities", 0.83, 0.95),
    4: ('<b>bold</b> & "quoted" text', 0.12, 0.55),
    6: ("closing tags", 0.67, float("nan")),
    9: ("Zebra-like stripes in text", -0.05, 0.50),
    13: ("weird latent", float("nan"), float("nan")),
}
AUROCS = {1: 0.80, 3: 0.98, 4: 0.60, 6: float("nan"), 9: 0.46, 13: float("nan")}
"""The detection AUROC of each latent of DOCS."""
ZEBRA_LATENT = 6  # only latent with the "zebra" token, in a collapsed quantile context
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: apt-get install chromium (or set CHROMIUM)"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_tokens([NASTY, "zebra"])
    return tokenizer


@pytest.fixture(scope="module")
def samples(tmp_path_factory, tokenizer):
    """Eight latents, each with 3 top (one empty slot for latent 15), 2 quantile and 2 random contexts; latent 1
    has the nasty token and a newline in its top context, latent 6 the only "zebra" context."""
    g = torch.Generator().manual_seed(0)
    nasty, zebra = tokenizer.convert_tokens_to_ids([NASTY, "zebra"])
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    num_contexts = 7 * len(SAMPLED)
    contexts = torch.randint(3, 290, (num_contexts, T), generator=g)
    contexts[0, 4], contexts[0, 5] = nasty, newline
    zebra_context = 7 * SAMPLED.index(ZEBRA_LATENT) + 3
    contexts[zebra_context, 6] = zebra
    tensors = {"contexts": contexts, "context_index": torch.arange(num_contexts) * 10 + 5}
    acts = torch.rand(len(SAMPLED), 7, T, generator=g) * 4 * (torch.rand(len(SAMPLED), 7, T, generator=g) > 0.5)
    slots = torch.arange(num_contexts).view(len(SAMPLED), 7)
    for kind, cols in (("top", [0, 1, 2]), ("quantile", [3, 4]), ("random", [5, 6])):
        tensors[f"{kind}_context"], tensors[f"{kind}_activations"] = slots[:, cols].clone(), acts[:, cols].clone()
    tensors["top_context"][-1, 2] = -1
    tensors["top_activations"][-1, 2] = 0
    tensors["negative_context"] = torch.full((len(SAMPLED), 1), -1)
    tensors["negative_activations"] = torch.zeros(len(SAMPLED), 1, T)
    tensors["latents"] = torch.tensor(SAMPLED)
    tensors["frequency"] = torch.logspace(-4, -1, D_SAE, dtype=torch.float64)[torch.randperm(D_SAE, generator=g)]
    tensors["max_activation"] = tensors["top_activations"].amax(dim=(1, 2))
    metadata = {"model_name": "tiny-llama", "layer_id": 1, "layer_type": "mlp_activations", "d_in": 128}
    metadata |= {"d_sae": D_SAE, "num_tokens": T, "frequency_tokens": 123456, "num_samples": 2000}
    path = save_interpretation_samples(tmp_path_factory.mktemp("samples"), tensors, metadata)
    return InterpretationSamples(path)


def documents(samples) -> list[dict]:
    """Store documents (NaN scores become None) of the interpretations in DOCS."""
    index = sae_index_name(samples.metadata)
    return [
        to_document(
            {"latent": latent, "explanation": explanation, "score": score, "detection_score": detection}
            | {"detection_auroc": AUROCS[latent]}
            | {"frequency": float(samples.frequency[latent]), "max_activation": 1.0, "top_tokens": [" the", "\n"]}
            | {"explainer": "tiny-explainer"},
            index,
            samples.metadata,
        )
        for latent, (explanation, score, detection) in DOCS.items()
    ]


@pytest.fixture(scope="module")
def page(tmp_path_factory, samples, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("browser") / "sae" / "browser.html"
    return write_feature_browser(samples, documents(samples), tokenizer, path, num_top=NUM_TOP, page_size=5)


def shown(token_id: int, tokenizer) -> str:
    """A token as the page should show it: control characters as their Unicode pictures (⏎ for a newline)."""
    pictures = {"\n": "⏎", "\t": "⇥", "\x7f": "␡"} | {chr(c): chr(0x2400 + c) for c in range(32) if c not in (9, 10)}
    return "".join(pictures.get(c, c) for c in tokenizer.decode([token_id])) or "∅"


def by_score(latents):
    """Default order: score descending, latents without a score last by index."""
    score = {latent: s for latent, (_, s, _) in DOCS.items() if s == s}
    return sorted(latents, key=lambda latent: (latent not in score, -score.get(latent, 0.0), latent))


def test_feature_browser__embeds_every_latent_and_escapes_token_text(page, samples, tokenizer):
    text = page.read_text(encoding="utf-8")
    assert NASTY not in text and "<b>bold" not in text
    assert text.count("</script>") == 2  # the data element and the script: nothing in the data closes one
    assert not re.search(r"\b(src|href)\s*=|@import|url\(", text), "the page must not load anything"
    data = page_data(page)
    assert [e["latent"] for e in data["latents"]] == SAMPLED
    for entry in data["latents"]:
        latent = entry["latent"]
        explanation, score, detection = DOCS.get(latent, (None, None, None))
        assert entry["explanation"] == explanation
        assert entry["score"] == (score if score == score else None)
        assert entry["detection_score"] == (detection if detection == detection else None)
        area = AUROCS.get(latent)
        assert entry["detection_auroc"] == (area if area == area else None)
        assert entry["frequency"] == pytest.approx(float(samples.frequency[latent]), rel=1e-5)
        for kind, limit in (("top", NUM_TOP), ("quantile", 2), ("random", 2)):
            records = samples.records(latent, kind)[:limit]
            assert [c["i"] for c in entry["contexts"][kind]] == [r.context_index for r in records]
            for context, record in zip(entry["contexts"][kind], records, strict=True):
                assert context["t"] == record.token_ids.tolist()
                assert context["a"] == pytest.approx(record.activations.tolist(), rel=1e-5, abs=1e-7)
    nasty_id = tokenizer.convert_tokens_to_ids(NASTY)
    assert data["vocab"][str(nasty_id)] == NASTY
    assert data["latents"][0]["top_tokens"] == [" the", "⏎"]
    header = re.search(r"<dl>(.*?)</dl>", text, re.S).group(1)
    assert "123,456" in header and "6 interpreted of 8 sampled" in header
    assert "mean score 0.396" in header  # (0.41 + 0.83 + 0.12 + 0.67 - 0.05) / 5
    assert "mean detection AUROC 0.710 (chance 0.5)" in header  # (0.80 + 0.98 + 0.60 + 0.46) / 4
    assert "detection_auroc: AUROC of P(Yes) for telling activating from non-activating contexts" in text
    sorts = re.findall(r'<option value="(\w+)">', text)
    assert sorts[:3] == ["score", "detection", "detection_auroc"]


def test_feature_browser__rejects_documents_of_another_layer(tmp_path, samples, tokenizer):
    docs = documents(samples)
    docs[2]["layer"] = 7
    with pytest.raises(ValueError, match=r"latent 4 has layer 7 but the samples .* have layer_id 1"):
        write_feature_browser(samples, docs, tokenizer, tmp_path / "x.html")


def test_neurolight_browser__writes_the_page_of_a_sqlite_store(tmp_path, samples, tokenizer, capsys):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    store = SQLiteStore(str(tmp_path / "latents.sqlite"))
    store.open(sae_index_name(samples.metadata), samples.metadata)
    store.upsert(documents(samples))
    store.close()
    args = ["--samples", str(samples.path), "--tokenizer", str(tmp_path / "tokenizer"), "--output"]
    main([*args, str(tmp_path / "page.html"), "--sqlite", str(tmp_path / "latents.sqlite")])
    assert "feature browser of 8 latents (6 interpreted)" in capsys.readouterr().out
    data = page_data(tmp_path / "page.html")
    assert {e["latent"]: e["explanation"] for e in data["latents"] if e["explanation"]} == {
        latent: explanation for latent, (explanation, _, _) in DOCS.items()
    }
    nasty_id = tokenizer.convert_tokens_to_ids(NASTY)
    assert data["vocab"][str(nasty_id)] == NASTY
    with pytest.raises(SystemExit, match=r"no SQLite store at .*missing\.sqlite; interpret the latents first"):
        main([*args, str(tmp_path / "other.html"), "--sqlite", str(tmp_path / "missing.sqlite")])


def test_neurolight_browser__reads_an_elasticsearch_index_with_the_columns_of_its_scorers(
    tmp_path, samples, tokenizer, es_address, monkeypatch, capsys
):
    """Scored by simulation and fuzzing (the detection values of DOCS as fuzzing scores); the key comes from the
    environment variable that --api-key-env names, as ElasticsearchStore reads it."""
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    index, metadata = sae_index_name(samples.metadata), {**samples.metadata, "scorers": ["simulation", "fuzzing"]}
    store = ElasticsearchStore(es_address, api_key_env=None)
    store.open(index, metadata)
    store.upsert(
        [
            to_document(
                doc | {"fuzzing_score": doc.pop("detection_score"), "fuzzing_auroc": doc.pop("detection_auroc")},
                index,
                metadata,
            )
            for doc in documents(samples)
        ]
    )
    store.close()
    monkeypatch.setenv("BROWSER_TEST_KEY", SECRET)
    args = ["--samples", str(samples.path), "--tokenizer", str(tmp_path / "tokenizer"), "--output"]
    with FaultProxy(es_address) as proxy:
        main([*args, str(tmp_path / "es.html"), "--elasticsearch", proxy.address, "--api-key-env", "BROWSER_TEST_KEY"])
        with pytest.raises(SystemExit) as missing:
            main([*args, str(tmp_path / "x.html"), "--elasticsearch", proxy.address, "--index", "no-such-index"])
    assert {headers.get("authorization") for _, _, headers in proxy.requests[:-1]} >= {f"ApiKey {SECRET}"}
    assert "scored by simulation, fuzzing" in capsys.readouterr().out
    assert str(missing.value.code).startswith(f"neurolight-browser: error: Elasticsearch at {proxy.address} has no")
    data = page_data(tmp_path / "es.html")
    assert data["columns"] == [{"field": "score", "key": "score"}, {"field": "fuzzing_score", "key": "fuzzing"},
                               {"field": "fuzzing_auroc", "key": "fuzzing_auroc"}]  # fmt: skip
    for entry in data["latents"]:
        _, score, fuzzing = DOCS.get(entry["latent"], (None, None, None))
        assert entry["score"] == (score if score == score else None) and "detection_score" not in entry
        assert entry["fuzzing_score"] == (fuzzing if fuzzing == fuzzing else None)
        area = AUROCS.get(entry["latent"])
        assert entry["fuzzing_auroc"] == (area if area == area else None) and "detection_auroc" not in entry
    sorts = re.findall(r'<option value="(\w+)">', (tmp_path / "es.html").read_text())
    assert sorts[:3] == ["score", "fuzzing", "fuzzing_auroc"] and "detection" not in sorts


class _Latents(HTMLParser):
    """The rendered latent cards: id, explanation, and every token's text, tooltip and background alpha."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict] = []
        self._field: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "article":
            self.cards.append({"latent": int(attrs["data-latent"]), "classes": classes, "contexts": []})
        elif tag == "p" and "expl" in classes:
            self.cards[-1]["explanation"], self._field = "", "explanation"
        elif tag == "div" and "ctx" in classes:
            self.cards[-1]["contexts"].append([])
        elif tag == "span" and "t" in classes:
            alpha = re.search(r"rgba\(255,122,40,([0-9.]+)\)", attrs.get("style") or "")
            token = {"text": "", "title": attrs["title"], "alpha": float(alpha.group(1)) if alpha else 0.0}
            self.cards[-1]["contexts"][-1].append(token)
            self._field = "token"

    def handle_endtag(self, tag):
        self._field = None

    def handle_data(self, data):
        if self._field == "explanation":
            self.cards[-1]["explanation"] += data
        elif self._field == "token":
            self.cards[-1]["contexts"][-1][-1]["text"] += data


def chromium(tmp_path: Path, url: str, *args: str) -> str:
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    command += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    command += [f"--user-data-dir={tmp_path / 'profile'}", *args, url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def rendered(tmp_path: Path, page: Path, fragment: str = "") -> tuple[list[dict], str]:
    dom = chromium(tmp_path, page.as_uri() + fragment, "--dump-dom")
    parser = _Latents()
    parser.feed(dom)
    return parser.cards, dom


@needs_chromium
def test_feature_browser__renders_first_page_by_score_with_tokens_shaded_by_activation(
    tmp_path, page, samples, tokenizer
):
    cards, dom = rendered(tmp_path, page)
    assert [card["latent"] for card in cards] == by_score(SAMPLED)[:5]
    assert "1 / 2" in dom and "8 of 8 latents" in dom
    assert "&lt;/script&gt;&lt;b&gt;&amp;" in dom  # the nasty token, as text
    for card in cards:
        latent = card["latent"]
        if latent in DOCS:
            assert card["explanation"] == DOCS[latent][0] and "uninterpreted" not in card["classes"]
        else:
            assert card["explanation"] == "not interpreted" and "uninterpreted" in card["classes"]
        records = samples.records(latent, "top")[:NUM_TOP] + samples.records(latent, "quantile")
        records += samples.records(latent, "random")
        assert len(card["contexts"]) == len(records)
        max_activation = float(samples.max_activation[SAMPLED.index(latent)])
        for tokens, record in zip(card["contexts"], records, strict=True):
            assert [t["text"] for t in tokens] == [shown(i, tokenizer) for i in record.token_ids.tolist()]
            activations = record.activations.tolist()
            assert [float(t["title"]) for t in tokens] == pytest.approx(activations, rel=1e-5, abs=1e-7)
            expected = [min(1.0, a / max_activation) for a in activations]
            assert [t["alpha"] for t in tokens] == pytest.approx(expected, abs=6e-4)
    uninterpreted = [latent for latent in SAMPLED if latent not in DOCS]
    cards_page2, _ = rendered(tmp_path, page, "#page=2")
    assert [card["latent"] for card in cards_page2] == by_score(SAMPLED)[5:]
    assert {c["latent"] for c in cards_page2 if c["explanation"] == "not interpreted"} == set(uninterpreted)


@needs_chromium
def test_feature_browser__marks_position_0_unmeasured_where_the_sampler_left_it_out(tmp_path, samples, tokenizer):
    excluded = InterpretationSamples(samples.path)
    excluded.metadata = samples.metadata | {"exclude_first_position": True}
    path = write_feature_browser(excluded, documents(samples), tokenizer, tmp_path / "b.html", num_top=NUM_TOP)
    cards, _ = rendered(tmp_path, path)
    assert cards
    for card in cards:
        for tokens in card["contexts"]:
            assert tokens[0]["title"].startswith("not measured") and tokens[0]["alpha"] == 0
            assert all(not t["title"].startswith("not measured") for t in tokens[1:])


@needs_chromium
def test_feature_browser__search_and_sort_from_the_url_hash(tmp_path, page, samples):
    cards, _ = rendered(tmp_path, page, "#q=ZeBrA")  # explanation of 9, a quantile context of 6
    assert [card["latent"] for card in cards] == [6, 9]
    cards, _ = rendered(tmp_path, page, "#q=" + "capital%20CITIES")
    assert [card["latent"] for card in cards] == [3]
    cards, dom = rendered(tmp_path, page, "#q=no-such-text")
    assert cards == [] and "no latent matches" in dom
    rarest = sorted(SAMPLED, key=lambda latent: float(samples.frequency[latent]))
    cards, _ = rendered(tmp_path, page, "#sort=rarity&page=2")
    assert [card["latent"] for card in cards] == rarest[5:]


@needs_chromium
def test_feature_browser__sorts_and_shows_the_columns_of_the_scorers_it_is_given(tmp_path, samples, tokenizer):
    """Fuzzing first (the default sort), then simulation; no detection column, and #sort=detection falls back."""
    docs = [
        doc | {"fuzzing_score": doc.pop("detection_score"), "fuzzing_auroc": doc.pop("detection_auroc")}
        for doc in documents(samples)
    ]
    path = tmp_path / "fuzzing.html"
    write_feature_browser(samples, docs, tokenizer, path, page_size=5, scorers=["fuzzing", "simulation"])
    fuzzing = {latent: d for latent, (_, _, d) in DOCS.items() if d == d}
    order = sorted(SAMPLED, key=lambda latent: (latent not in fuzzing, -fuzzing.get(latent, 0.0), latent))
    for fragment in ("", "#sort=detection"):
        cards, dom = rendered(tmp_path, path, fragment)
        assert [card["latent"] for card in cards] == order[:5]
    assert dom.count('data-stat="fuzzing"') == dom.count('data-stat="score"') == 5
    assert 'data-stat="detection"' not in dom
    cards, _ = rendered(tmp_path, path, "#sort=score")
    assert [card["latent"] for card in cards] == by_score(SAMPLED)[:5]


@needs_chromium
def test_feature_browser__typing_in_the_search_box_filters_and_updates_the_hash(tmp_path, page):
    typed = tmp_path / "typed.html"
    typing = (
        '<script>const box = document.getElementById("search"); box.value = "Capital";'
        'box.dispatchEvent(new Event("input")); document.body.dataset.hash = location.hash;</script></body>'
    )
    typed.write_text(page.read_text(encoding="utf-8").replace("</body>", typing), encoding="utf-8")
    cards, dom = rendered(tmp_path, typed)
    assert [card["latent"] for card in cards] == [3]
    assert 'data-hash="#q=Capital"' in dom and "1 of 8 latents" in dom


@needs_chromium
def test_feature_browser__screenshot_shows_shaded_contexts(tmp_path, page):
    from PIL import Image

    shot = tmp_path / "shot.png"
    chromium(tmp_path, page.as_uri(), f"--screenshot={shot}", "--window-size=1280,900", "--hide-scrollbars")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 900)
    colors = image.getcolors(maxcolors=1 << 20)
    assert len(colors) > 100, "a blank or nearly blank page"
    shaded = sum(n for n, (r, g, b) in colors if r > 240 and 120 < g < 235 and b < 200 and r - b > 60)
    assert shaded > 500, "no token shading visible in the first screen"
