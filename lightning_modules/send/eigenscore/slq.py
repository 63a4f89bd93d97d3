"""Stochastic Lanczos quadrature for EigenScore (Ubaru, Chen & Saad 2017, SIAM J. Matrix Anal. Appl. 38(4)):
batched Lanczos on the (deflated) covariance operator, Gauss and Gauss-Radau bounds on each probe's quadratic form
(Golub & Meurant, "Matrices, Moments and Quadrature with Applications" (2010), ch. 6), and the adaptive two-level
estimator ``_slq`` behind ``efficient_eigenscore(method="slq")``; its error control: docs/send.md, Error control.

Two levels (multilevel Monte Carlo, Giles, Acta Numerica 24 (2015), with the Lanczos depth as the level): the
probes' spread is set by the spectrum (~2% of the score per probe on square Marchenko-Pastur matrices) and needs
dozens of probes, while converging the quadrature needs dozens of steps, but the two needs do not meet in the same
probes. Per probe, the estimate after m0 steps and after the full depth L differ by nearly the same amount (0.15%
spread against the 2% of the estimates themselves, measured at 5000 x 5000), so tr f = E[Q_m0] + E[Q_L - Q_m0]
takes the first term from many shallow probes and the second from the few deep pilot probes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from neurolight.lightning_modules.send.eigenscore.covariance import EigenScoreEstimate, _Covariance
from neurolight.lightning_modules.send.eigenscore.deflation import _Deflated


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


def _control_variate(per_probe: Tensor, quadratic: Tensor, trace: float) -> Tensor:
    """Per-probe estimates of tr f(Sigma) corrected with v^T Sigma v, whose mean (the trace) is known exactly."""
    centred_t = quadratic - quadratic.mean()
    var_t = centred_t.square().sum()
    if var_t <= 0 or per_probe.numel() <= 2:
        return per_probe
    slope = (centred_t * (per_probe - per_probe.mean())).sum() / var_t
    return per_probe - slope * (quadratic - trace)


def _combine(per_probe: Tensor, quadratic: Tensor, trace: float) -> tuple[float, float]:
    """Mean and standard error of tr f(Sigma) from per-probe estimates, with v^T Sigma v as a control variate."""
    return _two_level(per_probe, quadratic, per_probe.new_zeros(0), trace)


def _spread_margin(num_deep: int) -> float:
    """Factor on the spread of Q_L - Q_m0, estimated from the few deep probes: the same estimate chooses m0 among
    several depths and then enters the standard error, so taken as is it runs low (the winner's curse: errors over
    20 seeds spread 1.36x the reported standard error on 1500 x 1500). 1 + 2 / sqrt(dof) is about an 80% upper
    confidence bound of a chi-square variance estimate (1.52 for the 16-probe pilot)."""
    return 1 + 2 / math.sqrt(max(num_deep - 1, 1))


def _spreads(
    shallow: Tensor, quadratic: Tensor, correction: Tensor, trace: float
) -> tuple[Tensor, float, float, float]:
    """The control-variate-corrected Q_m0 of all probes, their variance, and over the deep probes (the first
    ``correction.numel()``) the variance of ``correction`` = Q_L - Q_m0 (with its margin) and its covariance with
    Q_m0. No deep term (zeros) without at least two deep probes and a nonzero correction."""
    x = _control_variate(shallow, quadratic, trace)
    total, deep = x.numel(), correction.numel()
    dof_x = max(total - 2, 1) if total > 2 else max(total - 1, 1)
    var_x = (x - x.mean()).square().sum().item() / dof_x
    if deep <= 1 or correction.abs().max() == 0:
        return x, var_x, 0.0, 0.0
    y, x_deep = correction - correction.mean(), x[:deep] - x[:deep].mean()
    var_y = y.square().sum().item() / (deep - 1) * _spread_margin(deep)
    return x, var_x, var_y, (x_deep * y).sum().item() / (deep - 1)


def _two_level(shallow: Tensor, quadratic: Tensor, correction: Tensor, trace: float) -> tuple[float, float]:
    """Estimate and standard error of tr f(Sigma) = E[Q_m0] + E[Q_L - Q_m0]: ``shallow`` (P0,) are Q_m0 of all
    probes, the first ``correction.numel()`` of which are the deep ones with ``correction`` = Q_L - Q_m0 (empty
    for one level). The variance counts the covariance of the two terms, which share the deep probes."""
    x, var_x, var_y, cov = _spreads(shallow, quadratic, correction, trace)
    total, deep = x.numel(), max(correction.numel(), 1)
    variance = var_x / total + var_y / deep + 2 * cov / total
    mean_correction = correction.mean().item() if correction.numel() else 0.0
    return x.mean().item() + mean_correction, math.sqrt(max(variance, 0.0))


_CONFIDENCE = 2.5  # z-score on the probes' standard error
# Share of rtol given to the quadrature error; the probes get the rest. The error is judged by the change of the
# midpoint over the last _LOOKBACK steps (the rigorous half-gap was 20x the actual error of the midpoint on square
# Marchenko-Pastur matrices, and the change 3-8x), with the half-gap itself held within _GAP_LIMIT x the share,
# which stops a midpoint that stalls while the bracket is still wide.
_BIAS_SHARE = 0.2
_LOOKBACK = 8
_GAP_LIMIT = 5.0
_PILOT_PROBES = 16
_MAX_ROUNDS = 4
_SHALLOW_DEPTHS = (4, 6, 8, 12, 16, 24, 32, 48, 64)


def _midpoints(a: Tensor, b: Tensor, weights: Tensor, alpha: float, depth: int) -> tuple[Tensor, Tensor]:
    """Per probe, the mean of the Gauss and Gauss-Radau rules after the first ``depth`` Lanczos steps, and their gap."""
    gauss, radau = _gauss_radau(a[:, :depth].contiguous(), b[:, :depth].contiguous(), weights, alpha)
    return (gauss + radau) / 2, gauss - radau


def _quadrature(op: _Covariance, probes: Tensor, steps: int, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per probe (Gauss, Gauss-Radau, v^T Sigma v), ``steps`` Lanczos steps, in chunks of at most ~256 MiB."""
    chunk = max(16, 2**26 // (steps * op.size))
    results = []
    for block in probes.split(chunk, dim=1):
        weights = block.double().square().sum(0)
        a, b = _lanczos(op, block, steps)
        results.append((*_gauss_radau(a, b, weights, alpha), weights * a[:, 0]))
    return tuple(torch.cat(parts) for parts in zip(*results))


def _probes_needed(shallow: Tensor, quadratic: Tensor, correction: Tensor, trace: float, goal: float) -> int | None:
    """Shallow probes (a multiple of 8) to add so that the standard error of ``_two_level`` reaches ``goal``, from
    the spreads so far; None when the deep probes' spread of ``correction`` alone takes most of the goal."""
    x, var_x, var_y, cov = _spreads(shallow, quadratic, correction, trace)
    total, deep = x.numel(), correction.numel()
    room = goal**2 - var_y / deep
    if room <= 0.25 * goal**2:
        return None
    return 8 * math.ceil(max(math.ceil(1.1 * max(var_x + 2 * cov, 0.0) / room) - total, 0) / 8)


def _slq(
    op: _Covariance,
    alpha: float,
    rtol: float,
    generator: torch.Generator,
    num_probes: int | None,
    num_steps: int | None,
    budget: float,
) -> EigenScoreEstimate | None:
    """Adaptive two-level SLQ on the deflated operator: a pilot of ``_PILOT_PROBES`` probes runs Lanczos steps until
    the Gauss / Gauss-Radau gap is within ``_BIAS_SHARE * rtol`` of the score; then shallow probes, at the depth
    that the pilot's spreads make cheapest, until ``_CONFIDENCE`` standard errors fit in the rest of ``rtol``.
    Returns None as soon as the cost still to pay is projected to exceed ``budget`` (flop-equivalents: the exact
    score's cost, or inf)."""
    deflated = _Deflated(op, alpha, generator)
    budget -= deflated.setup_cost
    op = deflated if deflated.rank else op
    num_rows, known, trace = op.num_rows, op.known_logdet(alpha), op.trace
    first = num_probes or _PILOT_PROBES
    probes = op.probes(first, generator)
    weights = probes.double().square().sum(0)
    state = {"converged": False, "over_budget": False}
    history: dict[int, float] = {}  # Lanczos steps -> the pilot's mean Gauss / Gauss-Radau midpoint

    def score(trace_estimate: float) -> float:
        return (trace_estimate + known) / num_rows

    def goal(abs_score: float) -> float:
        return (1 - _BIAS_SHARE) * rtol * abs_score / _CONFIDENCE * num_rows

    def stop(a: Tensor, b: Tensor) -> bool:
        gauss, radau = _gauss_radau(a, b, weights, alpha)
        estimate, std_error = _combine((gauss + radau) / 2, weights * a[:, 0], trace)
        steps, gap = a.shape[1], (gauss - radau).mean().item() / 2 / num_rows
        history[steps] = ((gauss + radau) / 2).mean().item() / num_rows
        change = abs(history[steps] - history.get(steps - _LOOKBACK, math.inf))
        tolerance = _BIAS_SHARE * rtol * abs(score(estimate))
        state["converged"] = gap <= tolerance or (change <= tolerance and gap <= _GAP_LIMIT * tolerance)
        state.setdefault("first_gap", (steps, gap))
        if state["converged"]:
            return True  # what it costs from here is for the plan to weigh
        # Project the cost still to pay (what is spent is spent either way): the steps left if the gap keeps
        # shrinking at its mean rate so far (it speeds up later, so this errs towards exact), and the probes for the
        # standard error at the smaller rule's score, run 4 steps deep (the plan made after the pilot chooses).
        rate = (gap / state["first_gap"][1]) ** (1 / max(steps - state["first_gap"][0], 1))
        steps_left = 0.0  # no rate yet (first look), or the gap is not shrinking: the step limit decides
        if 0 < rate < 1:
            steps_left = _LOOKBACK
            if gap > _GAP_LIMIT * tolerance:
                steps_left = min(400.0, math.log(_GAP_LIMIT * tolerance / gap) / math.log(rate))
        smallest = min(abs(score(gauss.mean().item())), abs(score(radau.mean().item())))
        extra = min(max(math.ceil(1.1 * first * (std_error / goal(smallest)) ** 2) - first, 0), op.size)
        state["over_budget"] = steps_left * op.step_cost(first) + 4 * op.step_cost(extra) > budget
        return state["over_budget"]

    a, b = _lanczos(op, probes, num_steps or 400, None if num_steps else stop)
    if state["over_budget"]:
        return None
    steps = a.shape[1]
    deep, gaps = _midpoints(a, b, weights, alpha, steps)
    pilot_at = {steps: deep}  # the pilot's Q_m at the depths looked at

    def pilot(m: int) -> Tensor:
        if m not in pilot_at:
            pilot_at[m] = _midpoints(a, b, weights, alpha, m)[0]
        return pilot_at[m]

    shallow, quadratic, depth = deep, weights * a[:, 0], steps
    estimate, std_error = _two_level(shallow, quadratic, deep - shallow, trace)
    for round_ in range(0 if num_probes else _MAX_ROUNDS):
        target = goal(abs(score(estimate)))
        if std_error <= target:
            break
        # The first round chooses the shallow depth (only the full depth when the steps were fixed); later rounds
        # keep it and add probes where the first fell short.
        options = [(depth * op.step_cost(op.size), depth, op.size)]
        for m in [m for m in _SHALLOW_DEPTHS if m < steps and not num_steps and round_ == 0] + [depth]:
            candidate = shallow if m == depth else pilot(m)
            extra = _probes_needed(candidate, quadratic, deep - pilot(m), trace, target)
            if extra is not None and extra < op.size:
                options.append((m * op.step_cost(extra), m, extra))
        cost, m, extra = min(options, key=lambda option: (option[0], -option[1]))
        if cost > budget:
            return None
        if m != depth:
            shallow, depth = pilot(m), m
        gauss, radau, more_quadratic = _quadrature(
            op, op.probes(None if extra == op.size else extra, generator), depth, alpha
        )
        if extra == op.size:  # unit vectors: the trace up to quadrature error, no sampling error
            estimate, std_error = op.size * ((gauss + radau) / 2).mean().item(), 0.0
            gaps, shallow = op.size * (gauss - radau), torch.cat([shallow, gauss])
            break
        shallow, quadratic = torch.cat([shallow, (gauss + radau) / 2]), torch.cat([quadratic, more_quadratic])
        estimate, std_error = _two_level(shallow, quadratic, deep - shallow[: deep.numel()], trace)
    if num_steps or num_probes:
        reason = "fixed settings"
    else:
        reason = "converged" if state["converged"] else "step limit"
    return EigenScoreEstimate(
        score=torch.tensor(score(estimate), dtype=op.z.dtype, device=op.z.device),
        method="slq",
        reason=reason,
        num_probes=shallow.numel(),
        num_steps=steps,
        std_error=std_error / num_rows,
        quadrature_bound=gaps.mean().item() / 2 / num_rows,
        shallow_steps=depth,
        deflated=deflated.rank,
    )
