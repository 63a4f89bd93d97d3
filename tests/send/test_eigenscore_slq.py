"""The efficient EigenScore's machinery against independent computations: the Schur-complement deflation splits
the log-determinant exactly (dense eigenvalues in float64), keeps only directions that stand out, and the
two-level estimator's reported standard error matches the spread of its errors over seeds."""

from __future__ import annotations

import math

import pytest
import torch

from neurolight.lightning_modules.send.eigenscore import efficient_eigenscore, eigenscore
from neurolight.lightning_modules.send.eigenscore.covariance import _Covariance
from neurolight.lightning_modules.send.eigenscore.deflation import _Deflated

ALPHA = 1e-3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def with_outliers(num_rows: int, d: int, num_outliers: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(num_rows, d, generator=generator, dtype=torch.float64)
    z[:, torch.randperm(d, generator=generator)[:num_outliers]] *= 50
    return z


def complement_logdet(op: _Deflated) -> float:
    """log det of the Schur complement S = (op + alpha) on the complement of Q (and of the null vector), densely:
    the eigenvalues of P (op + alpha I) P that are not the zeros of P's null space."""
    projector = op.probes(None, torch.Generator())  # columns P e_i
    dense = projector.T @ (op @ projector + ALPHA * projector)
    eigenvalues = torch.linalg.eigvalsh((dense + dense.T) / 2)
    kept = op.size - op.rank - op.null_vector
    assert eigenvalues[-kept:].min() >= ALPHA * (1 - 1e-9)  # interlacing: eig(S) >= lambda_min(Sigma + alpha I)
    assert eigenvalues[:-kept].abs().max() < 1e-8
    return eigenvalues[-kept:].log().sum().item()


@pytest.mark.parametrize(("num_rows", "d"), [(120, 300), (300, 90)])
def test_deflation__splits_the_log_determinant_exactly(num_rows, d):
    z = with_outliers(num_rows, d, num_outliers=3)
    op = _Deflated(_Covariance(z), ALPHA, torch.Generator().manual_seed(0))
    assert op.rank == 3  # the three x50 feature dimensions, nothing from the bulk
    total = op.known_logdet(ALPHA) + complement_logdet(op)
    assert total / num_rows == pytest.approx(eigenscore(z).item(), rel=1e-9)

    projector = op.probes(None, torch.Generator())
    assert op.trace == pytest.approx(torch.trace(projector.T @ (op @ projector)).item(), rel=1e-9)


def test_deflation__keeps_nothing_on_a_flat_top():
    z = torch.randn(200, 200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert _Deflated(_Covariance(z), ALPHA, torch.Generator().manual_seed(0)).rank == 0


def test_efficient_eigenscore__splits_off_outliers_and_stays_within_1_percent():
    z = with_outliers(400, 600, num_outliers=4, seed=2).float()
    estimate = efficient_eigenscore(z, seed=0, method="slq", return_info=True)
    assert estimate.deflated == 4
    assert estimate.score.item() == pytest.approx(eigenscore(z).item(), rel=1e-2)


def test_two_level_slq__standard_error_matches_the_spread_over_seeds():
    # Square Marchenko-Pastur (the ill-conditioned case): the pilot runs deep, the other probes shallow.
    z = torch.randn(1500, 1500, generator=torch.Generator().manual_seed(3))
    exact = eigenscore(z).item()
    errors, std_errors = [], []
    for seed in range(20):
        estimate = efficient_eigenscore(z, seed=seed, method="slq", return_info=True)
        assert estimate.shallow_steps < estimate.num_steps < 100
        errors.append(estimate.score.item() - exact)
        std_errors.append(estimate.std_error)
    errors = torch.tensor(errors)
    assert errors.abs().max().item() <= 1e-2 * abs(exact)
    # Bias within a third of the standard error; spread and reported standard error agree within 40%.
    reported = math.sqrt(sum(s * s for s in std_errors) / len(std_errors))
    assert abs(errors.mean().item()) < reported / 3 + 3 * reported / math.sqrt(len(errors))
    assert 0.6 < errors.std().item() / reported < 1.4
