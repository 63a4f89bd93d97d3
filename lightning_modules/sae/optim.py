"""The optimiser and learning-rate schedule of SparseAutoencoderModule and SparseAutoencoderSweep."""

from __future__ import annotations

import torch

_FUSED_ADAM_DEVICES = ("cpu", "cuda")


def adam(params, **settings) -> torch.optim.Adam:
    """``torch.optim.Adam(params, **settings)`` (parameters or parameter groups), fused where all the parameters are
    on a device with torch's fused Adam kernel (``fused=True``: one pass over each tensor instead of about ten
    elementwise ones, which on CPU took longer than an SAE's backward). The same update to float rounding; the
    state (``exp_avg``, ``exp_avg_sq``, ``step``) keeps its names, so checkpoints load either way."""
    params = list(params)
    tensors = [p for group in params for p in group["params"]] if isinstance(params[0], dict) else params
    fused = all(p.device.type in _FUSED_ADAM_DEVICES and p.is_floating_point() for p in tensors)
    return torch.optim.Adam(params, fused=fused, **settings)


def linear_warmup(steps: int):
    """The learning-rate factor of step ``step``: rising linearly to 1 over ``steps`` steps (0: 1 from the start)."""
    if not steps:
        return lambda step: 1.0
    return lambda step: min(1.0, (step + 1) / steps)


def parameter_groups(parameters, decoder: torch.nn.Parameter, lr: float, decoder_lr_multiplier: float) -> list[dict]:
    """Adam parameter groups of one SAE: all its ``parameters`` at ``lr``, or, with a ``decoder_lr_multiplier`` other
    than 1, the ``decoder`` weight in a second group at that multiple (docs/sae.md, Decoder learning rate). One group
    where the multiplier is 1 keeps the optimizer state of checkpoints written before the setting existed loadable."""
    parameters = list(parameters)
    if decoder_lr_multiplier == 1:
        return [{"params": parameters, "lr": lr}]
    rest = [parameter for parameter in parameters if parameter is not decoder]
    return [{"params": rest, "lr": lr}, {"params": [decoder], "lr": lr * decoder_lr_multiplier}]
