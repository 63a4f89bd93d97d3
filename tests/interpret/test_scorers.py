"""Scorers as an extension point: the registry, the fuzzing scores against hand counts of known Yes/No logits and
end to end on a planted latent whose explanation is exact (a perfect, an inverted and a constant judge), and the
store columns and browser sort keys that follow the scorers of a run."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import sqlite3
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score
from torch import nn

from neurolight.callbacks.interpret.stores import sae_index_name
from neurolight.cli.browser import main as browser_main
from neurolight.cli.main import main as cli_main
from neurolight.datamodules.interpret.samples import KINDS, InterpretationSamples, save_interpretation_samples
from neurolight.datamodules.interpret.tasks import (
    InterpretationDataModule,
    LatentTask,
    MarkedRecord,
    TokenRecord,
    fuzzing_marks,
    token_strings,
)
from neurolight.lightning_modules.interpret.interpreter import LatentInterpreter
from neurolight.lightning_modules.interpret.scorers import (
    SCORERS,
    DetectionScorer,
    FuzzingScorer,
    SimulationScorer,
    build_scorers,
)
from neurolight.lightning_modules.interpret.scorers.fuzzing import marked_text
from neurolight.lightning_modules.interpret.simulation import auroc, yes_probabilities
from tests.conftest import make_sentences
from tests.helpers.store_documents import page_data

T, ACTIVATING, SILENT = 16, 12, 4
LATENT, WORD = 3, " paris"  # a single token of the tiny tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_registry__builds_scorers_by_name_and_unknown_or_repeated_names_fail_with_the_valid_ones():
    assert [type(s) for s in build_scorers(["fuzzing", "simulation"])] == [SCORERS["fuzzing"], SCORERS["simulation"]]
    with pytest.raises(ValueError, match=r"scorer 'fuzz' is unknown; choose from simulation, detection, fuzzing"):
        build_scorers(["simulation", "fuzz"])
    with pytest.raises(ValueError, match="name detection more than once"):
        build_scorers(["detection", "simulation", "detection"])
    with pytest.raises(ValueError, match="scorer 'fuzz' is unknown"):
        LatentInterpreter(scorers=["fuzz"])
    fields = [field for scorer in SCORERS.values() for field in scorer.fields]
    assert len({f.name for f in fields}) == len({f.key for f in fields}) == len(fields)
    for name, scorer in SCORERS.items():
        scorer.check()
        assert scorer.name == name and set(scorer.records) <= set(LatentTask._fields)


def test_marked_text__wraps_each_run_of_marked_tokens_and_keeps_leading_space_outside():
    tokens = ["The", " cat", " sat", " on", " a", " <<mat>>", "\n", " cat", "."]
    marked = [False, True, True, False, False, False, True, True, False]
    assert marked_text(tokens, marked) == "The <<cat sat>> on a < <mat> >\n <<cat>>."


def test_fuzzing_marks__correct_above_three_tenths_of_the_peak_wrong_on_as_many_silent_visible_tokens():
    activations = torch.tensor([0.0, 0.5, 2.0, 0.0, 0.7, 0.0, 0.0, 0.0, 0.0])
    tokens = ["a", " b", " c", " ", " d", " e", "\n", " f", " g"]  # " " and "\n" are never marked wrongly
    record = TokenRecord("top", 0, tokens, activations)
    for seed in range(20):
        correct, wrong = fuzzing_marks(record, random.Random(seed))
        assert correct == [False, False, True, False, True, False, False, False, False]  # > 0.6
        assert sum(wrong) == 2 and {i for i, w in enumerate(wrong) if w} <= {0, 5, 7, 8}
    assert fuzzing_marks(record._replace(activations=torch.zeros(9)), random.Random(0)) is None
    assert fuzzing_marks(record._replace(activations=torch.ones(9)), random.Random(0)) is None


def test_auroc__equals_sklearn_and_a_brute_force_pairwise_count_with_ties():
    generator = torch.Generator().manual_seed(0)
    for n in (2, 5, 16, 40):
        # Probabilities on a coarse grid, so that ties within and across the classes are common.
        p_yes = torch.randint(0, 6, (n,), generator=generator).float() / 5
        labels = torch.arange(n) % 2 == 0
        labels = labels[torch.randperm(n, generator=generator)]
        positives, negatives = p_yes[labels].tolist(), p_yes[~labels].tolist()
        pairs = [(p > q) + 0.5 * (p == q) for p in positives for q in negatives]
        assert auroc(p_yes, labels) == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
        assert auroc(p_yes, labels) == pytest.approx(roc_auc_score(labels.numpy(), p_yes.numpy()), abs=1e-6)
    assert auroc(torch.tensor([0.9, 0.8, 0.1]), torch.tensor([True, True, False])) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.1]), torch.tensor([False, False, True])) == 0.0
    assert auroc(torch.full((4,), 0.3), torch.tensor([True, False, True, False])) == 0.5
    assert math.isnan(auroc(torch.rand(3), torch.ones(3, dtype=torch.bool)))
    assert math.isnan(auroc(torch.rand(3), torch.zeros(3, dtype=torch.bool)))


def test_fuzzing_marks__blank_tokens_are_marked_neither_correctly_nor_wrongly():
    """A blank token's mark would read as an empty ``<<>>``; were only correct marks ever empty, a judge could tell
    them from wrong ones by that alone."""
    tokens = ["a", " ", " b", "\n", " c", " d", "\n\n", " e"]
    activations = torch.tensor([0.0, 3.0, 2.0, 2.5, 0.0, 0.0, 0.0, 0.0])  # peak 3 on " ": marks above 0.9
    record = TokenRecord("top", 0, tokens, activations)
    for seed in range(20):
        correct, wrong = fuzzing_marks(record, random.Random(seed))
        assert correct == [False, False, True, False, False, False, False, False]  # " " and "\n" are blank
        assert sum(wrong) == 1 and {i for i, w in enumerate(wrong) if w} <= {0, 4, 5, 7}
        for marks in (correct, wrong):
            spans = re.findall(r"<<(.*?)>>", marked_text(tokens, marks), re.S)
            assert len(spans) == 1 and spans[0].strip()
    blank_only = record._replace(activations=torch.tensor([0.0, 3.0, 0.0, 2.5, 0.0, 0.0, 0.0, 0.0]))
    assert fuzzing_marks(blank_only, random.Random(0)) is None  # nothing visible to mark correctly


def test_fuzzing_score__is_the_balanced_accuracy_and_auroc_of_known_yes_no_logits(tiny_tokenizer):
    """Four correctly and four wrongly marked contexts whose Yes/No logits are set by hand; every other token gets
    a larger logit, which the renormalisation over Yes and No must ignore; a tie counts as No."""
    yes, no, vocab = 7, 9, 40
    correct = [(2.0, 1.0), (0.5, 3.0), (1.0, 1.0), (4.0, -1.0)]
    logits = [*correct, (0.0, 2.0), (3.0, 0.0), (-1.0, -1.0), (0.0, 5.0)]  # then the wrongly marked ones

    class KnownLogits(nn.Module):
        """The item's index is the prompt's last token; the head gives that item's (Yes, No) logits."""

        def __init__(self):
            super().__init__()
            self.anchor = nn.Parameter(torch.zeros(1))
            self.config = SimpleNamespace(final_logit_softcapping=None)

        def get_decoder(self):
            def decoder(input_ids, attention_mask=None, cache=None, use_cache=False):
                return SimpleNamespace(last_hidden_state=input_ids.float().unsqueeze(-1), cache=None)

            return decoder

        def get_output_embeddings(self):
            def head(hidden):
                out = torch.full((hidden.shape[0], vocab), 50.0)
                out[:, [yes, no]] = torch.tensor([logits[int(h) - 20] for h in hidden[:, 0]])
                return out

            return head

    prompts = [[1, 2, 20 + i] for i in range(len(logits))]
    p_yes, _ = yes_probabilities(KnownLogits(), prompts, yes, no, pad_id=0, batch_size=3)
    assert p_yes.tolist() == pytest.approx([1 / (1 + math.exp(n - y)) for y, n in logits], abs=1e-6)
    record = TokenRecord("top", 0, [" x"], torch.ones(1))
    task = SimpleNamespace(fuzzing=[MarkedRecord(record, [True], i < 4) for i in range(8)])
    # Says Yes to correct items 0 and 3 (2 of 4), No to wrong items 4, 6 and 7 (3 of 4). AUROC: of the 16
    # (correct, wrong) pairs, those where the correct item's Yes-minus-No margin (1, -2.5, 0, 5 against -2, 3, 0,
    # -5) is larger, a tie (0 against 0) counting 1/2: 3 + 1 + 2.5 + 4 = 10.5.
    assert FuzzingScorer().score(p_yes, task) == {
        "fuzzing_score": pytest.approx(0.5 * (2 / 4 + 3 / 4)),
        "fuzzing_auroc": pytest.approx(10.5 / 16),
    }


# ---- a planted latent: it fires on " paris" and nowhere else ---------------------------------------------------


@pytest.fixture(scope="module")
def planted_samples(tmp_path_factory, tiny_tokenizer, tiny_model_dir):
    """Latent 3 of an 8-latent SAE fires (3.0) exactly on the token " paris": 12 contexts with it planted at one or
    two positions (never position 0, which the sampler left out), 4 without it."""
    [word] = tiny_tokenizer(WORD, add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    contexts = []
    for i, sentence in enumerate(make_sentences(200, seed=1, min_words=20)):
        ids = [t for t in tiny_tokenizer(sentence, add_special_tokens=False)["input_ids"] if t != word][:T]
        if len(ids) < T:
            continue
        if len(contexts) < ACTIVATING:
            for position in rng.sample(range(1, T), 1 + i % 2):
                ids[position] = word
        contexts.append(ids)
        if len(contexts) == ACTIVATING + SILENT:
            break
    contexts = torch.tensor(contexts)
    activations = 3.0 * (contexts == word).float()
    slots = {"top": range(0, 6), "quantile": range(6, 12), "random": range(10, 14), "negative": range(12, 16)}
    tensors = {"latents": torch.tensor([LATENT]), "frequency": torch.full((8,), 0.01, dtype=torch.float64)}
    tensors |= {"contexts": contexts, "context_index": torch.arange(len(contexts)) * 7}
    tensors["max_activation"] = torch.tensor([3.0])
    for kind, rows in slots.items():
        tensors[f"{kind}_context"] = torch.tensor([list(rows)])
        tensors[f"{kind}_activations"] = activations[list(rows)].unsqueeze(0)
    metadata = {"model_name": str(tiny_model_dir), "layer_id": 1, "layer_type": "mlp_activations", "d_in": 64}
    metadata |= {"d_sae": 8, "exclude_first_position": True}
    return save_interpretation_samples(tmp_path_factory.mktemp("planted"), tensors, metadata)


def planted_datamodule(samples, num_fuzzing_samples: int = 4) -> InterpretationDataModule:
    return InterpretationDataModule(str(samples), num_interpretation_samples=2, num_simulation_samples=2,
                                    num_detection_samples=0, num_fuzzing_samples=num_fuzzing_samples)  # fmt: skip


def test_datamodule__fuzzing_pairs_each_held_out_context_with_correct_then_wrong_marks(planted_samples):
    dm = planted_datamodule(planted_samples)
    dm.setup("predict")
    task = dm.task(LATENT)
    assert [item.correct for item in task.fuzzing] == [True] * 4 + [False] * 4
    correct, wrong = task.fuzzing[:4], task.fuzzing[4:]
    assert [i.record.context_index for i in correct] == [i.record.context_index for i in wrong]
    assert not {i.record.context_index for i in task.fuzzing} & {r.context_index for r in task.explanation}
    for right, other in zip(correct, wrong):
        planted = [token == WORD for token in right.record.tokens]
        assert right.marked == planted and sum(other.marked) == sum(planted)
        assert not any(m and p for m, p in zip(other.marked, planted))
    again, none = planted_datamodule(planted_samples), planted_datamodule(planted_samples, num_fuzzing_samples=0)
    again.setup("predict")
    none.setup("predict")
    seeded = [(i.record.context_index, i.marked, i.correct) for i in again.task(LATENT).fuzzing]
    assert seeded == [(i.record.context_index, i.marked, i.correct) for i in task.fuzzing]
    assert none.task(LATENT).fuzzing == []


def test_datamodule__records_start_after_an_excluded_position_0_so_no_score_takes_it_for_silent(
    planted_samples, tmp_path, tiny_tokenizer
):
    """The planted samples were sampled without position 0 (its stored 0 was never measured): no record shows it,
    so it can be no wrong fuzzing mark, no part of a detection text and no point of the simulation correlation."""
    samples = InterpretationSamples(planted_samples)
    contexts = dict(zip(samples.tensors["context_index"].tolist(), samples.tensors["contexts"].tolist()))
    stored = {(r.kind, r.context_index): r.activations for k in KINDS for r in samples.records(LATENT, k)}

    def task(path):
        dm = InterpretationDataModule(str(path), num_interpretation_samples=2, num_simulation_samples=4,
                                      num_detection_samples=2, num_fuzzing_samples=4)  # fmt: skip
        dm.setup("predict")
        return dm.task(LATENT)

    measured = task(planted_samples)
    records = [*measured.explanation, *measured.simulation, *measured.detection]
    records += [item.record for item in measured.fuzzing]
    for record in records:
        ids = contexts[record.context_index]
        assert "".join(record.tokens) == tiny_tokenizer.decode(ids)[len(tiny_tokenizer.decode(ids[:1])) :]
        assert torch.equal(record.activations, stored[record.kind, record.context_index][1:])
    assert all(len(item.marked) == T - 1 for item in measured.fuzzing)  # a mark at index i is on position i + 1
    texts = DetectionScorer().texts(measured)
    assert texts == [tiny_tokenizer.decode(contexts[r.context_index])[len(tiny_tokenizer.decode(
        contexts[r.context_index][:1])) :] for r in measured.detection]  # fmt: skip
    simulated = [torch.arange(len(r.tokens), dtype=torch.float32) % 3 for r in measured.simulation]
    true = np.concatenate([stored[r.kind, r.context_index][1:].numpy() for r in measured.simulation])
    expected = np.corrcoef(true, np.concatenate([s.numpy() for s in simulated]))[0, 1]
    assert SimulationScorer().score(simulated, measured)["score"] == pytest.approx(expected, abs=1e-6)

    copy = tmp_path / "measured"
    shutil.copytree(planted_samples, copy)
    metadata = json.loads((copy / "metadata.json").read_text())
    (copy / "metadata.json").write_text(json.dumps(metadata | {"exclude_first_position": False}))
    whole = task(copy)  # position 0 measured: records keep it
    assert all(r.tokens == token_strings(tiny_tokenizer, contexts[r.context_index]) for r in whole.explanation)
    (copy / "metadata.json").write_text(
        json.dumps({k: v for k, v in metadata.items() if k != "exclude_first_position"})
    )
    with pytest.raises(ValueError, match=r"metadata.json does not say whether the sampler left position 0 out"):
        task(copy)


def test_interpreter__warns_once_when_the_data_module_prepares_no_records_for_a_scorer(planted_samples, tiny_model_dir):
    dm = planted_datamodule(planted_samples, num_fuzzing_samples=0)
    dm.setup("predict")
    module = LatentInterpreter(explainer_model=str(tiny_model_dir), scorers=["fuzzing"])
    module.configure_model()
    message = r"scorer 'fuzzing' found no fuzzing records for latent 3, so its score is NaN.*num_fuzzing_samples > 0"
    with pytest.warns(UserWarning, match=message):
        [result] = module.score(module.scorers[0], [dm.task(LATENT)], ["paris"])
    assert math.isnan(result["fuzzing_score"])


class PlantedJudge(nn.Module):
    """The tiny Llama as the explainer, with its Yes/No logits at the answer set by ``verdict(prompt text)``: +1
    says Yes, -1 No, 0 neither (equal logits). The decoder runs for real (shared prefix cached, right padding); the
    judge reads each prompt's whole text, prefix included, and passes its verdict to the head in an extra channel."""

    def __init__(self, llm, tokenizer, yes_id: int, no_id: int, verdict) -> None:
        super().__init__()
        self.llm, self.config, self.tokenizer = llm, llm.config, tokenizer
        self.yes_id, self.no_id, self.verdict, self.prefix = yes_id, no_id, verdict, []

    def get_decoder(self):
        decoder = self.llm.get_decoder()

        def run(input_ids, attention_mask=None, cache=None, use_cache=False):
            out = decoder(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=use_cache)
            if cache is None and use_cache:  # the prompt that every prompt of the latent shares
                self.prefix = input_ids[0].tolist()
                return out
            prefix = self.prefix if cache is not None else []
            mask = attention_mask[:, -input_ids.shape[1] :].bool()
            texts = [self.tokenizer.decode(prefix + ids[keep].tolist()) for ids, keep in zip(input_ids, mask)]
            flags = torch.tensor([float(self.verdict(text)) for text in texts])
            flags = flags[:, None, None].expand(*input_ids.shape, 1)
            return SimpleNamespace(last_hidden_state=torch.cat([out.last_hidden_state, flags], -1))

        return run

    def get_output_embeddings(self):
        head = self.llm.get_output_embeddings()

        def run(hidden):
            logits = head(hidden[:, :-1])
            logits[:, self.yes_id] = 5 * hidden[:, -1]
            logits[:, self.no_id] = -5 * hidden[:, -1]
            return logits

        return run


def marks_match_the_explanation(text: str) -> int:
    """A perfect judge: Yes when every marked span of the text is the explanation's word."""
    explanation = re.search(r"this neuron does is find (.+?)\.\n", text).group(1)
    spans = re.findall(r"<<(.*?)>>", text.split("Text: ")[-1])
    return 1 if spans and all(span.strip() == explanation for span in spans) else -1


@pytest.mark.parametrize(
    ("explanation", "verdict", "expected"),
    [
        ("paris", marks_match_the_explanation, 1.0),
        ("paris", lambda text: -marks_match_the_explanation(text), 0.0),
        ("paris", lambda text: 1, 0.5),  # always Yes
        ("paris", lambda text: 0, 0.5),  # P(Yes) = 1/2: always No
        ("london", marks_match_the_explanation, 0.5),  # the same judge, a wrong explanation: every answer No
    ],
    ids=["perfect", "inverted", "always-yes", "undecided", "wrong-explanation"],
)
def test_fuzzing__planted_latent_with_an_exact_explanation_end_to_end(
    planted_samples, tiny_model_dir, tmp_path, explanation, verdict, expected
):
    module = LatentInterpreter(explainer_model=str(tiny_model_dir), scorers=["fuzzing"], forward_batch_size=3)
    module.configure_model()
    module.model = PlantedJudge(module.model, module.tokenizer, module.yes_id, module.no_id, verdict)
    module.explain = lambda batch: [explanation] * len(batch)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    [[result]] = trainer.predict(module, datamodule=planted_datamodule(planted_samples))
    assert result["fuzzing_score"] == result["fuzzing_auroc"] == expected
    assert "score" not in result and "detection_score" not in result


def test_scorers__choose_the_store_columns_and_the_browser_sort_keys(planted_samples, tiny_model_dir, tmp_path):
    """A run with scorers [simulation, fuzzing] through the CLI: the SQLite table, the stored metadata, the
    documents and the browser have those scorers' fields and nothing of detection."""
    db, page = tmp_path / "latents.sqlite", tmp_path / "browser.html"
    store = {"class_path": "neurolight.callbacks.SQLiteStore", "init_args": {"path": str(db)}}
    config = {
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "neurolight.callbacks.InterpretationWriter",
                                   "init_args": {"store": store, "browser_path": str(page)}}]},
        "model": {"class_path": "neurolight.lightning_modules.LatentInterpreter",
                  "init_args": {"explainer_model": str(tiny_model_dir), "max_explanation_tokens": 3,
                                "scorers": ["simulation", "fuzzing"]}},
        "data": {"class_path": "neurolight.datamodules.InterpretationDataModule",
                 "init_args": {"samples_path": str(planted_samples), "num_simulation_samples": 2,
                               "num_fuzzing_samples": 2}},
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cli_main(["predict", "--config", str(tmp_path / "config.yaml")])

    index = sae_index_name(json.loads((planted_samples / "metadata.json").read_text()))
    with sqlite3.connect(db) as connection:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(latents)")]
        [metadata] = connection.execute("SELECT metadata FROM saes WHERE sae = ?", (index,)).fetchone()
        [fuzzing, area] = connection.execute("SELECT fuzzing_score, fuzzing_auroc FROM latents").fetchone()
    assert columns == ["sae", "model", "layer", "layer_type", "latent", "explanation", "score", "fuzzing_score",
                       "fuzzing_auroc", "frequency", "max_activation", "top_tokens", "explainer",
                       "updated_at"]  # fmt: skip
    assert json.loads(metadata)["scorers"] == ["simulation", "fuzzing"]
    assert 0 <= fuzzing <= 1 and 0 <= area <= 1
    for path in (page, tmp_path / "again.html"):
        if path != page:  # neurolight-browser reads the same store back
            browser_main(["--samples", str(planted_samples), "--sqlite", str(db), "--output", str(path)])
        data, html = page_data(path), path.read_text()
        assert data["columns"] == [{"field": "score", "key": "score"}, {"field": "fuzzing_score", "key": "fuzzing"},
                                   {"field": "fuzzing_auroc", "key": "fuzzing_auroc"}]  # fmt: skip
        [entry] = data["latents"]
        assert entry["fuzzing_score"] == pytest.approx(fuzzing) and "detection_score" not in entry
        assert re.findall(r'<option value="(\w+)">', html) == ["score", "fuzzing", "fuzzing_auroc", "frequency",
                                                               "rarity", "max_activation", "latent"]  # fmt: skip
        assert "fuzzing: balanced accuracy of telling correctly from wrongly marked tokens" in html
