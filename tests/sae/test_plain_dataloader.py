"""SparseAutoencoderModule trains on any DataLoader of activations (issue 13, part 1): a TensorDataset of synthetic
sparse codes over a known dictionary, with no data module. The normalisation scalar then comes from the first
training batches, and validation reports the activation-space metrics."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from neurolight.lightning_modules import SparseAutoencoderModule, TopK
from tests.helpers.sae import synthetic_sparse_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DICTIONARY = F.normalize(torch.randn(48, 32, generator=torch.Generator().manual_seed(1234)), dim=1)
"""The dictionary of ``synthetic_sparse_data`` (its seed 1234), rebuilt here."""


class FirstBatches(pl.Callback):
    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.batches.append(batch[0].clone())


def fit(module, steps: int, train: torch.Tensor, val=None, callbacks=(), shuffle: bool = True) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=list(callbacks), limit_val_batches=None if val is not None else 0,
        val_check_interval=steps if val is not None else None, check_val_every_n_epoch=None, num_sanity_val_steps=0,
    )  # fmt: skip
    torch.manual_seed(0)  # the loader's shuffle
    loader = DataLoader(TensorDataset(train), batch_size=256, shuffle=shuffle)
    trainer.fit(module, loader, DataLoader(TensorDataset(val), batch_size=500) if val is not None else None)
    return trainer


def test_tensor_dataset__recovers_a_known_sparse_dictionary_and_reports_validation_metrics():
    torch.manual_seed(0)
    module = SparseAutoencoderModule(32, 64, TopK(k=3, k_aux=16), learning_rate=3e-3, dead_tokens_threshold=2048,
                                     metrics_every_n_steps=100, max_l0_fraction=None)  # fmt: skip
    held_out = synthetic_sparse_data(1000, seed=1)
    trainer = fit(module, 1500, synthetic_sparse_data(16384, seed=0), held_out)
    # Each true feature has a decoder row pointing its way (cosine); the 16 spare latents may point anywhere.
    best = (DICTIONARY @ F.normalize(module.sae.W_dec.detach(), dim=1).T).max(dim=1).values
    assert (best > 0.95).float().mean() >= 0.9 and best.median() > 0.99, best
    # Validation without an LLM: the activation-space metrics, computed here by hand on the held-out rows.
    with torch.no_grad():
        x = held_out * module.activation_scale
        out = module.sae.eval()(x)
    explained = 1 - ((x - out.x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    metrics = trainer.callback_metrics
    assert metrics["val/explained_variance"].item() == pytest.approx(explained.item(), rel=1e-4)
    assert metrics["val/l0"].item() == pytest.approx(3.0) and "val/ce_loss_recovered" not in metrics
    assert metrics["val/mse"].item() == pytest.approx(out.mse.item(), rel=1e-4)


def test_normalisation__estimated_from_the_first_batches_of_the_loader():
    data = synthetic_sparse_data(4096, seed=2) * 7.0
    module = SparseAutoencoderModule(32, 64, TopK(k=3), norm_estimation_batches=4, max_l0_fraction=None)
    fit(module, 2, data, shuffle=False)
    expected = math.sqrt(32) / data[: 4 * 256].norm(dim=1).mean().item()
    assert module.activation_scale.item() == pytest.approx(expected, rel=1e-6)


def test_normalisation__the_estimate_leaves_the_shuffled_training_order_unchanged():
    data = synthetic_sparse_data(4096, seed=2)
    orders = []
    for normalize in (True, False):  # with the estimate's pass over 8 batches, and without it
        seen = FirstBatches()
        fit(SparseAutoencoderModule(32, 64, TopK(k=3), normalize_dataset=normalize), 5, data, callbacks=[seen])
        orders.append(torch.cat(seen.batches))
    assert torch.equal(*orders)


def test_batches__of_another_kind_are_refused_naming_what_is_accepted():
    module = SparseAutoencoderModule(32, 64, TopK(k=3))
    with pytest.raises(TypeError, match=r"batches of activations .*TensorDataset.*got dict"):
        module.batch_activations({"x": torch.zeros(2, 32)})
    assert module.batch_activations([torch.zeros(2, 5, 32)]).shape == (10, 32)


def test_fit__warns_when_max_steps_ends_before_the_first_validation():
    module = SparseAutoencoderModule(32, 64, TopK(k=3), metrics_every_n_steps=1, max_l0_fraction=None)
    trainer = pl.Trainer(
        max_steps=3, val_check_interval=10, check_val_every_n_epoch=None, num_sanity_val_steps=0, accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    data = DataLoader(TensorDataset(synthetic_sparse_data(4096, seed=0)), batch_size=256)
    with pytest.warns(
        UserWarning, match=r"val_check_interval=10 is more than trainer.max_steps=3: this fit will never validate"
    ):
        trainer.fit(module, data, DataLoader(TensorDataset(synthetic_sparse_data(256, seed=1)), batch_size=256))
    assert "val/explained_variance" not in trainer.callback_metrics  # the warning was right
