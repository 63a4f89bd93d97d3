"""Kernel polynomial method for EigenScore (Weisse, Wellein, Alvermann & Fehske, Rev. Mod. Phys. 78, 275 (2006)),
as in the SEND paper's Algorithm 1 but with a reliable bound, true T_m and the m = 0 term: Chebyshev polynomials,
Jackson damping, a Lanczos bound on the spectrum, and the estimator ``_kpm`` behind
``efficient_eigenscore(method="kpm")``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from neurolight.lightning_modules.send.eigenscore.covariance import (
    EigenScoreEstimate,
    _check_embeddings,
    _Covariance,
    seeded_generator,
)
from neurolight.lightning_modules.send.eigenscore.slq import _combine, _lanczos


def chebyshev_polynomials(x: Tensor, degree: int) -> Tensor:
    """T_0(x) .. T_degree(x) by the three-term recurrence T_{m+1} = 2x T_m - T_{m-1}: shape (degree + 1, *x.shape)."""
    values = [torch.ones_like(x), x]
    for _ in range(degree - 1):
        values.append(2 * x * values[-1] - values[-2])
    return torch.stack(values[: degree + 1])


def jackson_damping(num_moments: int) -> Tensor:
    """Jackson kernel g_0 .. g_{N-1} for N moments (Weisse et al. 2006, eq. 71), float64."""
    n = num_moments + 1
    m = torch.arange(num_moments, dtype=torch.float64)
    return ((n - m) * torch.cos(math.pi * m / n) + torch.sin(math.pi * m / n) / math.tan(math.pi / n)) / n


def spectral_upper_bound(embeddings: Tensor, num_steps: int = 20, seed: int | None = None) -> float:
    """An upper bound on lambda_max(Sigma): the Lanczos estimate theta_max + b_m (Zhou & Li, Linear Algebra Appl.
    435 (2011)) after ``num_steps`` steps, capped by tr(Sigma), which bounds it rigorously since Sigma is PSD."""
    return _spectral_upper_bound(
        _Covariance(_check_embeddings(embeddings)), num_steps, seeded_generator(seed, embeddings)
    )


def _spectral_upper_bound(op: _Covariance, num_steps: int, generator: torch.Generator) -> float:
    a, b = _lanczos(op, op.probes(1, generator), num_steps)
    tri = torch.diag(a[0]) + torch.diag(b[0, :-1], 1) + torch.diag(b[0, :-1], -1)
    return min(torch.linalg.eigvalsh(tri)[-1].item() + b[0, -1].item(), op.trace)


def _kpm(
    op: _Covariance, alpha: float, num_moments: int, num_probes: int, generator: torch.Generator, damping: bool
) -> EigenScoreEstimate:
    # Map [0, 1.01 * bound] onto [-1, 1]: an eigenvalue beyond 1 would make T_m grow like cosh(m arccosh x); the
    # lower end stays at 0 (Sigma is PSD), where log(lambda + alpha) is still defined.
    centre = half_width = 1.01 * _spectral_upper_bound(op, 20, generator) / 2
    nodes = torch.cos(math.pi * (torch.arange(4 * num_moments, dtype=torch.float64) + 0.5) / (4 * num_moments))
    coefficients = chebyshev_polynomials(nodes, num_moments - 1) @ torch.log(centre + half_width * nodes + alpha)
    coefficients *= 2 / nodes.numel()
    coefficients[0] /= 2
    if damping:
        coefficients *= jackson_damping(num_moments)

    v = op.probes(num_probes, generator)
    previous, current = v, (op @ v - centre * v) / half_width
    mu0, mu1 = (v * v).sum(0).double(), (v * current).sum(0).double()
    moments = [mu0, mu1]
    # Two moments per product: mu_2k = 2 |w_k|^2 - mu_0, mu_2k+1 = 2 w_k+1 . w_k - mu_1 (Weisse et al., eq. 34).
    while len(moments) < num_moments:
        following = 2 * (op @ current - centre * current) / half_width - previous
        moments += [2 * (current * current).sum(0).double() - mu0, 2 * (following * current).sum(0).double() - mu1]
        previous, current = current, following
    per_probe = torch.stack(moments[:num_moments], 1).cpu() @ coefficients
    estimate, std_error = _combine(per_probe, (half_width * mu1 + centre * mu0).cpu(), op.trace)
    return EigenScoreEstimate(
        score=torch.tensor((estimate + op.known_logdet(alpha)) / op.num_rows, dtype=op.z.dtype, device=op.z.device),
        method="kpm",
        reason="requested",
        num_probes=num_probes,
        num_steps=num_moments,
        std_error=std_error / op.num_rows,
        quadrature_bound=math.nan,
    )
