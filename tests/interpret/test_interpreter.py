"""Explain, simulate, score: the 0-10 scale, the logit simulator against hand-computed expectations, position
alignment, Pearson and balanced accuracy against hand counts, the data module's split and sharding, and an
end-to-end ``Trainer.predict`` with a tiny Llama explainer."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch import nn

from neurolight.cli.main import main as cli_main
from neurolight.datamodules.interpret.samples import save_interpretation_samples
from neurolight.datamodules.interpret.tasks import InterpretationDataModule, token_strings
from neurolight.datamodules.llm.models import native_bfloat16
from neurolight.lightning_modules.interpret.interpreter import LatentInterpreter
from neurolight.lightning_modules.interpret.prompts import (
    PromptBuilder,
    answer_token,
    escape_token,
    single_token_values,
)
from neurolight.lightning_modules.interpret.scorers import DetectionScorer, SimulationScorer
from neurolight.lightning_modules.interpret.scorers.base import VALUES, yes_no_prompt
from neurolight.lightning_modules.interpret.simulation import (
    balanced_accuracy,
    discretize,
    parse_simulation,
    pearson,
    simulate_logits,
    yes_probabilities,
)

T, SLOTS = 12, {"top": 6, "quantile": 4, "random": 4, "negative": 3}
LATENTS = [1, 4, 6]
KEYS = {"latent", "explanation", "score", "detection_score", "detection_auroc", "frequency", "max_activation",
        "top_tokens", "explainer", "num_simulated_tokens"}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def samples_dir(tmp_path_factory, tiny_model_dir):
    """Three latents of an 8-latent SAE; random and quantile records reuse some top contexts on purpose."""
    gen = torch.Generator().manual_seed(0)
    contexts = torch.randint(3, 300, (40, T), generator=gen)
    tensors = {
        "latents": torch.tensor(LATENTS),
        "frequency": torch.linspace(0.01, 0.08, 8, dtype=torch.float64),
        "contexts": contexts,
        "context_index": torch.arange(40) * 10,
    }
    max_activation = []
    for kind, n in SLOTS.items():
        rows = torch.stack([torch.randperm(40, generator=gen)[:n] for _ in LATENTS])
        acts = torch.rand(len(LATENTS), n, T, generator=gen) * (kind != "negative")
        acts[acts < 0.5] = 0
        if kind == "random":
            rows[:, 0] = tensors.get("top_context", rows)[:, 0]  # a top context drawn again at random
        tensors[f"{kind}_context"], tensors[f"{kind}_activations"] = rows, acts * 4
        max_activation.append(acts.amax((1, 2)) * 4)
    tensors["max_activation"] = torch.stack(max_activation).amax(0)
    metadata = {"model_name": str(tiny_model_dir), "layer_id": 1, "layer_type": "mlp_activations", "d_sae": 8}
    metadata["exclude_first_position"] = False  # the random activations at position 0 count as measured
    return save_interpretation_samples(tmp_path_factory.mktemp("samples"), tensors, metadata)


def test_discretize__floor_of_ten_relu_over_max():
    a = torch.tensor([-1.0, 0.0, 0.29, 0.3, 1.5, 2.999, 3.0])
    assert discretize(a, 3.0).tolist() == [0, 0, 0, 1, 5, 9, 10]
    assert discretize(a, 3.0, max_value=9).tolist() == [0, 0, 0, 0, 4, 8, 9]
    assert discretize(a, 0.0).tolist() == [0] * 7


def test_pearson__equals_the_textbook_formula_and_is_nan_for_constant_series():
    x, y = [1.0, 2.0, 0.0, 5.0, 3.0], [2.0, 2.5, 0.5, 4.0, 4.0]
    mx, my = sum(x) / 5, sum(y) / 5
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    ref = cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert pearson(torch.tensor(x), torch.tensor(y)) == pytest.approx(ref, abs=1e-12)
    assert math.isnan(pearson(torch.tensor(x), torch.full((5,), 0.1)))
    assert math.isnan(pearson(torch.zeros(5), torch.tensor(y)))


def test_balanced_accuracy__mean_of_hit_rates_from_a_hand_count():
    predicted = torch.tensor([1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    assert balanced_accuracy(predicted, labels) == pytest.approx(0.5 * (2 / 3 + 2 / 4))
    assert math.isnan(balanced_accuracy(predicted, torch.ones(7, dtype=torch.bool)))


class TabCache:
    """The stand-in's key/value cache: how many TABs the cached prefix holds."""

    def __init__(self, tabs: int) -> None:
        self.tabs = tabs

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass


class CountingTabsLM(nn.Module):
    """A stand-in causal LM with known logits: at a position after the k-th TAB of the record (TABs of the prompt
    prefix not counted), the value tokens get logits -(v - target[k])^2 and every other token +50 (which the
    renormalisation over the value tokens must ignore)."""

    def __init__(self, tab_id: int, value_ids: list[int], vocab: int, targets: list[float], prefix_tabs: int):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(final_logit_softcapping=None)
        self.tab_id, self.value_ids, self.vocab = tab_id, value_ids, vocab
        self.targets, self.prefix_tabs = targets, prefix_tabs

    def get_decoder(self):
        def decoder(input_ids, attention_mask=None, cache=None, use_cache=False):
            seen = cache.tabs if cache is not None else 0
            tabs = seen + (input_ids == self.tab_id).long().cumsum(1)
            return SimpleNamespace(
                last_hidden_state=(tabs - self.prefix_tabs).float().unsqueeze(-1),
                cache=TabCache(int(tabs[0, -1])) if use_cache else None,
            )

        return decoder

    def get_output_embeddings(self):
        def head(hidden):
            logits = torch.full((hidden.shape[0], self.vocab), 50.0)
            target = torch.tensor([self.targets[int(k) - 1] for k in hidden[:, 0]])
            values = torch.arange(len(self.value_ids), dtype=torch.float32)
            logits[:, self.value_ids] = -((values[None] - target[:, None]) ** 2)
            return logits

        return head


def test_logit_simulator__expected_value_equals_hand_computation_at_every_aligned_position(tiny_tokenizer):
    value_ids = single_token_values(tiny_tokenizer)
    assert len(value_ids) == 10  # the tiny BPE splits "10" into "1" "0": the scale is 0-9
    builder = PromptBuilder(tiny_tokenizer, max_value=9)
    prefix = builder.simulation_prefix("cats")
    tab_id = tiny_tokenizer("\t", add_special_tokens=False)["input_ids"][0]
    # Tokens holding line breaks, tabs and special-token text must not add lines or tab tokens.
    records = [
        [" the", " cat\n", "\tjumps", " the"],
        ["</s>", "a\r\nb", " red", "\\t", " cat", "."],
        [" dog"],
    ]
    targets = [[0.0, 7.0, 2.5, 9.0], [3.0, 0.0, 8.0, 1.0, 5.0, 4.5], [6.0]]
    prompts = [builder.simulation(prefix, tokens) for tokens in records]
    simulated = []
    for prompt, target in zip(prompts, targets):  # the fake model knows one record's targets at a time
        prefix_tabs = prefix.count(tab_id)
        model = CountingTabsLM(tab_id, value_ids, len(tiny_tokenizer), target, prefix_tabs)
        simulated += simulate_logits(model, [prompt], value_ids, pad_id=0, batch_size=2)[0]
    for target, values in zip(targets, simulated):
        for t, value in zip(target, values.tolist()):
            weights = [math.exp(-((v - t) ** 2)) for v in range(10)]
            assert value == pytest.approx(sum(v * w for v, w in enumerate(weights)) / sum(weights), abs=1e-5)
    # The read position of token j is its line's TAB, and the text between two reads is exactly one line.
    prompt, tokens = prompts[1], records[1]
    for j, position in enumerate(prompt.read_positions):
        assert prompt.input_ids[position] == tab_id
        if j:
            between = tiny_tokenizer.decode(prompt.input_ids[prompt.read_positions[j - 1] + 1 : position + 1])
            assert between == f"unknown\n{escape_token(tokens[j])}\t"
    assert 2 not in prompt.input_ids[len(prefix) :]  # "</s>" in a record stays text, not the EOS token


def test_logit_simulator__batched_and_padded_equals_the_full_hf_forward(tiny_tokenizer, tiny_model):
    value_ids = single_token_values(tiny_tokenizer)
    builder = PromptBuilder(tiny_tokenizer, max_value=len(value_ids) - 1)
    prefix = builder.simulation_prefix("the color red")
    records = [[" red", " green", " cat"], [" the", " blue", " sky", " is", " red", "."], [" one"]]
    prompts = [builder.simulation(prefix, tokens) for tokens in records]
    simulated, passes = simulate_logits(tiny_model, prompts, value_ids, pad_id=0, batch_size=2)
    assert passes == 1 + 2  # the shared prompt once, then 2 batches of records
    for prompt, values in zip(prompts, simulated):
        with torch.no_grad():
            logits = tiny_model(torch.tensor([prompt.input_ids])).logits[0, prompt.read_positions][:, value_ids]
        expected = (logits.softmax(-1) * torch.arange(len(value_ids))).sum(-1)
        torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)


def test_detection__p_yes_is_the_renormalised_full_forward_probability(tiny_tokenizer, tiny_model):
    builder, detection = PromptBuilder(tiny_tokenizer, max_value=9), DetectionScorer()
    texts = ("The cat runs.", "Paris is a city in France.", "red")
    prompts = [yes_no_prompt(builder, detection.system, detection.question("cats", text)) for text in texts]
    yes, no = answer_token(tiny_tokenizer, prompts[0], "Yes"), answer_token(tiny_tokenizer, prompts[0], "No")
    assert yes != no
    p_yes, _ = yes_probabilities(tiny_model, prompts, yes, no, pad_id=0, batch_size=2)
    for prompt, p in zip(prompts, p_yes.tolist()):
        with torch.no_grad():
            logits = tiny_model(torch.tensor([prompt])).logits[0, -1]
        assert p == pytest.approx(float(logits[[yes, no]].softmax(-1)[0]), abs=1e-5)


def test_parse_simulation__aligns_lines_by_token_and_leaves_missing_positions_zero():
    tokens = [" a", " b\n", " c", " d", " e"]
    text = " a\t3\n c\t7\n d\t12\ngarbled\t2\n<end>\n e\t9\n"  # " b\n" skipped, 12 capped, garbled line -> " e"
    assert parse_simulation(text, tokens, max_value=9).tolist() == [3, 0, 7, 9, 2]
    assert parse_simulation(" a\t1\n b\\n\t4\n", tokens, max_value=9).tolist() == [1, 4, 0, 0, 0]


def test_token_strings__concatenate_to_the_decoded_context(tiny_tokenizer):
    ids = tiny_tokenizer("The cat jumps quickly.\nRed dog", add_special_tokens=False)["input_ids"]
    strings = token_strings(tiny_tokenizer, ids)
    assert len(strings) == len(ids) and "".join(strings) == tiny_tokenizer.decode(ids)


def _datamodule(samples_dir, **kw) -> InterpretationDataModule:
    dm = InterpretationDataModule(str(samples_dir), num_interpretation_samples=3, num_simulation_samples=4,
                                  num_detection_samples=2, **kw)  # fmt: skip
    dm.setup("predict")
    return dm


def test_datamodule__held_out_records_never_overlap_the_explanation_and_are_deterministic(samples_dir):
    dm = _datamodule(samples_dir)
    for latent in LATENTS:
        task = dm.task(latent)
        shown = {r.context_index for r in task.explanation}
        held_out = [r.context_index for r in task.simulation]
        assert len(task.explanation) == 3 and not shown & set(held_out) and len(set(held_out)) == len(held_out)
        kinds = [r.kind for r in task.simulation]
        assert len(kinds) == 4 and kinds.count("random") == 2 and set(kinds[:2]) <= {"top", "quantile"}
        assert task.detection_labels == [True, True, False, False]
        assert not shown & {r.context_index for r in task.detection}
        assert [r.kind for r in task.detection[2:]] == ["negative", "negative"]
        top = [r.activations.max() for r in dm.samples.records(latent, "top")]
        interleaved = top[0:6:2] if len(top) >= 6 else top[:3]  # ranks 0, 2, 4 (Bills et al.'s interleaved split)
        assert [float(r.activations.max()) for r in task.explanation] == [float(a) for a in interleaved]
        again = _datamodule(samples_dir, seed=0).task(latent)
        assert [r.context_index for r in again.simulation] == held_out
        strongest = max((float(a), t) for r in dm.samples.records(latent, "top")
                        for a, t in zip(r.activations, token_strings(dm.tokenizer, r.token_ids.tolist())))  # fmt: skip
        assert task.top_tokens[0] == strongest[1] and len(task.top_tokens) == len(set(task.top_tokens)) <= 10


def test_interleaved_explanation__takes_every_other_top_record_where_there_are_enough():
    from neurolight.datamodules.interpret.tasks import interleaved_explanation

    top = list(range(12))  # ranks, strongest first
    assert interleaved_explanation(top, 5) == [0, 2, 4, 6, 8]  # the held-out 1, 3, 5, 7, 9 are as strong
    assert interleaved_explanation(top[:9], 5) == [0, 1, 2, 3, 4]  # too few to interleave: the explainer comes first
    assert interleaved_explanation([], 5) == []


def test_datamodule__skip_latents_and_ranks_split_latents_exactly_once(samples_dir):
    dm = _datamodule(samples_dir)
    dm.skip_latents([4])
    assert [t.latent for batch in dm.predict_dataloader() for t in batch] == [1, 6]
    assert _datamodule(samples_dir, max_latents=2).pending_latents() == [1, 4]

    def loader(rank: int, batch_size: int):
        strategy = SimpleNamespace(broadcast=lambda obj, src=0: obj)
        dm = _datamodule(samples_dir, batch_size=batch_size)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, strategy=strategy)
        return [[(t.latent, t.padding) for t in batch] for batch in dm.predict_dataloader()]

    # Rank 1 gets a padding task and as many batches as rank 0 (ZeRO-3 forward passes are collective).
    assert [loader(rank, batch_size=1) for rank in (0, 1)] == [
        [[(1, False)], [(6, False)]],
        [[(4, False)], [(1, True)]],
    ]
    assert [loader(rank, batch_size=2) for rank in (0, 1)] == [[[(1, False), (6, False)]], [[(4, False)]]]


def test_predict__tiny_llama_interprets_every_latent_once_with_all_fields(samples_dir, tiny_model_dir, tmp_path):
    dm = InterpretationDataModule(str(samples_dir), num_interpretation_samples=2, num_simulation_samples=3,
                                  num_detection_samples=2, batch_size=2)  # fmt: skip
    module = LatentInterpreter(explainer_model=str(tiny_model_dir), max_explanation_tokens=6, forward_batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         default_root_dir=str(tmp_path))  # fmt: skip
    results = [row for batch in trainer.predict(module, datamodule=dm) for row in batch]
    assert [row["latent"] for row in results] == LATENTS
    for row in results:
        assert set(row) == KEYS and row["explainer"] == str(tiny_model_dir)
        assert row["num_simulated_tokens"] == 3 * T and isinstance(row["explanation"], str)
        assert -1 <= row["score"] <= 1 or math.isnan(row["score"])
        assert 0 <= row["detection_score"] <= 1 and 0 <= row["detection_auroc"] <= 1
        assert row["frequency"] == pytest.approx(float(dm.samples.frequency[row["latent"]]))
    # The score is the Pearson correlation of the task's true activations with the logit simulation.
    task = dm.task(LATENTS[0])
    prefix = module.prompts.simulation_prefix(results[0]["explanation"])
    prompts = [module.prompts.simulation(prefix, r.tokens) for r in task.simulation]
    simulated, _ = simulate_logits(module.model, prompts, module.value_ids, module.pad_id, batch_size=1)
    true = torch.cat([r.activations for r in task.simulation])
    assert results[0]["score"] == pytest.approx(pearson(true, torch.cat(simulated)), abs=1e-6, nan_ok=True)


def test_cli__a_store_holding_another_sae_ends_the_run_with_one_line_not_a_traceback(
    samples_dir, tiny_model_dir, tmp_path, capsys
):
    """Two samples directories of one SAE run (same index name) but of different weights (fingerprints)."""
    store = {"class_path": "neurolight.callbacks.SQLiteStore", "init_args": {"path": str(tmp_path / "db")}}
    runs = []
    for fingerprint in ("a" * 16, "b" * 16):
        samples = tmp_path / f"samples-{fingerprint[0]}"
        shutil.copytree(samples_dir, samples)
        metadata = json.loads((samples / "metadata.json").read_text())
        (samples / "metadata.json").write_text(json.dumps({**metadata, "d_in": 64, "sae_fingerprint": fingerprint}))
        config = {
            "trainer": {
                "accelerator": "cpu",
                "logger": False,
                "enable_progress_bar": False,
                "default_root_dir": str(tmp_path),
                "callbacks": [
                    {
                        "class_path": "neurolight.callbacks.InterpretationWriter",
                        "init_args": {"store": store},
                    }
                ],
            },
            "model": {
                "class_path": "neurolight.lightning_modules.interpret.interpreter.LatentInterpreter",
                "init_args": {
                    "explainer_model": str(tiny_model_dir),
                    "max_explanation_tokens": 2,
                    "scorers": ["simulation"],
                },
            },
            "data": {
                "class_path": "neurolight.datamodules.interpret.tasks.InterpretationDataModule",
                "init_args": {"samples_path": str(samples), "max_latents": 1, "num_simulation_samples": 2},
            },
        }
        path = tmp_path / f"config-{fingerprint[0]}.yaml"
        path.write_text(yaml.safe_dump(config))
        runs.append(["predict", "--config", str(path)])
    cli_main(runs[0])
    with pytest.raises(SystemExit) as exit_info:
        cli_main(runs[1])
    message = str(exit_info.value.code)
    assert message.startswith("neurolight: ") and "\n" not in message
    assert "holds the interpretations of another SAE" in message and "fingerprint " + "a" * 16 in message
    assert "Traceback" not in capsys.readouterr().err


def test_generate_simulator__runs_end_to_end_with_aligned_lengths(samples_dir, tiny_model_dir):
    dm = _datamodule(samples_dir, max_latents=1)
    module = LatentInterpreter(explainer_model=str(tiny_model_dir), simulator="generate", scorers=["simulation"],
                               max_explanation_tokens=4)  # fmt: skip
    module.configure_model()
    task = dm.task(LATENTS[0])
    simulated, calls = module.read(VALUES, SimulationScorer().prompts(module.prompts, "cats", task))
    assert calls == 1  # the 4 records in one generate call (forward_batch_size 8)
    assert [len(v) for v in simulated] == [len(r.tokens) for r in task.simulation]
    assert all(float(v.min()) >= 0 and float(v.max()) <= module.prompts.max_value for v in simulated)


def test_explainer_without_tokenizer__is_a_clear_error(tiny_model_dir, tmp_path):
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, weights_only / name)
    with pytest.raises(ValueError, match="tokenizer"):
        LatentInterpreter(explainer_model=str(weights_only)).configure_model()


def test_explainer_dtype_auto__is_bfloat16_exactly_where_the_cpu_has_bf16_instructions(tiny_model_dir):
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()  # no such line off x86
    native = "avx512_bf16" in flags or "amx_tile" in flags
    assert native_bfloat16("cpu") == native
    module = LatentInterpreter(explainer_model=str(tiny_model_dir), explainer_dtype="auto")
    module.configure_model()
    assert module.model.dtype == (torch.bfloat16 if native else torch.float32)


def test_bad_arguments__name_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"simulator='regex'.*logits, generate"):
        LatentInterpreter(simulator="regex")
    with pytest.raises(ValueError, match=r"explainer_dtype='fp8'.*float32, bfloat16, float16, auto or null"):
        LatentInterpreter(explainer_dtype="fp8")
    with pytest.raises(ValueError, match="num_simulation_samples=0"):
        InterpretationDataModule("x", num_simulation_samples=0)
    with pytest.raises(ValueError, match="num_fuzzing_samples=-1"):
        InterpretationDataModule("x", num_fuzzing_samples=-1)


# DeepSpeed's ZeRO collectives call torch.distributed functions that torch has renamed.
@pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning")
def test_zero3__sharded_explainer_gives_the_interpretations_of_a_plain_run(
    samples_dir, tiny_model_dir, tmp_path, single_process_group
):
    import deepspeed

    from tests.helpers.cpu_deepspeed import CpuDeepSpeedStrategy

    def interpret(**trainer_args):
        dm = InterpretationDataModule(str(samples_dir), num_interpretation_samples=2, num_simulation_samples=3,
                                      num_detection_samples=2, batch_size=2, max_latents=2)  # fmt: skip
        module = LatentInterpreter(explainer_model=str(tiny_model_dir), max_explanation_tokens=4)
        trainer = pl.Trainer(logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path), **trainer_args)
        return module, [row for batch in trainer.predict(module, datamodule=dm) for row in batch]

    try:
        module, sharded = interpret(strategy=CpuDeepSpeedStrategy(stage=3), precision="32-true")
        assert hasattr(module.model.lm_head.weight, "ds_id")  # really partitioned by ZeRO-3
    finally:
        if torch.distributed.is_initialized():
            deepspeed.comm.destroy_process_group()
    _, plain = interpret(accelerator="cpu", devices=1)
    assert [r["explanation"] for r in sharded] == [r["explanation"] for r in plain]
    for a, b in zip(sharded, plain):
        assert a["score"] == pytest.approx(b["score"], abs=1e-4, nan_ok=True)
        assert a["detection_score"] == pytest.approx(b["detection_score"], nan_ok=True)
        assert a["detection_auroc"] == pytest.approx(b["detection_auroc"], abs=1e-6, nan_ok=True)
