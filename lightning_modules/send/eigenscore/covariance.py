"""What every EigenScore path shares (``score.py`` is the public entry): the input check, the covariance Sigma of
the (K, d) embeddings as a matrix-free operator with its probe vectors and cost model (docs/send.md, The operator),
the seeded probe generator, and the ``EigenScoreEstimate`` that ``efficient_eigenscore`` returns."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor


def _check_embeddings(embeddings: Tensor) -> Tensor:
    if embeddings.ndim != 2:
        raise ValueError(
            f"embeddings must be (K, d), one answer embedding per row; got shape {tuple(embeddings.shape)}"
        )
    if embeddings.shape[1] < 2:
        raise ValueError(f"embeddings have d={embeddings.shape[1]} features; the covariance needs d >= 2")
    if embeddings.shape[0] < 1:
        raise ValueError("embeddings are empty (K=0): pass at least one answer embedding")
    return embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))


class _Covariance:
    """Sigma as a matrix-free operator on its smaller side, the centring applied implicitly.

    K <= d: Sigma itself (K x K). K > d: its d x d twin Z^T J Z / (d - 1) (same nonzero eigenvalues), whose null
    vector 1_d is known: ``null_vector`` is then True and probes are kept orthogonal to it.
    """

    def __init__(self, z: Tensor) -> None:
        self.z, self.mean = z, z.mean(1)
        self.num_rows, d = z.shape
        self.on_features = self.num_rows > d
        self.size = min(self.num_rows, d)
        self.null_vector = self.on_features
        self.scale = 1.0 / (d - 1)
        # Flop-equivalents, only used to choose the cheaper path, fitted to timings at 5000 x 5000 and 10000 x 5000
        # on 2 cores with MKL: for the exact score 9/16 of a Gram matrix plus a Cholesky, at 0.87x the speed of the
        # Lanczos products; per Lanczos step two passes over Z, which cost like p + 24 probes' flops (below ~48
        # probes the products are bound by memory traffic, not flops).
        self.exact_cost = (1.125 * self.size**2 * max(self.num_rows, d) + self.size**3 / 3) / 0.87
        self.pass_cost = 4.0 * self.num_rows * d

    def step_cost(self, num_probes: int) -> float:
        return self.pass_cost * (num_probes + 24) if num_probes > 0 else 0.0

    @functools.cached_property
    def trace(self) -> float:
        """tr(Sigma) = sum of the rows' variances, in one pass (float64 sums; torch.var takes 15x longer)."""
        squares = torch.linalg.vector_norm(self.z, dim=1).double().square().sum()
        return ((squares - self.z.shape[1] * self.mean.double().square().sum()) * self.scale).item()

    def _zt(self, u: Tensor) -> Tensor:
        # MKL's z.T @ u is ~10x slower than (u.T @ z).T for fewer than 16 columns (measured on 20000 x 5000).
        return (u.T @ self.z).T if u.shape[1] < 16 else self.z.T @ u

    def __matmul__(self, v: Tensor) -> Tensor:
        z, m = self.z, self.mean
        if self.on_features:
            u = z @ v - torch.outer(m, v.sum(0))
            return (self._zt(u) - m @ u) * self.scale
        w = self._zt(v) - m @ v
        return (z @ w - torch.outer(m, w.sum(0))) * self.scale

    def probes(self, num_probes: int | None, generator: torch.Generator) -> Tensor:
        """(size, num_probes) Rademacher vectors, or with ``num_probes=None`` the size unit vectors (whose quadratic
        forms sum to the trace exactly); projected off the null vector where it is known."""
        if num_probes is None:
            v = torch.eye(self.size, dtype=self.z.dtype, device=self.z.device)
        else:
            v = torch.randint(0, 2, (self.size, num_probes), generator=generator, device=self.z.device)
            v = (2 * v - 1).to(self.z.dtype)
        return v - v.mean(0) if self.null_vector else v

    def known_logdet(self, alpha: float) -> float:
        """log(alpha) for every zero eigenvalue that the probes do not see."""
        return (self.num_rows - self.size + self.null_vector) * math.log(alpha)


class EigenScoreEstimate(NamedTuple):
    """What ``efficient_eigenscore(..., return_info=True)`` returns: the score and how it was obtained."""

    score: Tensor
    """0-dim tensor: the (estimated) EigenScore."""
    method: str
    """The path that ran: "exact", "slq" or "kpm"."""
    reason: str
    """Why: "requested", "exact is cheaper" (before any estimate), "estimate would cost more than exact"
    (fallback after the pilot), "converged", "step limit", "fixed settings" or "non-finite embeddings" (NaN)."""
    num_probes: int
    """Random probe vectors used (0 for exact)."""
    num_steps: int
    """Lanczos steps (slq) or Chebyshev moments (kpm); 0 for exact."""
    std_error: float
    """Estimated standard error of ``score`` from the spread of the probes; 0 for exact."""
    quadrature_bound: float
    """SLQ: bound on the quadrature error of ``score`` (half the Gauss / Gauss-Radau gap); 0 for exact; nan for kpm."""
    shallow_steps: int = 0
    """SLQ: Lanczos steps of the probes beyond the pilot's (two-level SLQ), ``num_steps`` when all ran as deep."""
    deflated: int = 0
    """SLQ: top directions split off exactly before the quadrature (Schur-complement deflation)."""


def seeded_generator(seed: int | torch.Generator | None, like: Tensor) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    generator = torch.Generator(device=like.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
