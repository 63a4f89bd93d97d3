"""The sparse encoder and decoder backwards (``architectures/sparse_encoder.py``, ``sparse_decoder.py``): the
gradients of the gathered pre-activations equal those of dense autograd through ``(x - b_dec) @ W_enc.T + b_enc``,
in float32 and under bf16 autocast, for the gather alone, for a whole TopK SAE with and without AuxK's dead latents,
and for BatchTopK and Matryoshka SAEs against their dense encode and decode; the decode's gradients equal dense
autograd through ``latents @ W_dec``, with any number of entries per token."""

from __future__ import annotations

import pytest
import torch

from neurolight.lightning_modules.sae.architectures import BatchTopK, MatryoshkaBatchTopK, TopK, topk
from neurolight.lightning_modules.sae.architectures.base import Architecture
from neurolight.lightning_modules.sae.architectures.sparse_decoder import decode_entries
from neurolight.lightning_modules.sae.architectures.sparse_encoder import gather_pre_acts, gather_pre_acts_at
from neurolight.lightning_modules.sae.sparse_autoencoder import SparseAutoencoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")
D_IN, D_SAE, BATCH, M = 24, 96, 40, 7


def make_sae(seed: int = 0, **settings) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(D_IN, D_SAE, TopK(**{"k": 6, "k_aux": 9, **settings}))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.2)
    return sae


def leaves(seed: int = 1) -> tuple[SparseAutoencoder, torch.Tensor]:
    """A fresh SAE (always the same weights) and input, so each computation gets its own gradients."""
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(seed))
    return make_sae(), x.requires_grad_()


def grads(sae: SparseAutoencoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"x": x.grad, "b_dec": sae.b_dec.grad, "W_enc": sae.W_enc.grad, "b_enc": sae.b_enc.grad}


def selection() -> tuple[torch.Tensor, torch.Tensor]:
    """(BATCH, M) distinct latents per row, many shared between rows, and an upstream gradient for each."""
    generator = torch.Generator().manual_seed(2)
    indices = torch.stack([torch.randperm(D_SAE // 3, generator=generator)[:M] * 3 for _ in range(BATCH)])
    return indices, torch.randn(BATCH, M, generator=generator)


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` and back, with an identity gradient: the cast autocast applies to an operand."""
    return t + (t.to(dtype).float() - t).detach()


def reference_pre_acts(sae: SparseAutoencoder, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The dense pre-activations by plain float32 autograd; with ``dtype``, the product's operands and the gradient
    reaching it rounded to it as autocast rounds them (the product itself in float32: no output rounding), except
    W_enc in the gradient towards x and b_dec, which the sparse backward leaves unrounded."""
    centred, weight = x - sae.b_dec, sae.W_enc
    if dtype is None:
        return centred @ weight.T + sae.b_enc
    operand = rounded(centred, dtype)
    towards_input = operand @ weight.detach().T  # adds 0, and centred's gradient through W_enc unrounded
    product = operand.detach() @ rounded(weight, dtype).T + (towards_input - towards_input.detach())
    product.register_hook(lambda grad: grad.to(dtype).float())
    return product + sae.b_enc


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["float32", "bf16-autocast"])
def test_gather_pre_acts__gradients_equal_dense_autograd_on_the_same_operands(dtype):
    indices, upstream = selection()
    dense = leaves()
    (reference_pre_acts(*dense, dtype).gather(-1, indices) * upstream).sum().backward()

    sae, x = sparse = leaves()
    with torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None):
        pre_acts = sae._pre_acts(x)
        gathered = gather_pre_acts(sae, x, pre_acts, indices)
    (gathered * upstream).sum().backward()

    torch.testing.assert_close(gathered, pre_acts.gather(-1, indices), rtol=0, atol=0)
    expected = grads(*dense)
    for name, grad in grads(*sparse).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not sae.W_enc.grad[1::3].any() and not sae.b_enc.grad[1::3].any(), "latents never selected: no gradient"


def test_gather_pre_acts_at__any_number_of_entries_per_row():
    indices, upstream = selection()
    keep = torch.rand(BATCH, M, generator=torch.Generator().manual_seed(3)) < 0.4  # 0 to M entries per row
    rows, cols, upstream = torch.arange(BATCH).unsqueeze(1).expand_as(indices)[keep], indices[keep], upstream[keep]
    dense = leaves()
    (reference_pre_acts(*dense, None)[rows, cols] * upstream).sum().backward()
    sae, x = sparse = leaves()
    (gather_pre_acts_at(sae, x, sae._pre_acts(x), rows, cols) * upstream).sum().backward()
    expected = grads(*dense)
    for name, grad in grads(*sparse).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("per_token", ["fixed", "any"], ids=["topk", "batchtopk"])
def test_decode_entries__gradients_equal_dense_autograd(per_token):
    """Entries sorted by token, M per token (TopK) or 0 to M (BatchTopK): output, decoder gradient and value
    gradients equal those of ``dense_latents @ W_dec`` (plain float32 autograd)."""
    indices, _ = selection()
    generator = torch.Generator().manual_seed(4)
    keep = torch.ones_like(indices, dtype=torch.bool)
    if per_token == "any":
        keep = torch.rand(BATCH, M, generator=generator) < 0.5
        keep[:2] = False  # tokens with no entry at all
    weight = torch.randn(D_SAE, D_IN, generator=generator).requires_grad_()
    values = torch.rand(BATCH, M, generator=generator).requires_grad_()
    out_grad = torch.randn(BATCH, D_IN, generator=generator)

    counts = keep.sum(1)
    offsets = counts.cumsum(0) - counts
    x_hat = decode_entries(weight, indices[keep], values[keep], offsets)
    (x_hat * out_grad).sum().backward()
    got = weight.grad, values.grad
    weight.grad = values.grad = None

    latents = torch.zeros(BATCH, D_SAE).scatter(1, indices, values * keep)
    expected = latents @ weight
    (expected * out_grad).sum().backward()
    torch.testing.assert_close(x_hat, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], values.grad * keep, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_dead", [False, True], ids=["live", "auxk"])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_topk_sae__parameter_gradients_equal_the_dense_encoder_backward(monkeypatch, with_dead, autocast):
    """The whole TopK loss (reconstruction, and AuxK on dead latents), its gradients with the sparse encoder
    backward against those with dense autograd through the pre-activations (``gather_pre_acts`` swapped for a
    plain gather): equal to float32 precision; under autocast to bf16's, where the dense products round their
    outputs to bf16 and the sparse sums do not."""
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(1))
    dead = (torch.arange(D_SAE) % 5 == 0) if with_dead else None

    def run() -> tuple[SparseAutoencoder, torch.Tensor]:
        sae = make_sae(auxk_coefficient=0.5)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = sae(x, dead_mask=dead)
        out.loss.backward()
        return sae, out

    sparse, sparse_out = run()
    monkeypatch.setattr(topk, "gather_pre_acts", lambda sae, x, pre_acts, indices, *_: pre_acts.gather(-1, indices))
    dense, dense_out = run()

    assert (sparse_out.aux > 0) == with_dead
    torch.testing.assert_close(sparse_out.loss, dense_out.loss, rtol=0, atol=0)
    tolerance = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    for name, parameter in dense.named_parameters():
        d = (getattr(sparse, name).grad - parameter.grad).abs()
        print(
            name,
            d.max().item(),
            parameter.grad.abs().max().item(),
            (d > 2e-3 + 2e-2 * parameter.grad.abs()).sum().item(),
        )
        torch.testing.assert_close(getattr(sparse, name).grad, parameter.grad, **tolerance, msg=name)


@pytest.mark.parametrize("architecture", [BatchTopK, MatryoshkaBatchTopK])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_batchtopk_sae__sparse_encode_decode_equals_the_dense_one(monkeypatch, architecture, autocast):
    """A training step of BatchTopK (tokens keep different numbers of latents, some none) and of Matryoshka (its
    nested prefix losses read the latents): latents, loss, threshold and every gradient equal those of the dense
    encode and decode (Architecture.encode_decode)."""
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(1))
    x[:3] *= 4  # loud tokens take many of the batch's k * batch latents, so others keep few or none
    dead = torch.arange(D_SAE) % 5 == 0
    settings = {"group_sizes": [16, 32, 48]} if architecture is MatryoshkaBatchTopK else {}

    def run():
        torch.manual_seed(0)
        sae = SparseAutoencoder(D_IN, D_SAE, architecture(k=6, k_aux=9, auxk_coefficient=0.5, **settings))
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.3)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = sae(x, dead_mask=dead)
        out.loss.backward()
        return sae, out

    sparse, sparse_out = run()
    monkeypatch.setattr(BatchTopK, "encode_decode", Architecture.encode_decode)
    dense, dense_out = run()

    per_token = (sparse_out.latents != 0).sum(1)
    assert per_token.max() > 6 and per_token.min() < 6, "every token kept k latents: not a BatchTopK test"
    torch.testing.assert_close(sparse_out.latents, dense_out.latents, rtol=0, atol=0)
    torch.testing.assert_close(sparse.threshold, dense.threshold, rtol=0, atol=0)
    if not autocast:
        torch.testing.assert_close(sparse_out.loss, dense_out.loss, rtol=1e-5, atol=1e-6)
        for name, parameter in dense.named_parameters():
            torch.testing.assert_close(getattr(sparse, name).grad, parameter.grad, rtol=1e-5, atol=1e-6, msg=name)
        return
    # Under autocast the dense decode is a bf16 product (its output rounded to bf16) and the sparse one sums in
    # float32, so the residual differs at bf16's precision; elementwise that moves gradients near zero by more
    # than their size, so compare each gradient as a whole.
    torch.testing.assert_close(sparse_out.loss, dense_out.loss, rtol=1e-2, atol=0)
    for name, parameter in dense.named_parameters():
        error = (getattr(sparse, name).grad - parameter.grad).norm() / parameter.grad.norm()
        assert error < 2**-7, f"{name}: relative error {error:.2e}"
