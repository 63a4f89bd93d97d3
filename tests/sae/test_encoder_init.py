"""The tied initialisation's encoder scale (docs/sae.md, Initialisation): the TopK family's encoder starts as the
least-squares multiple of the unit-norm decoder, checked against a float64 reconstruction written out here; a set
``encoder_init_scale`` is used as given; the other architectures keep W_enc = W_dec."""

from __future__ import annotations

import pytest
import torch

from neurolight.lightning_modules.sae.architectures import BatchTopK, JumpReLU, MatryoshkaBatchTopK, ReLU, TopK
from neurolight.lightning_modules.sae.sparse_autoencoder import SparseAutoencoder

# k = d_in / 2 of 4 d_in latents: with W_enc = W_dec a unit-norm input's reconstruction is ~1.7 long.
D_IN, D_SAE, K = 16, 64, 8


def unit_probes(n: int, seed: int) -> torch.Tensor:
    u = torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))
    return u / u.norm(dim=1, keepdim=True)


def tied_topk_reconstruction(W_dec: torch.Tensor, u: torch.Tensor, k: int) -> torch.Tensor:
    """(n, d_in) reconstruction of u with W_enc = W_dec and zero biases, in float64, keeping each row's k largest
    pre-activations by a full sort."""
    W, u = W_dec.detach().double(), u.double()
    pre = u @ W.T
    kept = pre.argsort(dim=1, descending=True)[:, :k]
    latents = torch.zeros_like(pre).scatter(1, kept, pre.gather(1, kept).clamp_min(0))
    return latents @ W


def scale_of(sae: SparseAutoencoder) -> torch.Tensor:
    """(d_sae,) W_enc row / W_dec row, from their inner products (each row of W_dec has unit norm)."""
    return (sae.W_enc * sae.W_dec).sum(1).detach()


def test_topk__encoder_starts_as_the_least_squares_multiple_of_the_decoder():
    torch.manual_seed(0)
    sae = SparseAutoencoder(D_IN, D_SAE, TopK(k=K))
    c = scale_of(sae)
    torch.testing.assert_close(sae.W_enc, c[:, None] * sae.W_dec)  # one multiple, the same for every latent
    torch.testing.assert_close(c, c[:1].expand(D_SAE))
    # The probes of the implementation (256 from a generator seeded 0): the closed form to float precision.
    u = unit_probes(256, seed=0)
    x_hat = tied_topk_reconstruction(sae.W_dec, u, K)
    expected = float((u.double() * x_hat).sum() / x_hat.pow(2).sum())
    assert c[0].item() == pytest.approx(expected, rel=1e-5)
    # Fresh probes: the multiple minimises the initial reconstruction error of random unit-norm inputs.
    u = unit_probes(20_000, seed=123)
    x_hat = tied_topk_reconstruction(sae.W_dec, u, K)
    assert x_hat.norm(dim=1).mean().item() == pytest.approx(1.7, abs=0.05)  # the overshoot of W_enc = W_dec
    best = float((u.double() * x_hat).sum() / x_hat.pow(2).sum())
    assert c[0].item() == pytest.approx(best, abs=0.03)
    with torch.no_grad():
        error = {1.0: (u - sae(u).x_hat).pow(2).sum(1).mean().item()}
        for factor in (0.8, 1.2):
            sae.W_enc.copy_(factor * c[0] * sae.W_dec)
            error[factor] = (u - sae(u).x_hat).pow(2).sum(1).mean().item()
        sae.W_enc.copy_(sae.W_dec)
        error["tied"] = (u - sae(u).x_hat).pow(2).sum(1).mean().item()
    assert error[1.0] < min(error[0.8], error[1.2])
    assert error[1.0] < 0.8 and error["tied"] > 1.0  # W_enc = W_dec reconstructs worse than the zero vector


@pytest.mark.parametrize("architecture", [BatchTopK, MatryoshkaBatchTopK])
def test_batchtopk_family__encoder_starts_at_the_least_squares_multiple_of_its_own_rule(architecture):
    torch.manual_seed(0)
    sae = SparseAutoencoder(D_IN, D_SAE, architecture(k=K))
    # The implementation's probes go through in chunks of 64; BatchTopK keeps the K x 64 largest of each chunk.
    along = length = 0.0
    for u in unit_probes(256, seed=0).double().split(64):
        pre = (u @ sae.W_dec.detach().double().T).flatten()
        kept = pre.argsort(descending=True)[: K * len(u)]
        latents = torch.zeros_like(pre).scatter(0, kept, pre[kept].clamp_min(0)).view(len(u), D_SAE)
        x_hat = latents @ sae.W_dec.detach().double()
        along, length = along + float((u * x_hat).sum()), length + float(x_hat.pow(2).sum())
    assert scale_of(sae)[0].item() == pytest.approx(along / length, rel=1e-5)


def test_encoder_init_scale__is_used_as_given_and_the_global_rng_does_not_move():
    draws = {}
    for scale in (None, 1.0, 0.25):
        torch.manual_seed(7)
        sae = SparseAutoencoder(D_IN, D_SAE, TopK(k=K, encoder_init_scale=scale))
        draws[scale] = (sae.W_dec.detach().clone(), torch.rand(3))
        if scale is not None:
            torch.testing.assert_close(sae.W_enc, scale * sae.W_dec, rtol=0, atol=0)
    # The probes come from their own generator: the same decoder and the same next draw with or without them.
    for scale in (1.0, 0.25):
        assert torch.equal(draws[scale][0], draws[None][0]) and torch.equal(draws[scale][1], draws[None][1])
    with pytest.raises(ValueError, match="encoder_init_scale=0"):
        TopK(encoder_init_scale=0)


@pytest.mark.parametrize("architecture", [ReLU(), JumpReLU()])
def test_other_architectures__keep_the_plain_tied_encoder(architecture):
    torch.manual_seed(0)
    sae = SparseAutoencoder(D_IN, D_SAE, architecture)
    assert torch.equal(sae.W_enc, sae.W_dec)
