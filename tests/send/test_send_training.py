"""SEND fine-tuning with the SensitiveNeuronDropout callback: the dropout window (weights and activations modes),
resuming, bfloat16 and ZeRO-3, and the saved model folder, on the tiny Llama (2 layers; d = 64, so the penultimate
layer is layer 0) and small TriviaQA-schema records."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from neurolight.callbacks import SensitiveNeuronDropout
from neurolight.lightning_modules import SendModule
from neurolight.lightning_modules.send.module import penultimate_layer
from tests.helpers.send import D_MODEL, fit, make_datamodule, make_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------ dropping
class _WriterRowsProbe(pl.Callback):
    """After every training step (and the SEND callback's own hooks), the dropped rows of both writer weights
    and their Adam moments, per epoch."""

    def __init__(self, send: SensitiveNeuronDropout) -> None:
        self.send = send
        self.rows_abs_max: dict[int, list[float]] = {}
        self.moments_abs_max: dict[int, list[float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.send.sensitive is None:
            return
        layer = penultimate_layer(pl_module.model)
        rows = self.send.sensitive
        weights = [layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight]
        state = trainer.optimizers[0].state
        self.rows_abs_max.setdefault(trainer.current_epoch, []).append(
            max(float(w[rows].detach().abs().max()) for w in weights)
        )
        moments = [state[w][key][rows].abs().max() for w in weights for key in ("exp_avg", "exp_avg_sq")]
        self.moments_abs_max.setdefault(trainer.current_epoch, []).append(float(max(moments)))


def test_weights_mode__rows_held_at_exactly_zero_through_the_window_then_train_again(
    tiny_model_dir, records_path, tmp_path
):
    # identify_every_n_epochs=1, drop_epochs=1: epoch 0 trains fully and identifies, epoch 1 drops, epoch 2 trains
    # fully.
    send = SensitiveNeuronDropout(
        sensitivity_threshold=0.25, identify_every_n_epochs=1, drop_epochs=1, log_eigenscore=False
    )
    probe = _WriterRowsProbe(send)
    module = make_module(tiny_model_dir, tmp_path, weight_decay=0.1, learning_rate=1e-2)
    fit(module, make_datamodule(tiny_model_dir, records_path), tmp_path, [send, probe], max_epochs=3)
    assert len(send.sensitive) == round(0.25 * D_MODEL)
    assert len(probe.rows_abs_max[1]) == 3  # three AdamW steps (weight decay 0.1) in the window
    assert probe.rows_abs_max[1] == [0.0, 0.0, 0.0]
    assert probe.moments_abs_max[1] == [0.0, 0.0, 0.0]  # masked gradients: not even momentum builds up
    assert all(value > 0 for value in probe.rows_abs_max[2])  # after the window they train again
    layer = penultimate_layer(module.model)
    for weight in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
        assert (weight[send.sensitive].abs().sum(1) > 0).all()  # every dropped row, in both writers


class _ActivationProbe(pl.Callback):
    """Registers, after the SEND callback's hook, a hook that records the penultimate output's dropped dims."""

    def __init__(self, send: SensitiveNeuronDropout) -> None:
        self.send = send
        self.train_abs_max: dict[int, float] = {}
        self.eval_abs_max: dict[int, float] = {}
        self.hooks_at_start: dict[int, int] = {}
        self._handle = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        layer = penultimate_layer(pl_module.model)
        self.hooks_at_start[trainer.current_epoch] = len(layer._forward_hooks)
        epoch = trainer.current_epoch

        def record(module, args, output):
            if self.send.sensitive is None:
                return
            value = float(output[..., self.send.sensitive].detach().abs().max())
            target = self.train_abs_max if module.training else self.eval_abs_max
            target[epoch] = max(target.get(epoch, 0.0), value)

        self._handle = layer.register_forward_hook(record)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._handle.remove()


def test_activations_mode__zeroes_the_dims_in_training_forward_only_and_removes_its_hook(
    tiny_model_dir, records_path, tmp_path
):
    send = SensitiveNeuronDropout(
        sensitivity_threshold=0.25,
        identify_every_n_epochs=1,
        drop_epochs=1,
        drop_mode="activations",
        log_eigenscore=False,
    )
    probe = _ActivationProbe(send)
    module = make_module(tiny_model_dir, tmp_path)
    fit(module, make_datamodule(tiny_model_dir, records_path), tmp_path, [send, probe], max_epochs=3)
    assert probe.train_abs_max[1] == 0.0  # the window
    assert probe.eval_abs_max[1] > 0  # validation in the window sees the whole layer
    assert probe.train_abs_max[2] > 0  # after the window
    assert probe.hooks_at_start == {0: 0, 1: 1, 2: 0}
    assert len(penultimate_layer(module.model)._forward_hooks) == 0


def test_weights_mode__refuses_a_frozen_penultimate_layer(tiny_model_dir, records_path, tmp_path):
    module = make_module(tiny_model_dir, tmp_path, freeze_layers=1)
    with pytest.raises(ValueError, match="penultimate decoder layer is frozen"):
        fit(module, make_datamodule(tiny_model_dir, records_path), tmp_path, [SensitiveNeuronDropout()], max_epochs=1)


# --------------------------------------------------------------------------------------------------- resume
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("save_on_train_epoch_end", [True, False], ids=["ckpt_at_epoch_end", "ckpt_at_val_end"])
def test_resume__callback_state_matches_a_straight_run(tiny_model_dir, records_path, tmp_path, save_on_train_epoch_end):
    def send():
        return SensitiveNeuronDropout(sensitivity_threshold=0.25, log_eigenscore=False)

    straight = send()
    fit(make_module(tiny_model_dir, tmp_path), make_datamodule(tiny_model_dir, records_path), tmp_path, [straight], 4)

    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=True, save_on_train_epoch_end=save_on_train_epoch_end
    )
    first = send()
    fit(make_module(tiny_model_dir, tmp_path), make_datamodule(tiny_model_dir, records_path), tmp_path, [first], 2,
         checkpoint=checkpoint)  # fmt: skip
    resumed = send()
    module = make_module(tiny_model_dir, tmp_path)
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_on_train_epoch_end=save_on_train_epoch_end
    )
    fit(module, make_datamodule(tiny_model_dir, records_path), tmp_path, [resumed], 4,
         ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), checkpoint=checkpoint)  # fmt: skip

    assert straight.history_epochs == resumed.history_epochs == [-1, 0, 1, 2, 3]
    torch.testing.assert_close(resumed.history, straight.history, rtol=1e-5, atol=1e-6)
    assert torch.equal(resumed.sensitive, straight.sensitive)
    assert resumed.selections == straight.selections and len(straight.selections) == 1
    layer = penultimate_layer(module.model)
    assert (
        float(layer.mlp.down_proj.weight[resumed.sensitive].detach().abs().max()) == 0.0
    )  # epoch 4 ended in the window


# ------------------------------------------------------------------------------------------------- bfloat16
@pytest.mark.parametrize(("precision", "weights_dtype"), [("bf16-true", torch.bfloat16), ("bf16-mixed", torch.float32)])
def test_bf16__window_holds_rows_at_zero_eigenscores_match_and_the_model_reloads_in_its_training_dtype(
    tiny_model_dir, records_path, tmp_path, precision, weights_dtype
):
    import csv

    from transformers import AutoModelForCausalLM

    from tests.send.test_metrics import numpy_eigenscore

    # The recipes' precisions (configs/send/*.yaml: bf16-true; configs/trainer/deepspeed.yaml: bf16-mixed), on CPU.
    send = SensitiveNeuronDropout(sensitivity_threshold=0.25, identify_every_n_epochs=1, drop_epochs=1)
    probe = _WriterRowsProbe(send)
    forward_dtypes = set()
    record_dtype = pl.callbacks.LambdaCallback(
        on_train_start=lambda trainer, module: penultimate_layer(module.model).mlp.down_proj.register_forward_hook(
            lambda linear, args, output: forward_dtypes.add((linear.training, output.dtype))
        )
    )
    module = make_module(tiny_model_dir, tmp_path, save_model=True, run_name="bf16")
    logger = pl.loggers.CSVLogger(str(tmp_path), name="logs")
    fit(module, make_datamodule(tiny_model_dir, records_path), tmp_path, [send, probe, record_dtype], max_epochs=3,
         precision=precision, logger=logger, log_every_n_steps=1)  # fmt: skip

    # bf16-true trains bfloat16 weights; bf16-mixed keeps float32 weights and runs the forward under autocast.
    assert {p.dtype for p in module.model.parameters()} == {weights_dtype}
    # The matrix products of the training and the tracking forwards (eval mode) ran in bfloat16.
    assert forward_dtypes == {(True, torch.bfloat16), (False, torch.bfloat16)}
    # Identified after epoch 0, dropped through epoch 1 (three AdamW steps), trained in epoch 2, identified again.
    assert [s["epoch"] for s in send.selections] == [0, 2] and len(send.sensitive) == round(0.25 * D_MODEL)
    assert probe.rows_abs_max[1] == [0.0, 0.0, 0.0] and probe.moments_abs_max[1] == [0.0, 0.0, 0.0]
    assert min(probe.rows_abs_max[2]) > 0
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("send/tracking_eigenscore")]
    assert [float(row["send/dropped_neurons"]) for row in rows] == [0, round(0.25 * D_MODEL), 0]
    assert send.history.dtype == torch.float32 and send.history_epochs == [-1, 0, 1, 2]
    for row, embeddings in zip(rows, send.history[1:]):  # the logged scores are those of that epoch's embeddings
        score, ees = float(row["send/tracking_eigenscore"]), float(row["send/tracking_ees"])
        assert np.isfinite(score) and np.isfinite(ees)
        expected = numpy_eigenscore(embeddings, alpha=1e-3)
        assert score == pytest.approx(expected, rel=1e-5) and ees == pytest.approx(expected, rel=1e-2)
        assert float(row["send/tracking_ees_estimated"]) == 0.0  # a tiny tracking set: the exact score is cheaper

    # Saved as trained, so nothing is rounded: bfloat16 for bf16-true, the float32 weights for bf16-mixed.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "bf16")
    assert reloaded.dtype == weights_dtype
    saved = reloaded.state_dict()
    for name, value in module.model.state_dict().items():
        assert torch.equal(saved[name], value), name


# --------------------------------------------------------------------------------------------------- output
def test_send_folder__safetensors_tokenizer_and_config_that_reload_to_identical_logits(
    tiny_model_dir, records_path, tmp_path, capsys, monkeypatch
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(tmp_path)
    module = make_module(tiny_model_dir, tmp_path, save_model=True, run_name=None, output_dir="out")  # relative
    send = SensitiveNeuronDropout(identify_every_n_epochs=1, drop_epochs=1, log_eigenscore=False)
    fit(module, make_datamodule(tiny_model_dir, records_path), tmp_path, [send], max_epochs=2)
    folder = tmp_path / "out" / f"{tiny_model_dir.name}_triviaqa_SEND"
    # The end of fit says where the model went, as an absolute path, once.
    assert capsys.readouterr().out.count(f"\nSEND model written to {folder.resolve()}\n") == 1
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "training_config.json" in names and not any(n.endswith(".bin") for n in names)
    config = json.loads((folder / "training_config.json").read_text())
    assert config["model"]["learning_rate"] == 1e-2 and config["data"]["dataset"] == "triviaqa"
    assert config["trainer"]["max_epochs"] == 2
    assert config["callbacks"]["SensitiveNeuronDropout"]["sensitivity_threshold"] == 0.3

    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = AutoTokenizer.from_pretrained(folder)("Which red river?", return_tensors="pt")["input_ids"]
    module.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, module.model(ids).logits)


def test_existing_output_folder__refused_unless_overwrite(tiny_model_dir, records_path, tmp_path):
    folder = tmp_path / "out" / "mine"
    folder.mkdir(parents=True)
    (folder / "old.txt").write_text("from an earlier run")
    module = make_module(tiny_model_dir, tmp_path, save_model=True, run_name="mine")
    with pytest.raises(FileExistsError, match="overwrite: true"):
        fit(module, make_datamodule(tiny_model_dir, records_path), tmp_path, [], max_epochs=1)
    module = make_module(tiny_model_dir, tmp_path, save_model=True, run_name="mine", overwrite=True)
    fit(module, make_datamodule(tiny_model_dir, records_path), tmp_path, [], max_epochs=1)
    assert not (folder / "old.txt").exists() and (folder / "model.safetensors").is_file()


def test_data_tokenized_for_another_model__is_refused(tiny_model_dir, records_path, tmp_path):
    module = SendModule(model_name="smollm2-135m", save_model=False)
    with pytest.raises(ValueError, match=r"data\.init_args\.model_name"):
        fit(module, make_datamodule(tiny_model_dir, records_path), tmp_path, [], max_epochs=1)


# DeepSpeed's ZeRO collectives call torch.distributed functions that torch has renamed.
@pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning")
def test_zero3__loads_sharded_holds_dropped_rows_and_saves_the_whole_model(
    tiny_model_dir, records_path, tmp_path, single_process_group
):
    import deepspeed
    from transformers import AutoModelForCausalLM

    from neurolight.datamodules.llm import zero
    from tests.helpers.cpu_deepspeed import CpuDeepSpeedStrategy

    class FullRows(pl.Callback):
        def __init__(self, send):
            self.send, self.rows_abs_max = send, {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.send.sensitive is not None:
                layer = penultimate_layer(pl_module.model)
                weights = [
                    zero.full_param(layer.self_attn.o_proj.weight),
                    zero.full_param(layer.mlp.down_proj.weight),
                ]
                value = max(float(w[self.send.sensitive].abs().max()) for w in weights)
                self.rows_abs_max.setdefault(trainer.current_epoch, []).append(value)

    send = SensitiveNeuronDropout(
        sensitivity_threshold=0.25, identify_every_n_epochs=1, drop_epochs=1, log_eigenscore=False
    )
    probe = FullRows(send)
    module = make_module(tiny_model_dir, tmp_path, save_model=True, run_name="zero3")
    try:
        fit(module, make_datamodule(tiny_model_dir, records_path), tmp_path, [send, probe], max_epochs=3,
             strategy=CpuDeepSpeedStrategy(stage=3), precision="32-true")  # fmt: skip
        assert hasattr(penultimate_layer(module.model).mlp.down_proj.weight, "ds_id")  # really partitioned
        assert probe.rows_abs_max[1] == [0.0, 0.0, 0.0] and min(probe.rows_abs_max[2]) > 0
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "zero3")
        for name, param in module.model.named_parameters():
            assert torch.equal(reloaded.state_dict()[name], zero.full_param(param)), name
    finally:
        if torch.distributed.is_initialized():
            deepspeed.comm.destroy_process_group()
