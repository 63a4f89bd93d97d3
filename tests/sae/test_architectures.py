"""The architecture extension point: the registry finds classes by name and refuses unknown names and foreign
settings, an architecture round-trips through its checkpoint form, its tensors keep their state-dict keys, the
module records it as a mapping (and reads checkpoints of the earlier flat form) and warns when L0 stays high, and
the default settings give a sparse SAE."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from neurolight.lightning_modules import (
    BatchTopK,
    JumpReLU,
    MatryoshkaBatchTopK,
    ReLU,
    SparseAutoencoder,
    SparseAutoencoderModule,
    TopK,
)
from neurolight.lightning_modules.sae.architectures import (
    ARCHITECTURES,
    architecture_class,
    architecture_config,
    architecture_name,
    build_architecture,
)
from neurolight.lightning_modules.sae.checkpoint_args import init_args_from_checkpoint
from tests.helpers.sae import synthetic_sparse_data, train_sae

EXAMPLES = [
    ReLU(l1_coefficient=2.0, normalize_decoder=False),
    TopK(k=8, auxk_coefficient=0.1, k_aux=4),
    BatchTopK(k=8, threshold_momentum=0.9),
    JumpReLU(l0_coefficient=3.0, bandwidth=0.2, init_threshold=0.5),
    MatryoshkaBatchTopK(k=8, group_sizes=[8, 24, 32]),
]


def test_registry__finds_each_class_by_name_class_name_and_class_path():
    for name, cls in ARCHITECTURES.items():
        assert architecture_class(name) is cls
        assert architecture_class(cls.__name__) is cls
        assert architecture_class(f"neurolight.lightning_modules.{cls.__name__}") is cls
        assert architecture_class(f"{cls.__module__}.{cls.__name__}") is cls
        assert architecture_name(cls()) == name


def test_registry__unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'gated'.*relu \(ReLU\), topk \(TopK\).*matryoshka_batchtopk"):
        architecture_class("gated")
    with pytest.raises(ValueError, match=r"unknown SAE architecture 'torch\.nn\.Linear'"):
        architecture_class("torch.nn.Linear")  # a class, but no Architecture


@pytest.mark.parametrize("architecture", EXAMPLES, ids=lambda a: type(a).__name__)
def test_config__round_trips_through_the_checkpoint_mapping(architecture):
    config = architecture_config(architecture)
    assert config["class_path"] == f"neurolight.lightning_modules.{type(architecture).__name__}"
    assert build_architecture(config) == architecture
    assert set(config["init_args"]) == set(type(architecture).setting_names())


def test_build__refuses_the_settings_of_another_architecture():
    with pytest.raises(ValueError, match=r"ReLU has no setting k; its settings are l1_coefficient, normalize_decoder"):
        build_architecture({"class_path": "ReLU", "init_args": {"k": 32}})
    with pytest.raises(ValueError, match="JumpReLU has no setting l1_coefficient"):
        build_architecture({"class_path": "jumprelu", "init_args": {"l1_coefficient": 1.0}})
    with pytest.raises(TypeError):
        ReLU(k=32)


def test_tensors__registered_on_the_sae_under_the_checkpoint_keys():
    torch.manual_seed(0)
    keys = {name: set(SparseAutoencoder(8, 64, name).state_dict()) for name in ARCHITECTURES}
    base = {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert keys["relu"] == keys["topk"] == base
    assert keys["jumprelu"] == base | {"log_threshold"}
    assert keys["batchtopk"] == keys["matryoshka_batchtopk"] == base | {"threshold"}
    jumprelu = SparseAutoencoder(8, 16, JumpReLU(init_threshold=0.5))
    assert isinstance(jumprelu.log_threshold, torch.nn.Parameter)
    torch.testing.assert_close(jumprelu.log_threshold.exp(), torch.full((16,), 0.5))
    assert "threshold" in dict(SparseAutoencoder(8, 16, BatchTopK(k=2)).named_buffers())


def test_resample_resets__name_what_each_architecture_must_reset():
    assert ReLU().resample_resets() == TopK().resample_resets() == []
    assert JumpReLU(init_threshold=0.02).resample_resets() == [("log_threshold", math.log(0.02))]
    assert BatchTopK().resample_resets() == MatryoshkaBatchTopK().resample_resets() == [("threshold", -1.0)]


def test_decoder_constraint__unit_norm_except_where_the_penalty_cannot_be_gamed():
    assert TopK().normalize_decoder and BatchTopK().normalize_decoder and ReLU().normalize_decoder
    assert not JumpReLU().normalize_decoder and not ReLU(normalize_decoder=False).normalize_decoder


def test_module__records_the_architecture_as_a_mapping_and_loads_it_back(tmp_path):
    module = SparseAutoencoderModule(16, 32, TopK(k=4))
    assert module.hparams.architecture == {
        "class_path": "neurolight.lightning_modules.TopK",
        "init_args": {
            "k": 4,
            "auxk_coefficient": 1 / 32,
            "k_aux": None,
            "encoder_init_scale": None,
            "decoder_init_norm": None,
        },
    }
    restored = SparseAutoencoderModule(**init_args_from_checkpoint(dict(module.hparams)))
    assert restored.sae.architecture == TopK(k=4)
    assert SparseAutoencoderModule(16, 32).sae.architecture == ReLU()  # the default


@pytest.mark.parametrize(
    ("flat", "expected"),
    [
        (
            {"architecture": "topk", "k": 8, "l1_coefficient": 1e-3, "auxk_coefficient": 0.5, "k_aux": None},
            TopK(8, 0.5),
        ),
        ({"architecture": "relu", "k": None, "l1_coefficient": 0.5}, ReLU(l1_coefficient=0.5)),
        ({"architecture": "batchtopk", "k": 4, "l1_coefficient": 1e-3}, BatchTopK(k=4)),
        ({"architecture": "jumprelu", "k": None, "l1_coefficient": 0.01}, JumpReLU(0.01, 1e-3, 1e-3)),
    ],
)
def test_init_args_from_checkpoint__translates_the_flat_hyperparameters_of_earlier_checkpoints(flat, expected):
    hparams = {"_instantiator": "x", "act_vec_size": 16, "dict_vec_size": 32, "learning_rate": 1e-3, **flat}
    args = init_args_from_checkpoint(hparams)
    assert args["act_vec_size"] == 16 and "_instantiator" not in args and "k" not in args
    assert SparseAutoencoderModule(**args).sae.architecture == expected


def record_dense_warnings(module, l0_per_window):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for l0 in l0_per_window:
            module._warn_if_dense(l0)
    return [str(w.message) for w in caught]


def test_dense_warning__names_the_setting_once_l0_stays_above_the_fraction_of_d_in():
    module = SparseAutoencoderModule(100, 400, ReLU(l1_coefficient=1e-3), max_l0_fraction=0.1)
    # Falling fast (by more than 10% a window) or below 10 latents: the penalty is still working, or it worked.
    assert record_dense_warnings(module, [300, 200, 150, 9, 9, 50]) == []
    messages = record_dense_warnings(module, [40, 40])  # above 0.1 * d_in and not falling
    assert len(messages) == 1
    assert (
        "L0 = 40" in messages[0]
        and "raise model.init_args.architecture.init_args.l1_coefficient (now 0.001)" in (messages[0])
    )
    assert record_dense_warnings(module, [40, 40, 40]) == []  # once per run

    topk = SparseAutoencoderModule(100, 400, TopK(k=64), max_l0_fraction=0.1)
    assert record_dense_warnings(topk, [64, 64, 64]) == []  # L0 = k is what the recipe asked for
    quiet = SparseAutoencoderModule(100, 400, ReLU(), max_l0_fraction=None)
    assert record_dense_warnings(quiet, [99, 99, 99]) == []


def trained_l0(architecture) -> float:
    """L0 on held-out rows of 4 of 256 features (magnitudes 2 to 6) in 64 dimensions, scaled as the module scales
    LLM activations (E||x|| = sqrt(d_in)), after 300 steps."""
    data = synthetic_sparse_data(8192, 64, 256, active=4, seed=0, magnitudes=(2, 6))
    held_out = synthetic_sparse_data(2048, 64, 256, active=4, seed=1, magnitudes=(2, 6))
    scale = 64**0.5 / data.norm(dim=1).mean()
    torch.manual_seed(0)
    sae = train_sae(SparseAutoencoder(64, 256, architecture), data * scale, steps=300, lr=1e-3)
    with torch.no_grad():
        return float((sae.eval().encode(held_out * scale) > 0).sum(-1).float().mean())


@pytest.mark.parametrize(
    ("default", "earlier_default"), [(ReLU(), ReLU(l1_coefficient=1e-3)), (JumpReLU(), JumpReLU(1e-3, 1e-3, 1e-3))]
)
def test_defaults__give_a_sparse_sae_where_the_earlier_ones_did_not(default, earlier_default):
    # 4 features per row: the defaults stay under 16 latents of 256 (d_in / 4); the earlier 1e-3 gave over 100.
    assert trained_l0(default) < 16
    assert trained_l0(earlier_default) > 100
