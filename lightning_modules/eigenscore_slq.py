"""Stochastic Lanczos quadrature for EigenScore (Ubaru, Chen & Saad 2017, SIAM J. Matrix Anal. Appl. 38(4)):
batched Lanczos on the covariance operator, Gauss and Gauss-Radau bounds on each probe's quadratic form (Golub &
Meurant, "Matrices, Moments and Quadrature with Applications" (2010), ch. 6), and the adaptive estimator ``_slq``
behind ``efficient_eigenscore(method="slq")``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_modules.eigenscore_covariance import EigenScoreEstimate, _Covariance


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
