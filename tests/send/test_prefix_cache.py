"""SendModule(cache_frozen_prefix=True): later epochs skip the frozen layers and train exactly as without the cache."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from neurolight.callbacks import SensitiveNeuronDropout
from neurolight.lightning_modules.send.module import decoder_layers
from neurolight.lightning_modules.send.prefix_cache import FrozenPrefixCache
from tests.helpers.send import fit, make_datamodule, make_module, write_records


@pytest.fixture(scope="module")
def records_path(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("prefix_cache") / "records.jsonl")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    from tests.conftest import make_llama

    path = tmp_path_factory.mktemp("llama-4-layers")
    make_llama(len(tiny_tokenizer), num_layers=4).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _fit(model_dir, records_path, tmp_path, cache: bool, send: bool = False, max_epochs: int = 3):
    module = make_module(model_dir, tmp_path, freeze_layers=2, freeze_embeddings=True, cache_frozen_prefix=cache)
    calls = []
    callbacks = [
        pl.callbacks.LambdaCallback(
            on_train_epoch_start=lambda trainer, module: calls.append(0),
            on_train_batch_end=lambda trainer, module, *args: calls.__setitem__(-1, calls[-1] + 1),
        )
    ]
    counted = []  # training forwards of layer 0's MLP per epoch: zero where the prefix was skipped
    if send:
        callbacks.append(
            SensitiveNeuronDropout(
                sensitivity_threshold=0.25, identify_every_n_epochs=1, drop_epochs=1, log_eigenscore=False
            )
        )
    datamodule = make_datamodule(model_dir, records_path)

    handles = []

    def count(trainer, module):
        counted.append(0)
        layer0 = decoder_layers(module.model)[0].mlp
        # Training forwards only: the SEND callback's tracking passes run in eval mode.
        handles.append(
            layer0.register_forward_hook(lambda mlp, *args: counted.__setitem__(-1, counted[-1] + mlp.training))
        )

    def stop(trainer, module):
        handles.pop().remove()

    callbacks.insert(0, pl.callbacks.LambdaCallback(on_train_epoch_start=count, on_train_epoch_end=stop))
    fit(module, datamodule, tmp_path, callbacks, max_epochs=max_epochs, limit_val_batches=0)
    return module, counted, calls


@pytest.mark.parametrize("send", [False, True], ids=["plain", "send"])
def test_fit_with_the_cache_equals_the_fit_without(model_dir, records_path, tmp_path, send):
    plain, counted_plain, _ = _fit(model_dir, records_path, tmp_path / "a", cache=False, send=send)
    cached, counted_cached, calls = _fit(model_dir, records_path, tmp_path / "b", cache=True, send=send)
    # Without the cache layer 0 runs once per training batch every epoch; with it, only in the first epoch.
    assert counted_plain == calls
    assert counted_cached == [calls[0], 0, 0]
    assert cached.prefix_cache.hits == 2 * calls[0] and cached.prefix_cache.misses == calls[0]
    trained = {name for name, p in plain.model.named_parameters() if p.requires_grad}
    assert trained and all(
        name.startswith(("model.layers.2", "model.layers.3", "model.norm", "lm_head")) for name in trained
    )
    # Equal up to float32 rounding: a cached row was computed in another batch, padded to another length, and Adam
    # at lr 1e-2 carries such 1e-7 differences into the weights.
    expected = dict(plain.model.named_parameters())
    for name, param in cached.model.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(p, q) for p, q in zip(plain.model.parameters(), make_reference(model_dir).parameters()))


def make_reference(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def test_cached_rows_are_layer_inputs_of_each_sequence_alone(model_dir, records_path, tmp_path):
    module = make_module(model_dir, tmp_path, freeze_layers=2, freeze_embeddings=True, cache_frozen_prefix=True)
    module.configure_model()
    datamodule = make_datamodule(model_dir, records_path)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert (batch["attention_mask"] == 0).any(), "the test needs a padded batch"
    with torch.no_grad():
        module.loss(batch)
        assert module.prefix_cache.misses == 1 and len(module.prefix_cache) == len(batch["input_ids"])
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            real = ids[mask.bool()].unsqueeze(0)
            hidden = module.model(real, output_hidden_states=True).hidden_states[2][0]  # input of layer 2
            key = FrozenPrefixCache.keys(ids.unsqueeze(0), mask.unsqueeze(0))[0]
            torch.testing.assert_close(module.prefix_cache.rows[key], hidden, rtol=1e-5, atol=1e-6)
        # The same batch again skips the prefix and gives the same loss.
        first = module.loss(batch)
        assert module.prefix_cache.hits == 1
        torch.testing.assert_close(module.loss(batch), first)
    # The patched layers got their own forward back.
    assert all("forward" not in vars(layer) for layer in decoder_layers(module.model))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"freeze_layers": 2, "freeze_embeddings": False}, "freeze_embeddings: true"),
        ({"freeze_layers": 0, "freeze_embeddings": True}, "0 < freeze_layers < 4"),
        ({"freeze_layers": 4, "freeze_embeddings": True}, "0 < freeze_layers < 4"),
    ],
)
def test_refuses_a_prefix_that_is_not_frozen(model_dir, tmp_path, kwargs, message):
    module = make_module(model_dir, tmp_path, cache_frozen_prefix=True, **kwargs)
    with pytest.raises(ValueError, match=message):
        module.configure_model()


def test_refuses_a_prefix_with_dropout(tiny_tokenizer, tmp_path):
    from tests.conftest import make_llama

    model = make_llama(len(tiny_tokenizer), num_layers=4)
    model.config.attention_dropout = 0.1
    model.save_pretrained(tmp_path / "dropout")
    tiny_tokenizer.save_pretrained(tmp_path / "dropout")
    module = make_module(
        tmp_path / "dropout", tmp_path, freeze_layers=2, freeze_embeddings=True, cache_frozen_prefix=True
    )
    with pytest.raises(ValueError, match="attention_dropout"):
        module.configure_model()


def test_refuses_left_padding(model_dir, tmp_path):
    cache = FrozenPrefixCache(1)
    layers = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
    with pytest.raises(ValueError, match="right-padded"):
        with cache.around(layers, torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]])):
            pass
