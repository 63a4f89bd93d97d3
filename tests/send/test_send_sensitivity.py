"""SEND's choice of neurons: sensitivity scores and their selection (against numpy), the identify/drop schedule,
and the tracking embeddings the scores come from, on the tiny Llama (2 layers unless a test builds a deeper one;
d = 64, so the penultimate layer is layer 0) and small TriviaQA-schema records."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from neurolight.callbacks import SensitiveNeuronDropout
from neurolight.callbacks.send.sensitive_dropout import drop_schedule
from neurolight.lightning_modules import SendModule
from neurolight.lightning_modules.send.module import select_sensitive, sensitivity_scores
from tests.helpers.send import D_MODEL, fit, make_datamodule, make_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------- pure math
def test_sensitivity_scores__equal_a_numpy_computation_of_var_times_net_change():
    rng = np.random.default_rng(0)
    history = rng.normal(size=(6, 5, 8)).astype(np.float32)  # (T checkpoints, N samples, d dims)
    variance = history.astype(np.float64).var(axis=0)  # population variance over checkpoints
    net_change = np.abs(np.diff(history.astype(np.float64), axis=0))[-3:].sum(axis=0)  # last C = 3 changes
    expected = (variance * net_change).mean(axis=0)
    scores = sensitivity_scores(torch.from_numpy(history), num_checkpoints=3)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-6)
    # Fewer checkpoints than C: all the net changes there are.
    short = history[:2]
    expected_short = (short.astype(np.float64).var(axis=0) * np.abs(short[1] - short[0])).mean(axis=0)
    np.testing.assert_allclose(sensitivity_scores(torch.from_numpy(short)).numpy(), expected_short, rtol=1e-6)
    top = select_sensitive(scores, 0.25)
    assert top.tolist() == sorted(np.argsort(-expected)[:2].tolist())


def test_sensitivity__leaves_out_the_jump_the_drop_itself_makes_at_a_window_start():
    # A demo-like history: small training drift, and at the first epoch of the window (epoch 2) dimension 0
    # jumps by 400, as a massive-activation dimension does when the rows writing it are zeroed.
    generator = torch.Generator().manual_seed(0)
    epochs = [-1, 0, 1, 2, 3, 4, 5, 6]
    history = torch.cumsum(0.1 * torch.randn(len(epochs), 5, 8, generator=generator), 0)
    history[epochs.index(2) :, :, 0] += 400.0
    callback = SensitiveNeuronDropout(identify_every_n_epochs=2, drop_epochs=3)
    for last in range(len(epochs)):
        callback.history, callback.history_epochs = history[: last + 1], epochs[: last + 1]
        used = callback.sensitivity_history()
        start = epochs.index(2) if epochs[last] >= 2 else 0  # the window's first epoch on; before it, everything
        assert torch.equal(used, history[start : last + 1])
    # At the next identification (after epoch 6), the dimension that jumped is not singled out by its jump.
    scores = sensitivity_scores(callback.sensitivity_history(), 3)
    assert scores.max() < 1 and scores[0] < scores.max()
    across = sensitivity_scores(history, 3)  # compared across the window start, as before
    assert across[0] > 1000 * scores.max() and across.argmax() == 0


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_sensitivity_threshold_outside_0_1__errors(bad):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        SensitiveNeuronDropout(sensitivity_threshold=bad)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        select_sensitive(torch.arange(10.0), bad)


@pytest.mark.parametrize(
    ("identify_every_n_epochs", "drop_epochs", "identify_after", "dropped"),
    [
        (2, 3, [1, 6, 11], [2, 3, 4, 7, 8, 9]),  # the defaults: 1-based, identify after 2, drop in 3-5, ...
        (1, 1, [0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]),
        (3, 2, [2, 7], [3, 4, 8, 9]),
        (1, 4, [0, 5, 10], [1, 2, 3, 4, 6, 7, 8, 9, 11]),
    ],
)
def test_drop_schedule__windows_follow_identification_and_never_overlap(
    identify_every_n_epochs, drop_epochs, identify_after, dropped
):
    phases = [drop_schedule(epoch, identify_every_n_epochs, drop_epochs) for epoch in range(12)]
    assert [e for e, p in enumerate(phases) if p.identify] == identify_after
    assert [e for e, p in enumerate(phases) if p.drop] == dropped
    for epoch, phase in enumerate(phases[:-1]):
        assert not (phase.identify and phase.drop)  # identification happens after a full-training epoch
        if phase.identify:
            assert all(phases[epoch + 1 + i].drop for i in range(drop_epochs) if epoch + 1 + i < 12)


def test_drop_schedule__defaults_fire_within_the_users_four_epochs():
    assert [drop_schedule(epoch).drop for epoch in range(4)] == [False, False, True, True]
    with pytest.raises(ValueError, match="identify_every_n_epochs=0"):
        drop_schedule(0, identify_every_n_epochs=0)


# ------------------------------------------------------------------------------------------- embeddings
def _bare_trainer(datamodule) -> SimpleNamespace:
    """What ``tracking_embeddings`` reads from a trainer, for calling it outside fit."""
    return SimpleNamespace(
        datamodule=datamodule,
        precision_plugin=pl.plugins.precision.Precision(),
        strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj),
    )


def test_tracking_embeddings__mean_and_last_real_token_of_the_penultimate_layer(tiny_model_dir, records_path):
    dm = make_datamodule(tiny_model_dir, records_path)
    dm.setup("fit")
    module = SendModule(model_name=str(tiny_model_dir))
    module.configure_model()
    module.model.train()
    embeddings = SensitiveNeuronDropout().tracking_embeddings(_bare_trainer(dm), module)
    assert module.model.training  # the mode is restored
    module.model.eval()
    batches = list(dm.tracking_dataloader())
    assert any((b["attention_mask"] == 0).any() for b in batches), "the test needs right padding"
    expected = []
    with torch.no_grad():
        for batch in batches:
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                real = ids[: int(mask.sum())].unsqueeze(0)  # no padding at all
                hidden = module.model(real, output_hidden_states=True).hidden_states[-2][0]
                expected.append(0.5 * (hidden.mean(0) + hidden[-1]))
    assert embeddings.shape == (len(dm.tracking_records), D_MODEL)
    torch.testing.assert_close(embeddings, torch.stack(expected), rtol=1e-4, atol=1e-5)


def test_tracking_embeddings__frozen_prefix_replay_equals_the_full_forward(tiny_tokenizer, records_path, tmp_path):
    from tests.conftest import make_llama

    model_dir = tmp_path / "llama-4-layers"
    make_llama(len(tiny_tokenizer), num_layers=4).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    # Embeddings and layer 0 frozen: after the first pass only layers 1 and 2 (the penultimate) run again.
    module = make_module(model_dir, tmp_path, freeze_layers=1, freeze_embeddings=True)
    send = SensitiveNeuronDropout(
        sensitivity_threshold=0.25, identify_every_n_epochs=1, drop_epochs=1, log_eigenscore=False
    )
    datamodule = make_datamodule(model_dir, records_path)
    replayed_from = []
    probe = pl.callbacks.LambdaCallback(
        on_train_epoch_end=lambda trainer, module: replayed_from.append(send._prefix_cache and send._prefix_cache[0])
    )
    fit(module, datamodule, tmp_path, [send, probe], max_epochs=2)
    assert replayed_from == [1, 1]
    assert not torch.equal(send.history[-1], send.history[0])  # the live layers did train
    full = SensitiveNeuronDropout().tracking_embeddings(_bare_trainer(datamodule), module)  # no cache yet
    torch.testing.assert_close(send.history[-1], full, rtol=1e-6, atol=1e-6)
