"""Reading and replacing one activation site of a frozen language model.

The three sites of a Llama-style decoder layer (ALGORITHMS.md §3):

- ``attn_sublayer``: the output of ``model.layers.{}.self_attn`` (a tuple; element 0 is what enters the residual).
- ``mlp_sublayer``: the output of ``model.layers.{}.mlp``.
- ``mlp_activations``: the INPUT of ``model.layers.{}.mlp.down_proj``, i.e. ``act_fn(gate_proj x) * up_proj x``.
  Hooking ``mlp.act_fn`` (the original scripts' example) would miss the ``up_proj`` product.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HOOK_POINTS: dict[str, str] = {
    "attn_sublayer": "model.layers.{}.self_attn",
    "mlp_sublayer": "model.layers.{}.mlp",
    "mlp_activations": "model.layers.{}.mlp.down_proj",
}
"""Default module path templates per layer type; ``{}`` is replaced by the layer index."""

LAYER_TYPES = tuple(HOOK_POINTS)

# For these layer types the hooked module's input is the activation; for the others its output.
_READS_INPUT = frozenset({"mlp_activations"})


class HookPoint(NamedTuple):
    name: str
    """Full module path, e.g. ``model.layers.15.mlp.down_proj``."""
    module: nn.Module
    reads_input: bool
    """True: the activation is the module's (first) input; False: its output (element 0 of a tuple)."""


class _StopForward(Exception):
    """Raised by the capture hook so that layers after the hooked one never run."""


def num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "num_hidden_layers", None)


def resolve_hook_point(
    model: nn.Module, layer_type: str, layer_id: int, hook_points: dict[str, str] | None = None
) -> HookPoint:
    """Find the module to hook, with an error that names the fix for every way this can go wrong."""
    templates = {**HOOK_POINTS, **(hook_points or {})}
    if layer_type not in templates:
        raise ValueError(f"unknown layer_type '{layer_type}'; choose one of {', '.join(LAYER_TYPES)}")
    n = num_layers(model)
    if n is not None and not 0 <= layer_id < n:
        raise ValueError(f"layer_id {layer_id} is out of range: the model has {n} layers (0-{n - 1})")
    name = templates[layer_type].format(layer_id)
    modules = dict(model.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, list(modules), n=3, cutoff=0.5)
        hint = f"; closest module paths: {', '.join(close)}" if close else ""
        raise ValueError(
            f"hook point '{name}' (layer_type '{layer_type}', template '{templates[layer_type]}') "
            f"not found in {type(model).__name__}{hint}"
        )
    return HookPoint(name, modules[name], layer_type in _READS_INPUT)


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value, replacement: Tensor):
    return (replacement, *value[1:]) if isinstance(value, tuple) else replacement


class HookedLLM:
    """A frozen causal LM plus one hook point: harvest activations, or splice a replacement back in.

    Args:
        model: a Hugging Face causal LM (Llama-style module names unless ``hook_points`` says otherwise).
        layer_type: one of ``LAYER_TYPES``.
        layer_id: decoder layer index.
        hook_points: overrides of the ``HOOK_POINTS`` templates.
    """

    def __init__(
        self, model: nn.Module, layer_type: str, layer_id: int, hook_points: dict[str, str] | None = None
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.layer_type = layer_type
        self.layer_id = layer_id
        self.hook_point = resolve_hook_point(model, layer_type, layer_id, hook_points)
        self.d_in = self._probe_width()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _probe_width(self) -> int:
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        return self.harvest(ids).shape[-1]

    @torch.no_grad()
    def harvest(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Activations at the hook point, (batch, seq, d_in); the layers after it are not run."""
        captured: list[Tensor] = []

        def capture(value) -> None:
            captured.append(_first(value).detach())
            raise _StopForward

        module = self.hook_point.module
        if self.hook_point.reads_input:
            handle = module.register_forward_pre_hook(lambda _m, args: capture(args))
        else:
            handle = module.register_forward_hook(lambda _m, _args, output: capture(output))
        try:
            self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"hook point '{self.hook_point.name}' was not reached by the forward pass")
        return captured[0]

    @torch.no_grad()
    def logits_with(self, input_ids: Tensor, replace: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Full-model logits, (batch, seq, vocab), with the hooked activation passed through ``replace``."""
        if replace is None:
            return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits

        module = self.hook_point.module
        if self.hook_point.reads_input:
            handle = module.register_forward_pre_hook(lambda _m, args: _replace_first(args, replace(args[0])))
        else:
            handle = module.register_forward_hook(lambda _m, _a, out: _replace_first(out, replace(_first(out))))
        try:
            return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits
        finally:
            handle.remove()

    @torch.no_grad()
    def splice_metrics(
        self, input_ids: Tensor, reconstruct: Callable[[Tensor], Tensor], skip_first_position: bool = False
    ) -> dict[str, Tensor]:
        """Next-token CE of the clean model, with the reconstruction spliced in, and with the site zero-ablated.

        Returns ``ce_clean``, ``ce_spliced``, ``ce_zero``, ``ce_loss_recovered`` =
        (CE_zero - CE_spliced) / (CE_zero - CE_clean), and ``kl`` = KL(clean || spliced) per token (nats).
        ``reconstruct`` maps (batch, seq, d_in) activations to their reconstruction. With
        ``skip_first_position`` position 0 keeps its clean activation (the SAE never saw it in training).
        """

        def keep_first(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
            if not skip_first_position:
                return fn
            return lambda acts: torch.cat([acts[:, :1], fn(acts[:, 1:])], dim=1)

        input_ids = input_ids.to(self.device)
        targets = input_ids[:, 1:]
        clean = self.logits_with(input_ids)[:, :-1].float()
        spliced = self.logits_with(input_ids, keep_first(lambda a: reconstruct(a).to(a.dtype)))[:, :-1].float()
        zero = self.logits_with(input_ids, keep_first(torch.zeros_like))[:, :-1].float()

        def ce(logits: Tensor) -> Tensor:
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

        ce_clean, ce_spliced, ce_zero = ce(clean), ce(spliced), ce(zero)
        log_p, log_q = clean.log_softmax(-1), spliced.log_softmax(-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        return {
            "ce_clean": ce_clean,
            "ce_spliced": ce_spliced,
            "ce_zero": ce_zero,
            "ce_loss_recovered": (ce_zero - ce_spliced) / (ce_zero - ce_clean),
            "kl": kl,
        }
