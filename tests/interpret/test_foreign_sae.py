"""Sampling and interpretation of an SAE that arrives in SAELens's format, written by SAELens itself: the same
samples as from the neurolight checkpoint it came from, and interpretations stored under a name from its metadata."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from neurolight.callbacks import InterpretationWriter, SQLiteStore
from neurolight.callbacks.interpret.stores.base import sae_index_name
from neurolight.datamodules import InterpretationDataModule
from neurolight.datamodules.interpret.samples import InterpretationSamples
from neurolight.lightning_modules import LatentInterpreter, LatentSampler, SparseAutoencoder
from tests.helpers.sae import build_sampler_sae
from tests.interpret.test_latent_sampler import run_sampler

sae_lens = pytest.importorskip("sae_lens")


@pytest.fixture(scope="module")
def sae_run(tmp_path_factory, tiny_model_dir):
    return build_sampler_sae(tmp_path_factory.mktemp("sampler"), tiny_model_dir)


@pytest.fixture(scope="module")
def saelens_dir(sae_run, tmp_path_factory):
    """The sampler's tiny TopK SAE, exported to SAELens's format, stripped of what neurolight adds, then loaded and
    saved again by SAELens: a directory that only SAELens wrote."""
    root = tmp_path_factory.mktemp("foreign")
    SparseAutoencoder.from_pretrained(sae_run[2]).save_pretrained(root / "export", format="saelens")
    cfg_path = root / "export" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["metadata"]["neurolight"]
    cfg_path.write_text(json.dumps(cfg))
    sae_lens.SAE.load_from_disk(root / "export").save_model(root / "saelens")
    return root / "saelens"


@pytest.mark.usefixtures("one_torch_thread")
def test_saelens_sae__samples_like_its_neurolight_checkpoint_and_interprets_into_a_store(
    sae_run, saelens_dir, tiny_model_dir, tmp_path
):
    _, corpus, checkpoint = sae_run
    metadata = SparseAutoencoder.from_pretrained(saelens_dir).metadata
    assert (metadata.source_format, metadata.layer_type, metadata.layer_id) == ("saelens", "mlp_activations", 1)
    assert metadata.exclude_first_position is None  # SAELens does not record it: sampling defaults to True
    run_sampler(checkpoint, corpus, tmp_path / "from_ckpt")
    run_sampler(saelens_dir, corpus, tmp_path / "from_saelens")
    ours, theirs = InterpretationSamples(tmp_path / "from_ckpt"), InterpretationSamples(tmp_path / "from_saelens")
    assert torch.equal(theirs.latents, ours.latents)
    for name in ("frequency", "max_activation", "top_activations", "quantile_activations"):
        torch.testing.assert_close(theirs.tensors[name], ours.tensors[name], atol=1e-4, rtol=1e-4, msg=name)
    assert torch.equal(theirs.tensors["top_context"], ours.tensors["top_context"])
    meta = theirs.metadata
    assert meta["sae_source_format"] == "saelens" and meta["exclude_first_position"] is True
    assert meta["sae_hook_name"] == "blocks.1.mlp.hook_post"

    store = tmp_path / "store.sqlite"
    writer = InterpretationWriter(store=SQLiteStore(str(store)))
    data = InterpretationDataModule(
        str(tmp_path / "from_saelens"), num_interpretation_samples=2, num_simulation_samples=2,
        num_detection_samples=2, batch_size=2, max_latents=2,
    )  # fmt: skip
    module = LatentInterpreter(explainer_model=str(tiny_model_dir), max_explanation_tokens=4, forward_batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, callbacks=[writer],
                         default_root_dir=str(tmp_path))  # fmt: skip
    trainer.predict(module, datamodule=data, return_predictions=False)
    index = sae_index_name(meta)
    assert index.startswith(f"{tiny_model_dir.name}_mlp_activations_l1_128x256".lower()) and index.endswith("_topk")
    reader = SQLiteStore(str(store))
    reader.open(index, meta, create=False)
    assert len(reader.stored_latents()) == 2
    reader.close()


def test_saelens_sae__whose_hook_has_no_site_names_the_accepted_forms(saelens_dir, tmp_path):
    cfg = json.loads((saelens_dir / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.1.attn.hook_z"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "sae_weights.safetensors").write_bytes((saelens_dir / "sae_weights.safetensors").read_bytes())
    with pytest.raises(
        ValueError, match=r"no neurolight site for the hook name 'blocks.1.attn.hook_z'.*accepted forms"
    ):
        LatentSampler(str(tmp_path))
    sampler = LatentSampler(str(tmp_path), layer_type="mlp_activations", layer_id=1)  # the site given directly
    assert sampler.llm_settings["layer_type"] == "mlp_activations"


def test_saelens_sae__d_in_that_does_not_match_the_site_is_refused(saelens_dir, tiny_model_dir):
    sampler = LatentSampler(str(saelens_dir), layer_type="mlp_sublayer")  # width 64, the SAE expects 128
    with pytest.raises(ValueError, match=r"gives d_in=64, but the SAE in .* expects 128"):
        sampler.configure_model()
