"""EigenScore, exact and efficient: pure tensor math, importable without Lightning or torchmetrics (the public
names are re-exported by ``lightning_modules.metrics``, beside the torchmetrics ``Metric``s and QA scores).

EigenScore (INSIDE, Chen et al., ICLR 2024) of the (K, d) matrix Z of K answer embeddings, one per row::

    Sigma = Z J_d Z^T / (d - 1)      (K x K; J_d = I_d - 1 1^T / d centres each embedding over its d features)
    ES    = (1/K) logdet(Sigma + alpha I) = (1/K) sum_i log(lambda_i(Sigma) + alpha)

Sigma is ``np.cov(Z)`` (rows are variables, ddof 1) as in INSIDE's code; the log is natural (INSIDE's code uses
log10: divide by ln 10 to compare). ``eigenscore`` computes it exactly, ``efficient_eigenscore`` estimates the same
quantity without a decomposition (ALGORITHMS.md §2)::

    es = eigenscore(z)                                    # z: (K, d)
    est = efficient_eigenscore(z, seed=0, return_info=True)
    est.score, est.method                                 # e.g. tensor(-3.26), "slq"
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "EigenScoreEstimate",
    "chebyshev_polynomials",
    "efficient_eigenscore",
    "eigenscore",
    "jackson_damping",
    "seeded_generator",
    "spectral_upper_bound",
]


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


def _lower_gram(a: Tensor, blocks: int = 4) -> Tensor:
    """Lower triangle of a a^T (upper part zero) by row blocks: (blocks + 1) / (2 blocks) of the flops of the full
    product, 5/8 at 4 blocks (torch has no syrk); Cholesky reads only the lower triangle."""
    size = a.shape[0]
    if size < 1024:
        return a @ a.T
    gram = a.new_zeros(size, size)
    edges = [round(i * size / blocks) for i in range(blocks + 1)]
    for start, end in itertools.pairwise(edges):
        gram[start:end, :end] = a[start:end] @ a[:end].T
    return gram


def eigenscore(embeddings: Tensor, alpha: float = 1e-3) -> Tensor:
    """Exact EigenScore of ``embeddings`` (K, d): a 0-dim tensor in the input's floating dtype (at least float32).

    Gram matrix of the smaller side (K x K, or d x d when K > d, which has the same nonzero eigenvalues; lower
    triangle only) and a Cholesky log-determinant; the K - d eigenvalues of Sigma that the d x d side lacks are
    zeros, counted as log(alpha). Cholesky runs in the input precision and is repeated in float64 if it fails.
    Non-finite embeddings (e.g. an fp16 overflow) give NaN.
    """
    z = _check_embeddings(embeddings)
    num_rows, d = z.shape
    centred = z - z.mean(1, keepdim=True)
    gram = _lower_gram(centred if num_rows <= d else centred.T)
    size = gram.shape[0]
    shifted = gram / (d - 1) + alpha * torch.eye(size, dtype=z.dtype, device=z.device)
    factor, info = torch.linalg.cholesky_ex(shifted)
    if info.item() != 0:
        if not torch.isfinite(shifted).all():
            return torch.tensor(math.nan, dtype=z.dtype, device=z.device)
        factor = torch.linalg.cholesky(shifted.double())
    logdet = 2 * factor.diagonal().double().log().sum() + (num_rows - size) * math.log(alpha)
    return (logdet / num_rows).to(z.dtype)


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
        # Flop-equivalents, only used to choose the cheaper path: 5/8 of a Gram matrix plus a Cholesky for the
        # exact score; per Lanczos step two passes over Z, which cost like p + 40 probes' flops (memory traffic;
        # measured at 5000-20000 x 5000 on 2 cores with MKL).
        self.exact_cost = 1.25 * self.size**2 * max(self.num_rows, d) + self.size**3 / 3
        self.pass_cost = 4.0 * self.num_rows * d

    def step_cost(self, num_probes: int) -> float:
        return self.pass_cost * (num_probes + 40) if num_probes > 0 else 0.0

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


# ---------------------------------------------------------------------------------------------------------------
# Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017, SIAM J. Matrix Anal. Appl. 38(4)); Gauss-Radau bounds
# from Golub & Meurant, "Matrices, Moments and Quadrature with Applications" (2010), ch. 6.


def _lanczos(
    op: _Covariance, probes: Tensor, max_steps: int, stop: Callable[[Tensor, Tensor], bool] | None = None
) -> tuple[Tensor, Tensor]:
    """One Lanczos run per probe column, all batched, with full reorthogonalisation (two classical Gram-Schmidt
    passes). Returns the float64 diagonals ``a`` (p, m) and off-diagonals ``b`` (p, m) of the tridiagonal matrices;
    b[:, -1] is the norm of the last residual. ``stop(a, b)`` is asked every 2 steps from step 4 on."""
    size, num_probes = probes.shape
    max_steps = max(1, min(max_steps, size - 1))
    basis = probes.new_empty(num_probes, min(max_steps, 32), size)  # (p, capacity, size), grown by doubling
    a = torch.zeros(num_probes, max_steps, dtype=torch.float64, device=probes.device)
    b = torch.zeros_like(a)
    q = probes / probes.norm(dim=0)
    for step in range(max_steps):
        if step == basis.shape[1]:
            basis = torch.cat([basis, torch.empty_like(basis)], 1)
        basis[:, step] = q.T
        w = op @ q
        a[:, step] = (q * w).sum(0).double()
        rows = w.T.contiguous()
        for done, row in zip(basis[:, : step + 1], rows):  # per probe: batched matmuls of these shapes are 50x slower
            for _ in range(2):
                row -= done.T @ (done @ row)
        w = rows.T
        norm = w.norm(dim=0)
        b[:, step] = norm.double()
        q = w / norm.clamp_min(torch.finfo(w.dtype).tiny)
        if stop is not None and step >= 3 and step % 2 == 1 and stop(a[:, : step + 1], b[:, : step + 1]):
            return a[:, : step + 1], b[:, : step + 1]
    return a, b


def _gauss_radau(a: Tensor, b: Tensor, weights: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Per probe: Gauss (an upper bound: the even derivatives of log are negative) and Gauss-Radau with a node
    fixed at 0 <= lambda_min (a lower bound) estimates of v^T log(Sigma + alpha I) v; ``weights`` = |v|^2 (p,)."""
    num_probes, m = a.shape
    tri = torch.diag_embed(a) + torch.diag_embed(b[:, :-1], 1) + torch.diag_embed(b[:, :-1], -1)

    def rule(t: Tensor) -> Tensor:
        nodes, vectors = torch.linalg.eigh(t)
        return weights * (vectors[:, 0] ** 2 * torch.log(nodes.clamp_min(0) + alpha)).sum(-1)

    # Extend T by one row and column so that 0 becomes an eigenvalue: the new diagonal entry is the last entry of
    # T^{-1} b_m^2 e_m (Golub & Meurant, ch. 6). Where T itself is singular, Gauss already has a node at 0.
    rhs = torch.zeros_like(a)
    rhs[:, -1] = b[:, -1] ** 2
    delta, info = torch.linalg.solve_ex(tri, rhs)
    last = delta[:, -1].nan_to_num(0.0, 0.0, 0.0).clamp(0, 1e6 * (a.abs().amax() + b.amax()).item())
    extended = torch.zeros(num_probes, m + 1, m + 1, dtype=a.dtype, device=a.device)
    extended[:, :m, :m] = tri
    extended[:, m - 1, m] = extended[:, m, m - 1] = b[:, -1]
    extended[:, m, m] = last
    gauss = rule(tri)
    return gauss, torch.where(info == 0, rule(extended), gauss)


def _combine(per_probe: Tensor, quadratic: Tensor, trace: float) -> tuple[float, float]:
    """Mean and standard error of tr f(Sigma) from per-probe estimates, with v^T Sigma v (whose mean, the trace, is
    known exactly) as a control variate."""
    num_probes = per_probe.numel()
    centred_t = quadratic - quadratic.mean()
    var_t = centred_t.square().sum()
    slope = (centred_t * (per_probe - per_probe.mean())).sum() / var_t if var_t > 0 and num_probes > 2 else 0.0
    corrected = per_probe - slope * (quadratic - trace)
    dof = max(num_probes - 2, 1) if num_probes > 2 else max(num_probes - 1, 1)
    std_error = math.sqrt(((corrected - corrected.mean()).square().sum() / dof).item() / num_probes)
    return corrected.mean().item(), std_error


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


_CONFIDENCE = 2.5  # z-score on the probes' standard error
_BIAS_SHARE = 0.2  # share of rtol given to the quadrature bound (rigorous but pessimistic); the probes get the rest
_PILOT_PROBES = 16
_MAX_ROUNDS = 4


def _quadrature(op: _Covariance, probes: Tensor, steps: int, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per probe (Gauss, Gauss-Radau, v^T Sigma v), ``steps`` Lanczos steps, in chunks of at most ~256 MiB."""
    chunk = max(16, 2**26 // (steps * op.size))
    results = []
    for block in probes.split(chunk, dim=1):
        weights = block.double().square().sum(0)
        a, b = _lanczos(op, block, steps)
        results.append((*_gauss_radau(a, b, weights, alpha), weights * a[:, 0]))
    return tuple(torch.cat(parts) for parts in zip(*results))


def _slq(
    op: _Covariance,
    alpha: float,
    rtol: float,
    generator: torch.Generator,
    num_probes: int | None,
    num_steps: int | None,
    budget: float,
) -> EigenScoreEstimate | None:
    """Adaptive SLQ: Lanczos steps until the Gauss / Gauss-Radau gap is within ``_BIAS_SHARE * rtol`` of the score,
    probes until ``_CONFIDENCE`` standard errors fit in the rest of ``rtol``. Returns None as soon as the projected
    total cost exceeds ``budget`` (flop-equivalents: the exact score's cost, or inf)."""
    num_rows, known, trace = op.num_rows, op.known_logdet(alpha), op.trace
    first = num_probes or _PILOT_PROBES
    probes = op.probes(first, generator)
    weights = probes.double().square().sum(0)
    state = {"converged": False, "over_budget": False}

    def score(trace_estimate: float) -> float:
        return (trace_estimate + known) / num_rows

    def probes_needed(std_error: float, abs_score: float, used: int) -> int:
        target = (1 - _BIAS_SHARE) * rtol * abs_score / _CONFIDENCE * num_rows
        return used if num_probes or std_error <= target else math.ceil(1.1 * used * (std_error / target) ** 2)

    def stop(a: Tensor, b: Tensor) -> bool:
        gauss, radau = _gauss_radau(a, b, weights, alpha)
        estimate, std_error = _combine((gauss + radau) / 2, weights * a[:, 0], trace)
        gap, steps = (gauss - radau).mean().item() / 2 / num_rows, a.shape[1]
        tolerance = _BIAS_SHARE * rtol * abs(score(estimate))
        state["converged"] = gap <= tolerance
        state.setdefault("first_gap", (steps, gap))
        # Project the total cost: the steps left if the gap keeps shrinking at its mean rate so far (it speeds up
        # later, so this errs towards exact), and the probes for the standard error at the smaller rule's score.
        rate = (gap / state["first_gap"][1]) ** (1 / max(steps - state["first_gap"][0], 1))
        if not state["converged"] and 0 < rate < 1:
            steps += min(400, math.log(tolerance / gap) / math.log(rate))
        smallest = min(abs(score(gauss.mean().item())), abs(score(radau.mean().item())))
        extra = probes_needed(std_error, smallest, first) - first
        state["over_budget"] = steps * (op.step_cost(first) + op.step_cost(min(extra, op.size))) > budget
        return state["converged"] or state["over_budget"]

    a, b = _lanczos(op, probes, num_steps or 400, None if num_steps else stop)
    if state["over_budget"]:
        return None
    steps = a.shape[1]
    gauss, radau = _gauss_radau(a, b, weights, alpha)
    per_probe, quadratic, gaps = (gauss + radau) / 2, weights * a[:, 0], gauss - radau
    estimate, std_error = _combine(per_probe, quadratic, trace)
    for _ in range(_MAX_ROUNDS):
        needed = probes_needed(std_error, abs(score(estimate)), per_probe.numel())
        if needed <= per_probe.numel():
            break
        extra = op.size if needed >= op.size else 8 * math.ceil((needed - per_probe.numel()) / 8)
        if steps * op.step_cost(extra) > budget:
            return None
        gauss, radau, more_quadratic = _quadrature(
            op, op.probes(None if extra == op.size else extra, generator), steps, alpha
        )
        if extra == op.size:  # unit vectors: the trace up to quadrature error, no sampling error
            per_probe, gaps = op.size * (gauss + radau) / 2, op.size * (gauss - radau)
            estimate, std_error = per_probe.mean().item(), 0.0
            break
        per_probe = torch.cat([per_probe, (gauss + radau) / 2])
        quadratic, gaps = torch.cat([quadratic, more_quadratic]), torch.cat([gaps, gauss - radau])
        estimate, std_error = _combine(per_probe, quadratic, trace)
    if num_steps or num_probes:
        reason = "fixed settings"
    else:
        reason = "converged" if state["converged"] else "step limit"
    return EigenScoreEstimate(
        score=torch.tensor(score(estimate), dtype=op.z.dtype, device=op.z.device),
        method="slq",
        reason=reason,
        num_probes=per_probe.numel(),
        num_steps=steps,
        std_error=std_error / num_rows,
        quadrature_bound=gaps.mean().item() / 2 / num_rows,
    )


# ---------------------------------------------------------------------------------------------------------------
# Kernel polynomial method (Weisse, Wellein, Alvermann & Fehske, Rev. Mod. Phys. 78, 275 (2006)), as in the SEND
# paper's Algorithm 1 but with a reliable bound, true T_m and the m = 0 term.


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


def seeded_generator(seed: int | torch.Generator | None, like: Tensor) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    generator = torch.Generator(device=like.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _slq_may_pay(op: _Covariance) -> bool:
    # The cost model is for CPUs. On an H100 the exact score of 20000 x 5000 takes 18 ms and SLQ 10-45 ms, bound
    # by kernel launches, so accelerators always take the exact path.
    return op.z.device.type == "cpu" and 4 * op.step_cost(_PILOT_PROBES) < 0.5 * op.exact_cost


def efficient_eigenscore(
    embeddings: Tensor,
    alpha: float = 1e-3,
    num_moments: int | None = None,
    num_probes: int | None = None,
    seed: int | torch.Generator | None = None,
    *,
    method: str = "auto",
    rtol: float = 1e-2,
    damping: bool = True,
    return_info: bool = False,
) -> Tensor | EigenScoreEstimate:
    """EigenScore of ``embeddings`` (K, d) without a decomposition and without forming the Gram matrix.

    ``method``:

    - "auto" (default): stochastic Lanczos quadrature where it is cheaper than ``eigenscore``, else ``eigenscore``.
      SLQ measured better than KPM on every matrix family (ALGORITHMS.md §2). Matrices whose smaller side is below
      ~1500 go exact at once. Otherwise a pilot of 16 probes runs Lanczos steps until the Gauss and Gauss-Radau
      rules (whose average is the estimate) bracket it within ``0.2 * rtol`` of the score, and its standard error
      says how many probes keep 2.5 standard errors within the other ``0.8 * rtol``; as soon as the projected
      cost exceeds that of the exact score (a flop model with a memory-traffic term), the exact score runs instead.
      On accelerators the exact score is always cheaper (milliseconds at the paper's sizes) and runs.
    - "slq": the same estimator, never replaced by the exact score.
    - "kpm": the kernel polynomial method of the SEND paper done right: spectral bound from 20 Lanczos steps
      (capped by the trace), true Chebyshev T_m by the three-term recurrence, Jackson ``damping``,
      ``num_moments`` moments (default 100) from ``num_probes`` (default 32) probes. Fixed cost, no error control:
      measured within 0.5% on Gaussian and power-law spectra (64-500 x 100-1000) but 2-550% off with outlier
      dimensions (0.4-31% without damping, which Jackson's kernel, made for densities, does not help here).
    - "exact": ``eigenscore``.

    Probes are Rademacher vectors on the smaller side, all run at once (block products with Z), with v^T Sigma v
    as a control variate (its mean, the trace, is exact); zero eigenvalues beyond the smaller side, and the null
    vector 1_d of the centring when K > d, are counted exactly as log(alpha). ``num_moments`` / ``num_probes``
    fix the Lanczos steps or Chebyshev moments / the probes instead of choosing them. ``seed`` (int or Generator)
    makes the estimate reproducible. Returns a 0-dim tensor, or with ``return_info`` an ``EigenScoreEstimate``
    that says which path ran.
    """
    z = _check_embeddings(embeddings)
    if method not in ("auto", "slq", "kpm", "exact"):
        raise ValueError(f"method={method!r}; choose 'auto', 'slq', 'kpm' or 'exact'")
    if num_moments is not None and num_moments < 2:
        raise ValueError(f"num_moments={num_moments}; at least 2 Lanczos steps or Chebyshev moments are needed")
    op = _Covariance(z)
    result = None
    with torch.no_grad():
        if method != "exact" and not math.isfinite(op.trace):  # as eigenscore does, without its cost
            nan = torch.tensor(math.nan, dtype=z.dtype, device=z.device)
            result = EigenScoreEstimate(nan, "exact", "non-finite embeddings", 0, 0, 0.0, 0.0)
        elif method == "kpm":
            result = _kpm(op, alpha, num_moments or 100, num_probes or 32, seeded_generator(seed, z), damping)
        elif method == "slq" or (method == "auto" and _slq_may_pay(op)):
            budget = math.inf if method == "slq" else op.exact_cost
            result = _slq(op, alpha, rtol, seeded_generator(seed, z), num_probes, num_moments, budget)
            reason = "estimate would cost more than exact"
        else:
            reason = "requested" if method == "exact" else "exact is cheaper"
        if result is None:
            result = EigenScoreEstimate(eigenscore(z, alpha), "exact", reason, 0, 0, 0.0, 0.0)
    return result if return_info else result.score
