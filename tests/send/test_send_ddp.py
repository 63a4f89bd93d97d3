"""SEND under DDP: two ranks (gloo on CPU, spawned) choose the same sensitive neurons and, through the dropout
window and the stochastic rounding of bf16-true AdamW, end with bit-identical weights."""

from __future__ import annotations

import socket

import lightning.pytorch as pl
import torch

from neurolight.callbacks import SensitiveNeuronDropout
from tests.helpers.send import D_MODEL, fit, make_datamodule, make_module


class _RankRecord(pl.Callback):
    """At the end of fit, each rank saves what must agree across ranks."""

    def __init__(self, send: SensitiveNeuronDropout, folder) -> None:
        self.send, self.folder = send, folder

    def on_train_end(self, trainer, pl_module) -> None:
        record = {
            "selections": [sorted(s["indices"]) for s in self.send.selections],
            "optimizer": type(trainer.optimizers[0]).__name__,
            "weights": {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()},
        }
        torch.save(record, self.folder / f"rank{trainer.global_rank}.pt")


# Two spawned processes import torch, Lightning and transformers: ~20 s on 2 shared cores.
def test_ddp_bf16_true__ranks_drop_the_same_neurons_and_keep_bit_identical_weights(
    tiny_model_dir, records_path, tmp_path, monkeypatch
):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(probe.getsockname()[1]))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    send = SensitiveNeuronDropout(sensitivity_threshold=0.25, identify_every_n_epochs=1, drop_epochs=1)
    module = make_module(tiny_model_dir, tmp_path, learning_rate=1e-3)
    fit(module, make_datamodule(tiny_model_dir, records_path), tmp_path, [send, _RankRecord(send, tmp_path)],
        max_epochs=3, devices=2, strategy="ddp_spawn", precision="bf16-true")  # fmt: skip
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["optimizer"] for r in ranks] == ["StochasticRoundingAdamW"] * 2
    # Identified after epochs 0 and 2 (dropped through epoch 1), the same neurons on both ranks.
    selections = [r["selections"] for r in ranks]
    assert selections[0] == selections[1] and len(selections[0]) == 2
    assert all(len(neurons) == round(0.25 * D_MODEL) for neurons in selections[0])
    weights = [r["weights"] for r in ranks]
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        assert value.dtype == torch.bfloat16 and torch.equal(weights[1][name], value), name
