"""`neurolight validate` of any SAE: every metric against a computation from the weights, for a neurolight
checkpoint and a sparsify SAE."""

from __future__ import annotations

import json
import pathlib

import lightning.pytorch as pl
import pytest
import torch
from torch.nn import functional as F

from neurolight.datamodules import CorpusContextDataModule
from neurolight.lightning_modules import SaeEvaluator, SparseAutoencoder
from tests.helpers.sae import build_sampler_sae

CONTEXTS, T = 32, 16
# Batch means pooled in float32 against one full-batch computation; the CE recovered, a ratio of differences of
# nearby CEs, carries ten times their relative error.
TOLERANCE = {"ce_loss_recovered": 2e-3}


@pytest.fixture(scope="module")
def sae_run(tmp_path_factory, tiny_model_dir):
    return build_sampler_sae(tmp_path_factory.mktemp("evaluator"), tiny_model_dir)


def validate(sae, corpus, tmp_path, **overrides):
    module = SaeEvaluator(str(sae), report_path=str(tmp_path / "report.json"), **overrides)
    data = CorpusContextDataModule(str(corpus), frequency_tokens=CONTEXTS * T, num_samples=1, batch_size=8)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))  # fmt: skip
    [metrics] = trainer.validate(module, datamodule=data, verbose=False)
    data.setup("validate")
    return metrics, data.contexts(data.frequency_rows()), json.loads((tmp_path / "report.json").read_text())


def by_hand(model_dir, sae: SparseAutoencoder, input_ids: torch.Tensor, hook: str, reads_input: bool) -> dict:
    """Every metric from the weights: the site's activations by a hook, position 0 left out and kept clean."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    module = dict(model.named_modules())[hook]
    captured = []
    if reads_input:
        handle = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    else:
        handle = module.register_forward_hook(
            lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
    with torch.no_grad():
        clean = model(input_ids).logits
    handle.remove()
    acts = captured[0][:, 1:]
    x = acts.reshape(-1, acts.shape[-1])
    with torch.no_grad():
        latents = sae.encode(x)
        x_hat = sae.decode(latents)
    fired = (latents > 0).sum(0)

    def spliced_logits(replace):
        def swap(value):
            return torch.cat([value[:, :1], replace(value[:, 1:])], dim=1)

        if reads_input:
            h = module.register_forward_pre_hook(lambda _m, args: (swap(args[0]), *args[1:]))
        else:
            h = module.register_forward_hook(lambda _m, _a, out: swap(out))
        try:
            with torch.no_grad():
                return model(input_ids).logits
        finally:
            h.remove()

    def ce(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))

    spliced = spliced_logits(lambda a: sae.decode(sae.encode(a)))
    zero = spliced_logits(torch.zeros_like)
    ce_clean, ce_spliced, ce_zero = ce(clean), ce(spliced), ce(zero)
    log_p, log_q = clean[:, :-1].log_softmax(-1), spliced[:, :-1].log_softmax(-1)
    return {
        "l0": (latents > 0).sum(-1).float().mean(),
        "explained_variance": 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum(),
        "dead_fraction": (fired == 0).float().mean(),
        "tokens": torch.tensor(float(len(x))),
        "ce_clean": ce_clean,
        "ce_spliced": ce_spliced,
        "ce_loss_recovered": (ce_zero - ce_spliced) / (ce_zero - ce_clean),
        "kl": (log_p.exp() * (log_p - log_q)).sum(-1).mean(),
    }


@pytest.mark.usefixtures("one_torch_thread")
def test_validate__neurolight_checkpoint_metrics_equal_a_computation_from_the_weights(
    sae_run, tiny_model_dir, tmp_path
):
    _, corpus, checkpoint = sae_run
    metrics, input_ids, report = validate(checkpoint, corpus, tmp_path)
    sae = SparseAutoencoder.from_pretrained(checkpoint)
    expected = by_hand(tiny_model_dir, sae, input_ids, "model.layers.1.mlp.down_proj", reads_input=True)
    for name, value in expected.items():
        rel = TOLERANCE.get(name, 1e-4)
        assert metrics[f"eval/{name}"] == pytest.approx(float(value), rel=rel, abs=1e-5), name
        assert report["metrics"][name] == pytest.approx(float(value), rel=rel, abs=1e-5), name
    assert report["site"] == {"model_name": str(tiny_model_dir), "layer_type": "mlp_activations", "layer_id": 1,
                              "exclude_first_position": True}  # fmt: skip


@pytest.mark.usefixtures("one_torch_thread")
def test_validate__sparsify_sae_on_the_residual_stream(sae_run, tiny_model_dir, tmp_path):
    sparsify = pytest.importorskip("sparsify")
    coder = sparsify.SparseCoder(64, sparsify.SparseCoderConfig(k=4, num_latents=96))
    with torch.no_grad():
        coder.encoder.bias.normal_(0, 0.1)
        coder.b_dec.normal_(0, 0.1)
    run = tmp_path / "run"
    coder.save_to_disk(run / "layers.0")  # sparsify's name of the residual stream leaving layer 0
    (run / "config.json").write_text(json.dumps({"model": str(tiny_model_dir), "ctx_len": T}))
    metrics, input_ids, _ = validate(run / "layers.0", sae_run[1], tmp_path)
    sae = SparseAutoencoder.from_pretrained(run / "layers.0")
    expected = by_hand(tiny_model_dir, sae, input_ids, "model.layers.0", reads_input=False)
    for name, value in expected.items():
        assert metrics[f"eval/{name}"] == pytest.approx(float(value), rel=TOLERANCE.get(name, 1e-4), abs=1e-5), name


@pytest.mark.usefixtures("one_torch_thread")
def test_validate_command__the_recipe_on_a_saelens_export_writes_its_report(sae_run, tmp_path, capsys):
    import yaml

    from neurolight.cli.main import main as neurolight
    from neurolight.configs import __file__ as configs_init

    _, corpus, checkpoint = sae_run
    SparseAutoencoder.from_pretrained(checkpoint).save_pretrained(tmp_path / "saelens", format="saelens")
    recipe = yaml.safe_load((pathlib.Path(configs_init).parent / "sae" / "validate.yaml").read_text())
    recipe["trainer"].update(default_root_dir=str(tmp_path), enable_progress_bar=False)
    recipe["model"]["init_args"].update(sae=str(tmp_path / "saelens"), report_path=str(tmp_path / "report.json"))
    recipe["data"]["init_args"].update(dataset_path=str(corpus), frequency_tokens=CONTEXTS * T)
    (tmp_path / "validate.yaml").write_text(yaml.safe_dump(recipe))
    neurolight(["validate", "--config", str(tmp_path / "validate.yaml")])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metadata"]["source_format"] == "saelens" and report["metrics"]["tokens"] == CONTEXTS * (T - 1)
    assert 0 < report["metrics"]["l0"] <= 8 and report["metrics"]["explained_variance"] is not None
    with pytest.raises(SystemExit) as exit_info:  # a message: Python prints it and exits with status 1
        neurolight(["validate", "--config", str(tmp_path / "validate.yaml"), "--model.init_args.sae", str(tmp_path)])
    message = str(exit_info.value.code)
    assert message.startswith("neurolight: error: ") and "\n" not in message and "Union" not in message
    assert f"{tmp_path} holds SAEs in its subfolders (saelens)" in message
