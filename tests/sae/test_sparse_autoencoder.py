"""SparseAutoencoder: each architecture's sparsity rule, loss terms against manual formulas, decoder constraints,
AuxK, JumpReLU's straight-through threshold gradient, and a short training run on synthetic sparse data."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from neurolight.lightning_modules.sae.architectures import (
    BatchTopK,
    JumpReLU,
    ReLU,
    TopK,
    remove_parallel_component,
    remove_parallel_component_,
    unit_norm_rows,
    unit_norm_rows_,
)
from neurolight.lightning_modules.sae.sparse_autoencoder import SaeOutput, SparseAutoencoder
from tests.helpers.sae import synthetic_sparse_data, train_sae

D_IN, D_SAE, K, BATCH = 16, 48, 4, 32
ARCHITECTURES = {"relu": ReLU, "topk": TopK, "batchtopk": BatchTopK, "jumprelu": JumpReLU}
# The settings these tests were written with: the defaults are chosen for LLM activations scaled to
# E||x|| = sqrt(d_in), these inputs have E||x|| ~ 4.
SETTINGS = {
    "relu": {"l1_coefficient": 1e-3},
    "topk": {"k": K},
    "batchtopk": {"k": K},
    "jumprelu": {"l0_coefficient": 1e-3, "bandwidth": 1e-3, "init_threshold": 1e-3},
}


def make_sae(architecture: str, seed: int = 0, **settings) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(D_IN, D_SAE, ARCHITECTURES[architecture](**{**SETTINGS[architecture], **settings}))
    with torch.no_grad():
        # Spread the biases so that pre-activations straddle zero and the threshold.
        sae.b_enc.copy_(0.3 * torch.randn(D_SAE))
        sae.b_dec.copy_(0.1 * torch.randn(D_IN))
    return sae


def make_x(seed: int = 1, batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, D_IN, generator=torch.Generator().manual_seed(seed))


def manual_pre_acts(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """(x - b_dec) W_enc^T + b_enc, in float64 from the raw weights."""
    W_enc, b_enc, b_dec = (p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.b_dec))
    return torch.einsum("bi,si->bs", x.double() - b_dec, W_enc) + b_enc


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


def test_relu__latents_are_relu_of_manual_pre_acts():
    sae, x = make_sae("relu"), make_x()
    out = sae(x)
    close(out.pre_acts, manual_pre_acts(sae, x))
    close(out.latents, manual_pre_acts(sae, x).clamp_min(0))
    assert 0 < (out.latents > 0).sum() < out.latents.numel()


def test_topk__keeps_exactly_the_k_largest_pre_acts_per_row():
    sae, x = make_sae("topk"), make_x()
    latents = sae(x).latents
    pre = manual_pre_acts(sae, x)
    top_values, top_indices = torch.topk(pre, K, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, top_indices, top_values.clamp_min(0))
    assert ((latents != 0).sum(-1) <= K).all()
    close(latents, expected)
    for row in range(BATCH):
        fired = set((latents[row] > 0).nonzero().flatten().tolist())
        assert fired <= set(top_indices[row].tolist())


def test_batchtopk__keeps_the_global_top_k_times_batch_in_training():
    sae, x = make_sae("batchtopk"), make_x()
    sae.train()
    latents = sae(x).latents
    flat = manual_pre_acts(sae, x).clamp_min(0).flatten()
    kept = torch.topk(flat, K * BATCH).indices
    expected = torch.zeros_like(flat).scatter(0, kept, flat[kept]).view(BATCH, D_SAE)
    assert (latents != 0).sum() <= K * BATCH
    close(latents, expected)
    per_row = (latents > 0).sum(-1)
    assert per_row.min() < K < per_row.max(), "the budget is shared across the batch, not fixed per row"


def test_batchtopk__eval_uses_ema_of_smallest_kept_activation_as_threshold():
    momentum = 0.9
    sae = make_sae("batchtopk", threshold_momentum=momentum)
    x1, x2 = make_x(seed=1), make_x(seed=2)

    sae.eval()
    assert sae.threshold < 0, "unset before any training batch"
    pre = manual_pre_acts(sae, x1)
    top_values, top_indices = torch.topk(pre, K, dim=-1)
    close(sae.encode(x1), torch.zeros_like(pre).scatter(-1, top_indices, top_values.clamp_min(0)))

    def smallest_kept(x):
        values = torch.topk(manual_pre_acts(sae, x).clamp_min(0).flatten(), K * x.shape[0]).values
        return values[values > 0].min()

    sae.train()
    expected = smallest_kept(x1)
    sae(x1)
    close(sae.threshold, expected)
    expected = momentum * expected + (1 - momentum) * smallest_kept(x2)
    sae(x2)
    close(sae.threshold, expected)
    sae.encode(x2)
    close(sae.threshold, expected)  # encode never updates it

    sae.eval()
    pre = manual_pre_acts(sae, x1)
    close(sae(x1).latents, pre * (pre > expected))
    close(sae.threshold, expected)  # nor does an eval forward


def test_jumprelu__zero_below_threshold_and_equal_to_pre_acts_above():
    sae, x = make_sae("jumprelu"), make_x()
    thresholds = torch.linspace(0.05, 1.0, D_SAE)
    with torch.no_grad():
        sae.log_threshold.copy_(thresholds.log())
    latents = sae(x).latents
    pre = manual_pre_acts(sae, x)
    above = pre > thresholds.double()
    close(latents, torch.where(above, pre, torch.zeros_like(pre)))
    assert 0 < above.sum() < above.numel()


SPARSITY_COEFFICIENT = {"relu": {"l1_coefficient": 0.01}, "jumprelu": {"l0_coefficient": 0.01}}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_forward__mse_and_sparsity_match_manual_formulas(architecture):
    sae, x = make_sae(architecture, **SPARSITY_COEFFICIENT.get(architecture, {})), make_x()
    out = sae(x)
    assert isinstance(out, SaeOutput)
    pre = manual_pre_acts(sae, x)
    x_hat = out.latents.double() @ sae.W_dec.detach().double() + sae.b_dec.detach().double()
    close(out.x_hat, x_hat)
    close(out.mse, ((x.double() - x_hat) ** 2).sum(-1).mean())
    if architecture == "relu":
        expected_sparsity = 0.01 * pre.clamp_min(0).sum(-1).mean()
    elif architecture == "jumprelu":
        expected_sparsity = 0.01 * (pre > 1e-3).double().sum(-1).mean()
    else:
        expected_sparsity = torch.tensor(0.0)
    close(out.sparsity, expected_sparsity)
    close(out.aux, torch.tensor(0.0))
    close(out.reconstruction, out.mse)
    close(out.loss, out.mse + out.sparsity + out.aux)
    close(sae.decode(sae.encode(x)), out.x_hat)


def test_relu_without_decoder_constraint__weights_l1_by_decoder_row_norms():
    sae, x = make_sae("relu", l1_coefficient=0.01, normalize_decoder=False), make_x()
    row_scale = torch.linspace(0.5, 2.0, D_SAE)
    with torch.no_grad():
        sae.W_dec.mul_(row_scale[:, None])
    out = sae(x)
    expected = 0.01 * (manual_pre_acts(sae, x).clamp_min(0) * row_scale.double()).sum(-1).mean()
    close(out.sparsity, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_firing_counts__count_the_positive_entries_of_each_column(dtype):
    from neurolight.lightning_modules.sae.metrics import firing_counts

    # 600 rows: more than bfloat16 counts exactly (256), negatives and zeros that must not count, a column that
    # fires in every row.
    latents = torch.randn(600, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
    latents[:, 3] = 0.5
    latents[::7, 5] = 0
    expected = torch.tensor([sum(1 for row in latents[:, j].tolist() if row > 0) for j in range(40)])
    counts = firing_counts(latents.requires_grad_())
    assert counts.dtype == torch.long and torch.equal(counts, expected) and counts[3] == 600


def test_encode__accepts_leading_token_dimensions():
    sae, x = make_sae("topk"), make_x()
    close(sae.encode(x.view(4, 8, D_IN)).view(BATCH, D_SAE), sae.encode(x))


def test_init__tied_unit_norm_rows_zero_biases_and_deterministic_given_seed():
    torch.manual_seed(3)
    a = SparseAutoencoder(D_IN, D_SAE, JumpReLU(init_threshold=0.02))
    torch.manual_seed(3)
    b = SparseAutoencoder(D_IN, D_SAE, JumpReLU(init_threshold=0.02))
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    close(a.W_dec.norm(dim=1), torch.ones(D_SAE))
    assert torch.equal(a.W_enc, a.W_dec)
    assert not a.b_enc.any() and not a.b_dec.any()
    close(a.log_threshold.exp(), torch.full((D_SAE,), 0.02))
    assert a.architecture.resample_resets() == [("log_threshold", math.log(0.02))]  # revived thresholds get it back
    assert not a.normalize_decoder and make_sae("relu").normalize_decoder and make_sae("topk").normalize_decoder


def test_remove_parallel_decoder_grad__leaves_grad_orthogonal_to_each_row():
    sae = make_sae("relu")
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 3.0, D_SAE)[:, None])  # must not rely on unit rows
    grad = torch.randn(D_SAE, D_IN)
    sae.W_dec.grad = grad.clone()
    sae.remove_parallel_decoder_grad_()
    rows = sae.W_dec.detach()
    close((sae.W_dec.grad * rows).sum(1), torch.zeros(D_SAE))
    removed = grad - sae.W_dec.grad
    cosine = F.cosine_similarity(removed, rows, dim=1).abs()
    close(cosine, torch.ones(D_SAE), tol=1e-4)  # only the parallel part was taken away


@pytest.mark.parametrize("rows", [D_SAE, 600], ids=["one-block", "blocks"])  # the dots go in blocks of 256 rows
def test_in_place_decoder_constraint__equals_the_out_of_place_one_and_writes_its_argument(rows):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(rows, D_IN, generator=generator) * torch.linspace(0.1, 3.0, rows)[:, None]
    weight[7] = 0  # a zero row stays zero (the norm's floor), in both forms
    grad = torch.randn(rows, D_IN, generator=generator)
    projected, normalised = grad.clone(), weight.clone()
    assert remove_parallel_component_(projected, weight) is projected and unit_norm_rows_(normalised) is normalised
    close(projected, remove_parallel_component(grad, weight))
    close(normalised, unit_norm_rows(weight))
    assert not normalised[7].any() and torch.equal(projected[7], grad[7])


def test_adam_step_then_normalize_decoder__rows_are_unit_norm():
    sae, x = make_sae("relu"), make_x()
    optimizer = torch.optim.Adam(sae.parameters(), lr=0.1)
    sae(x).loss.backward()
    sae.remove_parallel_decoder_grad_()
    optimizer.step()
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-4)
    sae.normalize_decoder_()
    close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return 1 - ((x - x_hat) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_training__reduces_reconstruction_error_on_synthetic_sparse_data(architecture):
    data = synthetic_sparse_data(4096)
    held_out = synthetic_sparse_data(1024, seed=1)
    torch.manual_seed(0)
    sae = SparseAutoencoder(32, 64, ARCHITECTURES[architecture](**SETTINGS[architecture]))
    sae.eval()
    with torch.no_grad():
        before = explained_variance(held_out, sae(held_out).x_hat)
    train_sae(sae.train(), data, steps=200, lr=1e-2)
    sae.eval()
    with torch.no_grad():
        out = sae(held_out)
    after = explained_variance(held_out, out.x_hat)
    assert after > 0.9 and after > before + 0.5, (before, after)
    if architecture != "jumprelu":
        close(sae.W_dec.norm(dim=1), torch.ones(64))
    if architecture in ("topk", "batchtopk"):
        assert (out.latents > 0).sum(-1).float().mean() <= 4 + 1


def manual_auxk(sae: SparseAutoencoder, x: torch.Tensor, out: SaeOutput, dead: torch.Tensor, k_aux: int):
    pre = manual_pre_acts(sae, x)
    pre_dead = torch.where(dead, pre, torch.full_like(pre, -math.inf))
    values, indices = torch.topk(pre_dead, k_aux, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, indices, values.clamp_min(0))
    residual = x.double() - out.x_hat.detach().double()
    error = ((residual - codes @ sae.W_dec.detach().double()) ** 2).sum(-1).mean()
    # Weighed against the unnormalised main loss as Gao et al.'s code weighs it against the variance-normalised one.
    input_variance = ((x.double() - x.double().mean(0)) ** 2).sum(-1).mean()
    return input_variance * error / ((residual - residual.mean(0)) ** 2).sum(-1).mean()


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_auxk__equals_normalised_error_of_top_dead_latents_on_the_residual(architecture):
    sae, x = make_sae(architecture, k_aux=3, auxk_coefficient=0.5), make_x()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::4] = True
    out = sae(x, dead_mask=dead)
    close(out.aux, 0.5 * manual_auxk(sae, x, out, dead, k_aux=3))
    close(out.loss, out.mse + out.aux)
    # The default k_aux = d_in // 2 = 8 is capped at the 2 dead latents.
    few_dead = torch.zeros(D_SAE, dtype=torch.bool)
    few_dead[[5, 40]] = True
    sae = make_sae(architecture)
    out = sae(x, dead_mask=few_dead)
    close(out.aux, sae.architecture.auxk_coefficient * manual_auxk(sae, x, out, few_dead, k_aux=2))


def test_auxk__sends_gradient_to_dead_latents_encoder_rows_only():
    sae, x = make_sae("topk"), make_x()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:6] = True
    out = sae(x, dead_mask=dead)
    out.aux.backward()
    grad_norms = sae.W_enc.grad.norm(dim=1)
    assert (grad_norms[:6] > 0).all()
    assert not grad_norms[6:].any()


def test_auxk__is_zero_without_dead_latents_and_finite_without_residual_variance():
    x = make_x()
    sae = make_sae("topk")
    assert sae(x).aux == 0
    assert sae(x, dead_mask=torch.zeros(D_SAE, dtype=torch.bool)).aux == 0
    assert make_sae("relu")(x, dead_mask=torch.ones(D_SAE, dtype=torch.bool)).aux == 0
    out = sae(x[:1], dead_mask=torch.ones(D_SAE, dtype=torch.bool))  # one row: the residual has no variance
    out.loss.backward()
    assert out.aux == 0 and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in sae.parameters())


def test_jumprelu__threshold_gets_straight_through_gradient_from_sparsity_term():
    bandwidth, coefficient = 0.2, 0.01
    sae, x = make_sae("jumprelu", bandwidth=bandwidth, l0_coefficient=coefficient), make_x()
    threshold = torch.full((D_SAE,), 0.3)
    with torch.no_grad():
        sae.log_threshold.copy_(threshold.log())
    out = sae(x)
    out.sparsity.backward()
    pre = manual_pre_acts(sae, x)
    in_window = ((pre - 0.3).abs() < bandwidth / 2).double()
    # JumpReLU paper, eq. 12: d/dθ H(z - θ) ≈ -K((z - θ)/ε)/ε; the chain rule through θ = exp(log θ) adds θ.
    expected = -coefficient / bandwidth * in_window.sum(0) / BATCH * 0.3
    close(sae.log_threshold.grad, expected)
    assert (sae.log_threshold.grad < 0).any()
    assert sae.W_enc.grad is None or not sae.W_enc.grad.any(), "the L0 term trains the threshold only"


def test_jumprelu__reconstruction_gradient_to_threshold_follows_the_rectangle_kernel():
    bandwidth = 0.2
    sae, x = make_sae("jumprelu", bandwidth=bandwidth), make_x()
    with torch.no_grad():
        sae.log_threshold.fill_(math.log(0.3))
    out = sae(x)
    out.latents.sum().backward()
    pre = manual_pre_acts(sae, x)
    # eq. 11: d/dθ JumpReLU(z) ≈ -(θ/ε) K((z - θ)/ε), times θ for the log parameterisation.
    expected = -(0.3 / bandwidth) * ((pre - 0.3).abs() < bandwidth / 2).double().sum(0) * 0.3
    close(sae.log_threshold.grad, expected)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_bfloat16__forward_and_backward_stay_finite(architecture):
    sae = make_sae(architecture).to(torch.bfloat16)
    x = make_x().to(torch.bfloat16)
    out = sae(x, dead_mask=torch.arange(D_SAE) < 10)
    out.loss.backward()
    assert all(t.dtype == torch.bfloat16 for t in out)
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in sae.parameters())
    sae.eval()
    assert sae.encode(x).dtype == torch.bfloat16


def test_bad_arguments__raise_errors_naming_the_fix():
    with pytest.raises(ValueError, match=r"'gated'.*relu \(ReLU\), topk \(TopK\), batchtopk \(BatchTopK\), jumprelu"):
        SparseAutoencoder(D_IN, D_SAE, "gated")
    for architecture in (TopK, BatchTopK):
        with pytest.raises(ValueError, match="k=0 must be at least 1"):
            architecture(k=0)
        with pytest.raises(ValueError, match=f"k={D_SAE + 1} .*d_sae={D_SAE}"):
            SparseAutoencoder(D_IN, D_SAE, architecture(k=D_SAE + 1))
    sae = make_sae("topk")
    with pytest.raises(ValueError, match=f"d_in={D_IN}"):
        sae(torch.randn(4, D_IN + 1))
    with pytest.raises(ValueError, match=r"dead_mask must have shape \(48,\)"):
        sae(make_x(), dead_mask=torch.ones(D_SAE - 1, dtype=torch.bool))
