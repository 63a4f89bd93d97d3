"""AdamW for bfloat16 weights that does not lose small updates.

Under ``bf16-true`` the weights and torch's AdamW state are bfloat16, and every write rounds to nearest. An AdamW
step of lr 1e-5 changes a weight of magnitude 0.05 by 1/24 of bfloat16's spacing there (2^-12), so it rounds away
every time and fine-tuning silently does next to nothing; the second moment, updated by (1 - beta2) = 0.1% of
itself, is stuck the same way (it can grow, never decay). ``StochasticRoundingAdamW`` computes the step in float32
and writes the weights and the second moment back with stochastic rounding: up or down to a neighbouring bfloat16
number with probabilities that make the stored value equal the float32 result in expectation, so small updates
accumulate as they would in float32 (Gupta et al. 2015, "Deep learning with limited numerical precision";
Zamirai et al. 2020, "Revisiting BFloat16 training"). It costs no memory beyond torch's AdamW on the same weights.

Float32 parameters (``32-true``, ``bf16-mixed``, DeepSpeed's float32 master weights) get the plain AdamW update.
The random bits come from a generator seeded by (``seed``, step, parameter index), so every DDP rank rounds alike
(their weights stay identical) and a resumed run rounds as the uninterrupted one would have.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from neurolight.lightning_modules.counter_hash import MASK32, mix32

_LOW_PRECISION = (torch.bfloat16, torch.float16)
# Elements updated at a time. Bounds the float32 scratch whatever the parameter's size (an 8B model's embedding has
# 525M elements); the eager chunks are smaller so that their temporaries are reused from the allocator's cache
# (5x faster on CPU than 2^24), the fused ones larger so that an 8B model's step is a few hundred kernels.
_CHUNK_EAGER = 1 << 20
_CHUNK_FUSED = 1 << 24
# The eager step costs ~30 ns per element on a CPU thread, the compilation ~10-20 s once: compile from this size on.
_COMPILE_ON_CPU_FROM = 1 << 22


def random_bits(key: Tensor, start: int | Tensor, count: int) -> Tensor:
    """(count,) int64 uniform 32-bit words for elements ``start .. start + count`` of the stream ``key`` (a 0-dim
    int64 tensor): a counter-based hash, so the words depend only on (key, element index), not on chunking, device
    or a generator's state, and a compiled step computes them inside its one fused kernel."""
    index = torch.arange(count, device=key.device, dtype=torch.int64) + start
    return mix32(mix32(index) ^ key)


def stream_key(seed: int, step: int, index: int) -> int:
    """The key (a 32-bit int) of parameter ``index``'s random words at optimizer step ``step``."""
    key = seed & MASK32
    for word in (step, index):
        key = mix32(key ^ mix32(word & MASK32))
    return key


def stochastic_round_(target: Tensor, value: Tensor, bits: Tensor) -> Tensor:
    """Write float32 ``value`` into ``target`` (same shape) rounded stochastically to ``target``'s dtype, with
    ``bits`` (int64, same shape) uniform random 16-bit words.

    Each element becomes one of the two ``target``-dtype numbers around it, the farther one with probability
    |value - nearer| / |farther - nearer|, so E[target] = value. Values the dtype represents are kept exactly
    (zero stays zero). Float32 and float64 targets are copied as they are.
    """
    if target.dtype not in _LOW_PRECISION:
        return target.copy_(value)
    value = value.float()
    if target.dtype == torch.bfloat16:
        # bfloat16 is float32's upper 16 bits: add uniform noise below them, then truncate. In sign-magnitude the
        # integer addition moves the magnitude away from zero, so rounding is unbiased for either sign.
        noisy = (value.view(torch.int32) + bits.to(torch.int32)).bitwise_and(-(1 << 16))
        return target.copy_(noisy.view(torch.float32))
    nearest = value.to(target.dtype)
    error = value - nearest.float()
    toward = torch.where(error > 0, math.inf, -math.inf).to(target.dtype)
    farther = torch.nextafter(nearest, toward)
    gap = farther.float() - nearest.float()
    chance = torch.where(gap != 0, error / gap, 0.0)
    uniform = bits.to(torch.float32) / float(1 << 16)
    return target.copy_(torch.where(uniform < chance, farther, nearest))


def adamw_chunk_(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, key: Tensor, start: Tensor, hyper: Tensor
) -> None:
    """One AdamW step on 1-D slices (``param``'s elements ``start ..``), in float32, written back in place;
    low-precision ``param`` and ``exp_avg_sq`` with stochastic rounding. ``hyper`` = (lr / (1 - beta1^step),
    1 - beta1, beta2, 1 - beta2, eps, 1 - lr * weight_decay, sqrt(1 - beta2^step)), computed in float64 and passed
    as a float32 tensor (torch.optim.AdamW's arithmetic, and a compiled version is not recompiled as they change)."""
    step_size, one_minus_beta1, beta2, one_minus_beta2, eps, decay, correction2_sqrt = hyper.unbind()
    grad = grad.float()
    moment1 = exp_avg.float().lerp(grad, one_minus_beta1)
    moment2 = exp_avg_sq.float() * beta2 + one_minus_beta2 * grad * grad
    denom = moment2.sqrt() / correction2_sqrt + eps
    weights = param.float() * decay - step_size * (moment1 / denom)
    # The first moment, a 10% blend per step, is carried fine by rounding to nearest.
    exp_avg.copy_(moment1)
    if param.dtype in _LOW_PRECISION or exp_avg_sq.dtype in _LOW_PRECISION:
        bits = random_bits(key, start, param.numel())
        stochastic_round_(exp_avg_sq, moment2, bits & 0xFFFF)
        stochastic_round_(param, weights, bits >> 16)
    else:
        exp_avg_sq.copy_(moment2)
        param.copy_(weights)


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments; torch.optim.AdamW's update) computed in float32 and
    written back to bfloat16 / float16 weights and second moments with stochastic rounding.

    The state keys are torch's (``step``, ``exp_avg``, ``exp_avg_sq``, moments in the weight's dtype), so code that
    edits Adam moments (``neurolight.callbacks.SensitiveNeuronDropout``) works on either optimizer.

    ``compile``: run each chunk's update as one fused kernel (``torch.compile``; 54 ms instead of 516 ms eager for
    16M bf16 weights on one CPU thread, torch's bf16 AdamW 62 ms: ``bench/bf16_adamw.py``). None: on CUDA always,
    on CPU from 4M low-precision elements (below that the one-off compilation, 10-20 s, costs more than it saves).
    If compiling fails (no C++ compiler for the CPU backend, say), the step runs eagerly, with a warning that says
    why.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        seed: int = 0,
        compile: bool | None = None,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr={lr}, eps={eps} and weight_decay={weight_decay} must be >= 0")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas={tuple(betas)} must lie in [0, 1)")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.seed, self.compile = seed, compile
        self._compiled = None

    def _fused(self, device: torch.device, low_precision_elements: int) -> bool:
        if self.compile is not None:
            return self.compile
        return device.type == "cuda" or low_precision_elements >= _COMPILE_ON_CPU_FROM

    def _run_fused(self, *args) -> None:
        if self.compile is False:  # an earlier compilation failed
            adamw_chunk_(*args)
            return
        if self._compiled is None:
            compiled = torch.compile(adamw_chunk_, dynamic=True, fullgraph=True)
            try:
                compiled(*args)  # compiles; its writes happen only once the kernel runs
            except Exception as error:  # whatever inductor raises, the eager step computes the same
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                warnings.warn(
                    f"StochasticRoundingAdamW: torch.compile of the step failed ({type(error).__name__}: {reason}); "
                    "running it eagerly (same result, slower)",
                    stacklevel=3,
                )
                self.compile = False
                adamw_chunk_(*args)
                return
            self._compiled = compiled
            return
        self._compiled(*args)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work: dict[torch.device, list] = {}
        index = -1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                index += 1
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("StochasticRoundingAdamW does not support sparse gradients")
                if not param.is_contiguous():
                    raise RuntimeError(f"StochasticRoundingAdamW needs contiguous parameters; got {param.shape}")
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
                state["step"] += 1
                step, lr = int(state["step"].item()), group["lr"]
                hyper = (lr / (1.0 - beta1**step), 1.0 - beta1, beta2, 1.0 - beta2, group["eps"],
                         1.0 - lr * group["weight_decay"], math.sqrt(1.0 - beta2**step))  # fmt: skip
                key = stream_key(self.seed, step, index)
                flat = [param.view(-1), param.grad.reshape(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)]
                work.setdefault(param.device, []).append((flat, key, hyper))
        for device, params in work.items():
            low_precision = sum(flat[0].numel() for flat, _, _ in params if flat[0].dtype in _LOW_PRECISION)
            fused = self._fused(device, low_precision)
            size = _CHUNK_FUSED if fused else _CHUNK_EAGER
            chunks = [
                ([tensor[start : start + size] for tensor in flat], (key, start), hyper)
                for flat, key, hyper in params
                for start in range(0, flat[0].numel(), size)
            ]
            # The scalars of every chunk reach the device in two copies per step, not two per parameter.
            ints = _to_device(torch.tensor([words for _, words, _ in chunks], dtype=torch.int64), device)
            floats = _to_device(torch.tensor([hyper for _, _, hyper in chunks], dtype=torch.float32), device)
            update = self._run_fused if fused else adamw_chunk_
            for row, (chunk, _, _) in enumerate(chunks):
                update(*chunk, ints[row, 0], ints[row, 1], floats[row])
        return loss


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
