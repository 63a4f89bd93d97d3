"""SAEs in and out of neurolight, checked against SAELens and sparsify themselves (their own save and load, their
own encode and decode), never against a copy of their code."""

from __future__ import annotations

import json

import pytest
import torch

from neurolight.lightning_modules import BatchTopK, JumpReLU, ReLU, SparseAutoencoder, SparseAutoencoderModule, TopK
from neurolight.lightning_modules.sae.checkpoint_args import init_args_from_checkpoint
from neurolight.lightning_modules.sae.formats import fold_input_scale_
from tests.helpers.sae import build_sampler_sae

sae_lens = pytest.importorskip("sae_lens")
sparsify = pytest.importorskip("sparsify")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A TopK SAE trained by `neurolight fit` on the tiny Llama (its normalisation scalar is not 1), and its module."""
    _, _, checkpoint = build_sampler_sae(tmp_path_factory.mktemp("formats"), tiny_model_dir)
    state = torch.load(checkpoint, weights_only=True)
    module = SparseAutoencoderModule(**init_args_from_checkpoint(state["hyper_parameters"]))
    module.load_state_dict(state["state_dict"])
    assert abs(float(module.activation_scale) - 1) > 0.05
    return checkpoint, module.eval()


def raw_inputs(d_in: int, n: int = 64, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))


def assert_same_codes(latents: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(latents > 0, expected > 0), "active sets differ"
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)


def random_sae(architecture, d_in=16, d_sae=48, seed=0, scale=1.0) -> SparseAutoencoder:
    """An SAE with non-trivial weights (nonzero biases, thresholds), trained on `scale * x` (scale folded in)."""
    torch.manual_seed(seed)
    sae = SparseAutoencoder(d_in, d_sae, architecture)
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.normal_(0, 0.5)
        sae.b_dec.normal_(0, 0.5)
        if isinstance(architecture, JumpReLU):
            sae.log_threshold.copy_(torch.rand(d_sae).mul(2).add(0.1).log())
        if isinstance(architecture, BatchTopK):
            sae.threshold.fill_(1.3)
    fold_input_scale_(sae, scale)
    return sae.eval()


# ------------------------------------------------------------------------------------------------ neurolight
def test_checkpoint__raw_activations_give_the_modules_codes_and_reconstruction(trained):
    checkpoint, module = trained
    sae = SparseAutoencoder.from_pretrained(checkpoint)
    x = raw_inputs(128)
    with torch.no_grad():
        assert_same_codes(sae.encode(x), module.sae.encode(module.normalize(x)))
        torch.testing.assert_close(sae.decode(sae.encode(x)), module.reconstruct(x), atol=1e-4, rtol=1e-4)
    meta = sae.metadata
    assert (meta.layer_type, meta.layer_id, meta.context_size, meta.exclude_first_position) == (
        "mlp_activations",
        1,
        16,
        True,
    )
    assert meta.source_format == "neurolight-checkpoint" and meta.activation_scale == float(module.activation_scale)
    assert meta.training["learning_rate"] == module.hparams.learning_rate
    assert meta.training["decoder_lr_multiplier"] == module.hparams.decoder_lr_multiplier == 2.0  # TopK's default


def test_module_save_pretrained__folds_the_scale_as_the_checkpoint_does_and_its_sae_alone_is_refused(trained, tmp_path):
    checkpoint, module = trained
    with pytest.raises(ValueError, match=r"normalised activations.*module\.save_pretrained\(directory, format\)"):
        module.sae.save_pretrained(tmp_path / "refused", format="saelens")
    assert not (tmp_path / "refused").exists()
    module.save_pretrained(tmp_path / "out", format="saelens")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "out", device="cpu")
    ours = SparseAutoencoder.from_pretrained(checkpoint)
    x = raw_inputs(128)
    with torch.no_grad():
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), module.reconstruct(x), atol=1e-4, rtol=1e-4)
        assert_same_codes(theirs.encode(x), ours.encode(x))
    assert module.sae.expects_scaled_input  # the module's own SAE is untouched
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "out").iterdir()}
    assert modes["sae_weights.safetensors"] == modes["cfg.json"]  # safetensors alone would make it 0600
    assert SparseAutoencoder.from_pretrained(tmp_path / "out").metadata.layer_type is None  # no data module attached


@pytest.mark.parametrize("fmt", ["neurolight", "saelens", "sparsify"])
def test_round_trip__same_codes_and_metadata_through_every_format(trained, tmp_path, fmt):
    sae = SparseAutoencoder.from_pretrained(trained[0])
    sae.save_pretrained(tmp_path / fmt, format=fmt)
    back = SparseAutoencoder.from_pretrained(tmp_path / fmt)
    x = raw_inputs(128, seed=1)
    with torch.no_grad():
        assert_same_codes(back.encode(x), sae.encode(x))
        torch.testing.assert_close(back.decode(back.encode(x)), sae.decode(sae.encode(x)))
    assert back.architecture == sae.architecture
    assert back.metadata.source_format == fmt
    kept = {k: v for k, v in sae.metadata.to_dict().items() if k not in ("source_format", "source")}
    assert {k: v for k, v in back.metadata.to_dict().items() if k in kept} == kept


# -------------------------------------------------------------------------------------- neurolight -> SAELens
@pytest.mark.parametrize(
    "architecture, saelens_class",
    [(ReLU(), "StandardSAE"), (TopK(k=5), "TopKSAE"), (JumpReLU(), "JumpReLUSAE"), (BatchTopK(k=5), "JumpReLUSAE")],
    ids=["relu", "topk", "jumprelu", "batchtopk"],
)
def test_to_saelens__its_loader_reproduces_neurolights_encode_and_decode(tmp_path, architecture, saelens_class):
    sae = random_sae(architecture, scale=0.37)
    frequency = torch.rand(sae.d_sae) * (torch.rand(sae.d_sae) > 0.2)
    sae.save_pretrained(tmp_path, format="saelens", firing_frequency=frequency)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert type(theirs).__name__ == saelens_class
    x = raw_inputs(16)
    with torch.no_grad():
        ours = sae.encode(x)
        assert_same_codes(theirs.encode(x), ours)
        torch.testing.assert_close(theirs.decode(ours), sae.decode(ours), atol=1e-5, rtol=1e-5)
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(tmp_path / "sparsity.safetensors")["sparsity"], (frequency + 1e-10).log10())


def test_to_saelens__trained_checkpoint_through_the_export_command(trained, tmp_path, capsys):
    from neurolight.cli.export import main

    checkpoint, module = trained
    main([str(checkpoint), str(tmp_path / "out"), "--format", "saelens"])
    assert "saelens" in capsys.readouterr().out
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.mlp.hook_post" and cfg["k"] == 8
    x = raw_inputs(128, seed=2)
    with torch.no_grad():
        expected = module.sae.encode(module.normalize(x))
        assert_same_codes(theirs.encode(x), expected)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), module.reconstruct(x), atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------------------------- SAELens -> neurolight
def saelens_sae(architecture: str, seed: int = 0, d_in: int = 16, d_sae: int = 48, **settings):
    cfg_class = {
        "standard": sae_lens.StandardSAEConfig,
        "topk": sae_lens.TopKSAEConfig,
        "jumprelu": sae_lens.JumpReLUSAEConfig,
    }[architecture]
    sae = sae_lens.SAE.from_dict(cfg_class(d_in=d_in, d_sae=d_sae, **settings).to_dict())
    randomize(sae, seed)
    return sae


def randomize(sae, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            values = torch.randn(parameter.shape, generator=generator)
            if name == "threshold":
                values = values.abs() + 0.1
            elif name == "W_dec":
                values = values * (0.5 + torch.rand(parameter.shape[0], 1, generator=generator))  # not unit norm
            parameter.copy_(values * (0.5 if name.startswith("b_") else 1.0))


@pytest.mark.parametrize(
    "architecture, settings",
    [
        ("standard", {}),
        ("standard", {"apply_b_dec_to_input": False}),
        ("topk", {"k": 6}),
        ("topk", {"k": 6, "rescale_acts_by_decoder_norm": True}),
        ("jumprelu", {}),
    ],
    ids=["standard", "standard-no-b_dec-in", "topk", "topk-rescaled", "jumprelu"],
)
def test_from_saelens__reproduces_its_encode_and_decode(tmp_path, architecture, settings):
    theirs = saelens_sae(architecture, **settings)
    theirs.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    theirs.cfg.metadata.model_name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    theirs.save_model(tmp_path)
    ours = SparseAutoencoder.from_pretrained(tmp_path)
    x = raw_inputs(16)
    with torch.no_grad():
        codes = theirs.encode(x)
        assert_same_codes(ours.encode(x), codes)
        torch.testing.assert_close(ours.decode(codes), theirs.decode(codes), atol=1e-5, rtol=1e-5)
    assert (ours.metadata.layer_type, ours.metadata.layer_id) == ("resid_post", 1)
    assert ours.metadata.model_name == "smollm2-135m"  # the published id maps back to the offline short name


@pytest.mark.parametrize("where", ["cfg", "scaler-file"])
def test_from_saelens__an_expected_average_factor_is_folded_in_from_the_config_or_the_scaler_file(tmp_path, where):
    """SAELens's expected_average_only_in: its weights take x times a factor. The final SAE holds it folded in; a
    checkpoint written during training holds it in cfg.json or, from SAELens's trainer, in activation_scaler.json."""
    from sae_lens.training.activation_scaler import ActivationScaler

    factor = 2.5
    theirs = saelens_sae("topk", k=6, normalize_activations="expected_average_only_in")
    theirs.save_model(tmp_path)
    if where == "cfg":
        cfg = json.loads((tmp_path / "cfg.json").read_text())
        (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "norm_scaling_factor": factor}))
    else:
        ActivationScaler(scaling_factor=factor).save(str(tmp_path / "activation_scaler.json"))
    ours = SparseAutoencoder.from_pretrained(tmp_path)
    x = raw_inputs(16)
    with torch.no_grad():
        codes = theirs.encode(x * factor)
        assert_same_codes(ours.encode(x), codes)
        torch.testing.assert_close(ours.decode(codes), theirs.decode(codes) / factor, atol=1e-5, rtol=1e-5)
    if where == "scaler-file":
        (tmp_path / "activation_scaler.json").unlink()
        with pytest.raises(ValueError, match=r"no norm_scaling_factor, and no activation_scaler.json beside it"):
            SparseAutoencoder.from_pretrained(tmp_path)


def test_from_saelens__a_topk_sae_written_before_version_6_reads_as_topk_as_saelens_reads_it(tmp_path):
    theirs = saelens_sae("topk", k=4)
    theirs.save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    # As SAELens 5 wrote it: "standard" with the activation function saying TopK, and no version.
    cfg = {key: value for key, value in cfg.items() if key not in ("k", "sae_lens_version")}
    cfg["metadata"].pop("sae_lens_version", None)
    cfg.update(architecture="standard", activation_fn_str="topk", activation_fn_kwargs={"k": 4})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    reference = sae_lens.SAE.load_from_disk(tmp_path, device="cpu")
    ours = SparseAutoencoder.from_pretrained(tmp_path)
    assert type(reference).__name__ == "TopKSAE" and type(ours.architecture).__name__ == "TopK"
    x = raw_inputs(16)
    with torch.no_grad():
        assert_same_codes(ours.encode(x), reference.encode(x))
        assert (ours.encode(x) > 0).sum(-1).max() <= 4
    cfg.update(activation_fn_str="tanh-relu")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"from before version 6 with activation_fn 'tanh-relu'"):
        SparseAutoencoder.from_pretrained(tmp_path)


def test_from_saelens__batchtopk_as_saelens_publishes_it_and_in_its_training_format(tmp_path):
    from sae_lens import BatchTopKTrainingSAEConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE

    trainer_sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=16, d_sae=48, k=4))
    randomize(trainer_sae, 3)
    trainer_sae.topk_threshold = torch.tensor(0.8, dtype=torch.double)
    trainer_sae.save_inference_model(tmp_path / "inference")  # a JumpReLU with one threshold: SAELens's release form
    trainer_sae.save_model(tmp_path / "training")
    published = sae_lens.SAE.load_from_disk(tmp_path / "inference")
    x = raw_inputs(16, n=32)
    ours = SparseAutoencoder.from_pretrained(tmp_path / "inference")
    assert isinstance(ours.architecture, BatchTopK) and ours.architecture.k == 4
    with torch.no_grad():
        assert_same_codes(ours.encode(x), published.encode(x))
        training = SparseAutoencoder.from_pretrained(tmp_path / "training")
        assert_same_codes(training.encode(x), published.encode(x))  # the same threshold at inference
        training.train()  # and the batch rule while training: the k * batch largest of the batch
        assert_same_codes(training.encode(x), trainer_sae.encode(x))


# -------------------------------------------------------------------------------------- sparsify, both ways
def test_from_sparsify__reproduces_its_encode_and_decode_and_reads_the_site_from_its_run(tmp_path):
    coder = sparsify.SparseCoder(16, sparsify.SparseCoderConfig(k=5, num_latents=48))
    randomize(coder, 4)
    run = tmp_path / "run"
    coder.save_to_disk(run / "layers.1.mlp")
    (run / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "ctx_len": 64}))
    ours = SparseAutoencoder.from_pretrained(run / "layers.1.mlp")
    x = raw_inputs(16)
    with torch.no_grad():
        encoded = coder.encode(x)
        dense = torch.zeros(len(x), 48).scatter(1, encoded.top_indices, encoded.top_acts)
        assert_same_codes(ours.encode(x), dense)
        torch.testing.assert_close(ours.decode(dense), coder.decode(encoded.top_acts, encoded.top_indices))
    meta = ours.metadata
    assert (meta.model_name, meta.layer_type, meta.layer_id, meta.context_size) == (
        "smollm2-135m",
        "mlp_sublayer",
        1,
        64,
    )
    with pytest.raises(ValueError, match=r"holds SAEs in its subfolders \(layers.1.mlp\).*pass one of them"):
        (run / "config.json").unlink()
        SparseAutoencoder.from_pretrained(run)


def test_to_sparsify__its_loader_reproduces_neurolights_encode_and_decode(trained, tmp_path, caplog):
    sae = SparseAutoencoder.from_pretrained(trained[0])
    sae.save_pretrained(tmp_path, format="sparsify")
    with caplog.at_level("WARNING"):
        coder = sparsify.SparseCoder.load_from_disk(tmp_path)
    assert "Dropping extra args" not in caplog.text  # neurolight's record sits beside cfg.json, not in it
    x = raw_inputs(128, seed=5)
    with torch.no_grad():
        encoded = coder.encode(x)
        dense = torch.zeros(len(x), sae.d_sae).scatter(1, encoded.top_indices, encoded.top_acts)
        assert_same_codes(dense, sae.encode(x))
        torch.testing.assert_close(coder.decode(encoded.top_acts, encoded.top_indices), sae.decode(dense))


def test_to_sparsify__an_export_with_the_record_in_cfg_json_still_loads_with_its_metadata(trained, tmp_path):
    sae = SparseAutoencoder.from_pretrained(trained[0])
    sae.save_pretrained(tmp_path, format="sparsify")
    record = json.loads((tmp_path / "neurolight.json").read_text())
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, **record}))  # as exports before neurolight.json wrote it
    (tmp_path / "neurolight.json").unlink()
    loaded = SparseAutoencoder.from_pretrained(tmp_path)
    assert (loaded.metadata.layer_type, loaded.metadata.layer_id) == (sae.metadata.layer_type, sae.metadata.layer_id)
    assert loaded.metadata.activation_scale == sae.metadata.activation_scale


def test_from_sparsify__an_option_it_does_not_know_is_named_in_a_warning(tmp_path):
    coder = sparsify.SparseCoder(16, sparsify.SparseCoderConfig(k=5, num_latents=48))
    coder.save_to_disk(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "gram_lookup": True, "future_off": False}))
    with pytest.warns(UserWarning, match=r"sets gram_lookup=True, which this neurolight does not know") as caught:
        SparseAutoencoder.from_pretrained(tmp_path)
    assert "future_off" not in str(caught[0].message)  # an option left off changes nothing


# ------------------------------------------------------------------------------------------------- bad input
def test_bad_sources__say_what_each_format_needs(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"no known SAE format \(it holds notes.txt\).*cfg.json \+ sae_weights"):
        SparseAutoencoder.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SparseAutoencoder.from_pretrained(tmp_path / "missing")


def test_bad_sources__architecture_a_format_cannot_hold_names_the_ones_that_can(tmp_path):
    with pytest.raises(ValueError, match=r"sparsify format cannot hold.*ReLU; formats that can: neurolight, saelens"):
        random_sae(ReLU()).save_pretrained(tmp_path, format="sparsify")
    unestimated = SparseAutoencoder(8, 16, BatchTopK(k=2))
    with pytest.raises(ValueError, match=r"threshold is not estimated yet.*formats that can: neurolight"):
        unestimated.save_pretrained(tmp_path, format="saelens")


def test_bad_sources__truncated_weights_and_foreign_architectures_are_named(tmp_path):
    saelens_sae("topk", k=4).save_model(tmp_path / "sae")
    weights = tmp_path / "sae" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"cannot read the SAELens weights {weights}.*truncated"):
        SparseAutoencoder.from_pretrained(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(ValueError, match="'gated' SAE; neurolight reads the SAELens architectures standard, topk"):
        SparseAutoencoder.from_pretrained(tmp_path / "sae")


def test_hook_names__map_to_sites_and_unknown_ones_list_the_accepted_forms():
    from neurolight.datamodules.llm.hook_names import site_of_hook_name, sparsify_hook_name, transformer_lens_hook_name

    assert site_of_hook_name("blocks.15.hook_mlp_out") == ("mlp_sublayer", 15)
    assert site_of_hook_name("blocks.3.mlp.hook_post") == ("mlp_activations", 3)
    assert site_of_hook_name("blocks.0.hook_resid_pre") == ("resid_pre", 0)
    assert site_of_hook_name("model.layers.7") == ("resid_post", 7)
    assert site_of_hook_name("layers.7.self_attn") == ("attn_sublayer", 7)
    assert site_of_hook_name("model.layers.2.mlp.down_proj") == ("mlp_sublayer", 2)
    for site in ("resid_pre", "resid_post", "attn_sublayer", "mlp_sublayer", "mlp_activations"):
        assert site_of_hook_name(transformer_lens_hook_name(site, 4)) == (site, 4)
    assert site_of_hook_name(sparsify_hook_name("resid_pre", 4)) == ("resid_post", 3)  # the same activation
    with pytest.raises(ValueError, match=r"no neurolight site for the hook name 'blocks.1.attn.hook_z'.*accepted"):
        site_of_hook_name("blocks.1.attn.hook_z")


def test_export_command__bad_source_and_format_end_in_one_line(tmp_path, capsys):
    from neurolight.cli.export import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "empty"), str(tmp_path / "out"), "--format", "saelens"])
    message = str(exit_info.value.code)
    assert message.startswith("neurolight-export: error: ") and "\n" not in message
    assert "no known SAE format (it holds nothing)" in message and "cfg.json + sae.safetensors" in message
    random_sae(ReLU()).save_pretrained(tmp_path / "relu")
    with pytest.raises(SystemExit, match="formats that can: neurolight, saelens"):
        main([str(tmp_path / "relu"), str(tmp_path / "out"), "--format", "sparsify"])
    with pytest.raises(SystemExit, match=r"no neurolight site for the hook name 'blocks.0.hook_z'"):
        main([str(tmp_path / "relu"), str(tmp_path / "out"), "--format", "saelens", "--hook_name", "blocks.0.hook_z"])
    assert not (tmp_path / "out").exists()  # refused before anything was written
