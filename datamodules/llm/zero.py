"""Whole-tensor access to parameters, gradients and Adam moments, whether or not DeepSpeed ZeRO shards them.

Under ZeRO the optimizer owns partitioned fp32 master weights and moments: editing ``param.data`` alone is
overwritten at the next step, and under stage 3 ``param.data`` is an empty placeholder. The SAE's decoder
renormalisation and dead-latent resampling go through these functions so that they work under every strategy.
Collective under DeepSpeed: every rank must call them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def zero_stage(param: nn.Parameter) -> int:
    """3 or 2 where DeepSpeed ZeRO partitions ``param`` at that stage, else 0."""
    if hasattr(param, "ds_id"):
        return 3
    if hasattr(param, "_hp_mapping"):
        return 2
    return 0


def strategy_is_zero3(strategy) -> bool:
    """Whether a Lightning strategy (or None) runs DeepSpeed ZeRO stage 3."""
    return bool(getattr(strategy, "zero_stage_3", False))


@contextmanager
def hf_zero3_loading(strategy) -> Iterator[None]:
    """Around ``from_pretrained`` inside ``configure_model``: under ZeRO stage 3 Lightning has opened
    ``zero.Init``, and Hugging Face loads weights into the partitioned parameters only while it knows the
    DeepSpeed config. Elsewhere a no-op."""
    if not strategy_is_zero3(strategy):
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_ds_config = HfDeepSpeedConfig(strategy.config)  # noqa: F841 (kept alive: HF holds only a weak reference)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def full_param(param: nn.Parameter) -> Tensor:
    """The whole parameter (the fp32 master copy under ZeRO)."""
    if zero_stage(param):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)
    return param.detach()


def set_param(param: nn.Parameter, value: Tensor) -> None:
    stage = zero_stage(param)
    if not stage:
        with torch.no_grad():
            param.copy_(value)
        return
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(param, value)
    # The low-precision working copy is what the next forward reads; refresh it too.
    if stage == 3:
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                param.data.copy_(value.to(param.dtype))
    else:
        param.data.copy_(value.to(param.dtype))


def update_param(param: nn.Parameter, fn: Callable[[Tensor], Tensor]) -> None:
    """Replace the parameter w by ``fn(w)``; ``fn`` may write into its argument and return it (in place, without a
    copy, where ZeRO does not partition the parameter)."""
    with torch.no_grad():
        value = full_param(param)
        set_param(param, fn(value.clone() if zero_stage(param) else value))


def update_grad(param: nn.Parameter, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    """Replace the gradient g by ``fn(g, param)``; a no-op where the parameter has no gradient yet. ``fn`` may write
    into g and return it."""
    with torch.no_grad():
        if not zero_stage(param):
            if param.grad is not None:
                param.grad.copy_(fn(param.grad, param.detach()))
            return
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

        grad = safe_get_full_grad(param)
        if grad is not None:
            safe_set_full_grad(param, fn(grad, full_param(param).to(grad.dtype)))


def zero_adam_rows(optimizer: torch.optim.Optimizer, param: nn.Parameter, rows: Tensor) -> None:
    """Zero the Adam moments (exp_avg, exp_avg_sq) of ``param`` at ``rows`` (a bool mask or indices)."""
    with torch.no_grad():
        if zero_stage(param):
            from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

            for key in ("exp_avg", "exp_avg_sq"):
                moment = safe_get_full_optimizer_state(param, key)
                if moment is not None:
                    moment = moment.clone()
                    moment[rows.to(moment.device)] = 0
                    safe_set_full_optimizer_state(param, moment, key)
            return
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][rows.to(state[key].device)] = 0
