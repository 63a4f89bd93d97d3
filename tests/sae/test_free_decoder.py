"""Free decoder norms (``decoder_init_norm``, docs/sae.md, Free decoder norms): the forward against SAELens's
``rescale_acts_by_decoder_norm`` rule written out by hand, the folded unit-norm SAE against the free one, and the
exports against SAELens's and sparsify's own loaders."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from neurolight.lightning_modules import BatchTopK, MatryoshkaBatchTopK, SparseAutoencoder, TopK
from neurolight.lightning_modules.sae.formats import fold_input_scale_

D_IN, D_SAE = 16, 48


def free_sae(architecture, seed: int = 0) -> SparseAutoencoder:
    """An SAE with rows of unequal norms and nonzero biases, as training leaves them."""
    torch.manual_seed(seed)
    sae = SparseAutoencoder(D_IN, D_SAE, architecture)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) * 2 + 0.05)
        sae.W_enc.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    return sae


def saelens_rule(sae: SparseAutoencoder, x: torch.Tensor, k: int, batch: bool = False):
    """SAELens's TopK with rescale_acts_by_decoder_norm: hidden_pre = (x - b_dec) W_enc + b_enc, times ||W_dec row||;
    top k (per token, or k * batch over the batch); decode divides the latents by the norms again."""
    norms = sae.W_dec.norm(dim=1)
    hidden = ((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc) * norms
    if batch:
        flat = F.relu(hidden).flatten()
        values, indices = flat.topk(k * len(x))
        latents = torch.zeros_like(flat).scatter(0, indices, values).view_as(hidden)
    else:
        values, indices = hidden.topk(k, dim=-1)
        latents = torch.zeros_like(hidden).scatter(-1, indices, F.relu(values))
    return latents, (latents / norms) @ sae.W_dec + sae.b_dec


@pytest.mark.parametrize("batch", [False, True], ids=["topk", "batchtopk"])
def test_forward__equals_saelens_rule_with_its_gradients(batch):
    architecture = BatchTopK(k=4, decoder_init_norm=0.1) if batch else TopK(k=4, decoder_init_norm=0.1)
    sae = free_sae(architecture).train()
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(1))
    out = sae(x)
    out.mse.backward()
    ours = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    latents, x_hat = saelens_rule(sae, x, 4, batch)
    (x - x_hat).pow(2).sum(-1).mean().backward()
    torch.testing.assert_close(out.latents, latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.x_hat, x_hat, atol=1e-5, rtol=1e-5)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_auxk__reaches_dead_latents_through_the_free_norms():
    sae = free_sae(TopK(k=4, k_aux=8, decoder_init_norm=0.1)).train()
    x = torch.randn(32, D_IN)
    dead = torch.arange(D_SAE) % 3 == 0
    sae(x, dead_mask=dead).aux.backward()
    grad = sae.W_dec.grad.norm(dim=1)
    assert grad[dead].gt(0).any() and grad[~dead].eq(0).all()
    # The same loss on the folded SAE (unit rows, norms in the encoder): equal values.
    folded = sae.with_unit_decoder().train()
    torch.testing.assert_close(folded(x, dead_mask=dead).aux, sae(x, dead_mask=dead).aux)


@pytest.mark.parametrize(
    "architecture",
    [TopK(k=4, decoder_init_norm=0.1), BatchTopK(k=4, decoder_init_norm=0.1),
     MatryoshkaBatchTopK(k=4, group_sizes=[8, 16, 24], decoder_init_norm=0.1)],
    ids=["topk", "batchtopk", "matryoshka"],
)  # fmt: skip
def test_with_unit_decoder__same_latents_reconstruction_and_loss_from_unit_rows(architecture):
    sae = free_sae(architecture)
    folded = sae.with_unit_decoder()
    assert folded.architecture.decoder_init_norm is None and folded.normalize_decoder
    torch.testing.assert_close(folded.W_dec.norm(dim=1), torch.ones(D_SAE))
    x = torch.randn(64, D_IN)
    for mode in (True, False):
        sae.train(mode), folded.train(mode)
        ours, theirs = sae(x), folded(x)
        assert torch.equal(ours.latents > 0, theirs.latents > 0)
        for name in ("latents", "x_hat", "loss"):
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=1e-5, rtol=1e-5)


def test_init__rows_at_the_norm_encoder_tied_to_them_default_untouched():
    torch.manual_seed(3)
    unit = SparseAutoencoder(D_IN, D_SAE, TopK(k=4))
    torch.manual_seed(3)
    free = SparseAutoencoder(D_IN, D_SAE, TopK(k=4, decoder_init_norm=0.1))
    torch.testing.assert_close(free.W_dec.norm(dim=1), torch.full((D_SAE,), 0.1))
    torch.testing.assert_close(free.W_dec, unit.W_dec * 0.1)
    # The least-squares multiple of the unit rows, tied to the short ones (SAELens's init at encoder_init_scale 1).
    torch.testing.assert_close(free.W_enc, unit.W_enc * 0.1)
    assert not free.normalize_decoder and free.free_decoder_norms and not unit.free_decoder_norms
    torch.manual_seed(3)
    saelens_init = SparseAutoencoder(D_IN, D_SAE, TopK(k=4, encoder_init_scale=1.0, decoder_init_norm=0.1))
    assert torch.equal(saelens_init.W_enc, saelens_init.W_dec)
    with pytest.raises(ValueError, match="decoder_init_norm=0"):
        TopK(decoder_init_norm=0.0)


def test_exports__saelens_and_sparsify_load_the_folded_sae_and_neurolight_keeps_the_free_one(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sparsify = pytest.importorskip("sparsify")
    sae = free_sae(TopK(k=5, decoder_init_norm=0.1)).eval()
    x = torch.randn(64, D_IN)
    with torch.no_grad():
        latents, x_hat = sae.encode(x), sae.decode(sae.encode(x))
        sae.save_pretrained(tmp_path / "sl", format="saelens")
        theirs = sae_lens.SAE.load_from_disk(tmp_path / "sl")
        torch.testing.assert_close(theirs.encode(x), latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), x_hat, atol=1e-5, rtol=1e-5)
        sae.save_pretrained(tmp_path / "sp", format="sparsify")
        coder = sparsify.SparseCoder.load_from_disk(tmp_path / "sp")
        encoded = coder.encode(x)
        torch.testing.assert_close(coder.decode(encoded.top_acts, encoded.top_indices), x_hat, atol=1e-5, rtol=1e-5)
        sae.save_pretrained(tmp_path / "nl")
        back = SparseAutoencoder.from_pretrained(tmp_path / "nl")
        assert back.architecture == sae.architecture
        torch.testing.assert_close(back.W_dec, sae.W_dec)
        torch.testing.assert_close(back.decode(back.encode(x)), x_hat)
    with pytest.raises(ValueError, match="with_unit_decoder"):
        fold_input_scale_(sae, 2.0)


def test_checkpoint__a_normalised_run_loads_folded_into_raw_space(tmp_path):
    from neurolight.lightning_modules import SparseAutoencoderModule

    module = SparseAutoencoderModule(D_IN, D_SAE, TopK(k=4, decoder_init_norm=0.1))
    module.sae.load_state_dict(free_sae(TopK(k=4, decoder_init_norm=0.1)).state_dict())
    module.activation_scale.fill_(0.37)
    path = tmp_path / "free.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    sae = SparseAutoencoder.from_pretrained(path)
    assert sae.architecture.decoder_init_norm is None
    x = torch.randn(64, D_IN)
    module.sae.eval()
    with torch.no_grad():
        scaled = module.sae(x * 0.37)
        torch.testing.assert_close(sae.encode(x), scaled.latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.decode(sae.encode(x)), scaled.x_hat / 0.37, atol=1e-5, rtol=1e-5)
