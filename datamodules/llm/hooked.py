"""Reading and replacing one activation site of a frozen language model.

The five sites of a Llama-style decoder layer (docs/sae.md, Sites):

- ``resid_pre``: the residual stream entering ``model.layers.{}`` (its input; for layer 0, the token embeddings).
- ``resid_post``: the residual stream leaving ``model.layers.{}`` (its output, before the next layer; for the last
  layer, before the final norm).
- ``attn_sublayer``: the output of ``model.layers.{}.self_attn`` (a tuple; element 0 is what enters the residual).
- ``mlp_sublayer``: the output of ``model.layers.{}.mlp``.
- ``mlp_activations``: the INPUT of ``model.layers.{}.mlp.down_proj``, i.e. ``act_fn(gate_proj x) * up_proj x``.
  Hooking ``mlp.act_fn`` would miss the ``up_proj`` product.

Harvesting runs only what the site needs: the embedding, the decoder layers before the hooked one, and of the
hooked layer its attention (plus its MLP for the two MLP sites, the whole layer for ``resid_post``), calling the
model's own modules in the order its forward does, so the activations are bit-identical to a hooked full forward
(checked on a probe input at construction; models whose layout differs fall back to the hooked forward stopped by
an exception).
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neurolight.datamodules.llm.truncated import causal_mask, compiled, forward_to_sites, probe_mismatch, run

HOOK_POINTS: dict[str, str] = {
    "resid_pre": "model.layers.{}",
    "resid_post": "model.layers.{}",
    "attn_sublayer": "model.layers.{}.self_attn",
    "mlp_sublayer": "model.layers.{}.mlp",
    "mlp_activations": "model.layers.{}.mlp.down_proj",
}
"""Default module path templates per layer type; ``{}`` is replaced by the layer index."""

LAYER_TYPES = tuple(HOOK_POINTS)

# Gemma-2 and Gemma-3 normalise each sublayer's output before adding it to the residual stream (their pre-MLP norm is
# pre_feedforward_layernorm): what enters the residual there is the post-norm's output, which is also what
# TransformerLens's hook_mlp_out reads on these models (docs/sae.md, Sites).
_POST_NORM_SUBLAYERS = {
    "attn_sublayer": "model.layers.{}.post_attention_layernorm",
    "mlp_sublayer": "model.layers.{}.post_feedforward_layernorm",
}


def _normalises_sublayer_outputs(model: nn.Module) -> bool:
    """Whether the model's layers normalise each sublayer's output before the residual add (Gemma-2/3)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers is not None and len(layers) > 0 and hasattr(layers[0], "post_feedforward_layernorm")


def model_hook_points(model: nn.Module) -> dict[str, str]:
    """The default module path templates of the sites in this model's layout: ``HOOK_POINTS``, with the sublayer
    sites at their output norms where the layers normalise sublayer outputs (Gemma-2/3)."""
    return {**HOOK_POINTS, **_POST_NORM_SUBLAYERS} if _normalises_sublayer_outputs(model) else HOOK_POINTS


# For these layer types the hooked module's input is the activation; for the others its output.
_READS_INPUT = frozenset({"mlp_activations", "resid_pre"})


class HookPoint(NamedTuple):
    name: str
    """Full module path, e.g. ``model.layers.15.mlp.down_proj``."""
    module: nn.Module
    reads_input: bool
    """True: the activation is the module's (first) input; False: its output (element 0 of a tuple)."""


class StopForward(Exception):
    """Raised by a capture hook once it has what it needs, so that the layers after it never run; the caller
    catches it around the forward (and removes the hook in ``finally``)."""


def num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "num_hidden_layers", None)


def resolve_hook_point(
    model: nn.Module, layer_type: str, layer_id: int, hook_points: dict[str, str] | None = None
) -> HookPoint:
    """Find the module to hook, with an error that names the fix for every way this can go wrong. A template equal to
    ``HOOK_POINTS``'s (the data modules pass the defaults along) means the site where this model's layout has it
    (``model_hook_points``)."""
    defaults = model_hook_points(model)
    given = {site: template for site, template in (hook_points or {}).items() if template != HOOK_POINTS.get(site)}
    templates = {**defaults, **given}
    if layer_type not in templates:
        raise ValueError(f"unknown layer_type '{layer_type}'; choose one of {', '.join(LAYER_TYPES)}")
    n = num_layers(model)
    if n is not None and not 0 <= layer_id < n:
        raise ValueError(f"layer_id {layer_id} is out of range: the model has {n} layers (0-{n - 1})")
    name = templates[layer_type].format(layer_id)
    _refuse_mislabelled_site(layer_type, templates[layer_type], name, layer_id, defaults)
    modules = dict(model.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, list(modules), n=3, cutoff=0.5)
        hint = f"; closest module paths: {', '.join(close)}" if close else ""
        raise ValueError(
            f"hook point '{name}' (layer_type '{layer_type}', template '{templates[layer_type]}') "
            f"not found in {type(model).__name__}{hint}"
        )
    return HookPoint(name, modules[name], layer_type in _READS_INPUT)


def _refuse_mislabelled_site(layer_type: str, template: str, name: str, layer_id: int, defaults: dict) -> None:
    """A template override that names another site's default module would be labelled by the wrong site in runs,
    checkpoints and stores (an MLP-output template pointed at ``model.layers.{}`` reads the residual stream)."""
    if template == defaults[layer_type]:
        return
    reads_input = layer_type in _READS_INPUT
    for other, other_template in defaults.items():
        if other != layer_type and other_template.format(layer_id) == name and (other in _READS_INPUT) == reads_input:
            raise ValueError(
                f"the {layer_type}_hookpoint template '{template}' names the {other} site's module '{name}'; set "
                f"layer_type: {other} (and drop the template override) so the run is labelled by its real site"
            )


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value, replacement: Tensor):
    return (replacement, *value[1:]) if isinstance(value, tuple) else replacement


# A decoder layer may receive its residual input by keyword (transformers passes it positionally today).
_INPUT_KEYWORDS = ("hidden_states", "input", "x")


def module_input(args: tuple, kwargs: dict) -> Tensor:
    """The first input of a module call, positional or by keyword."""
    if args:
        return args[0]
    for key in _INPUT_KEYWORDS:
        if key in kwargs:
            return kwargs[key]
    raise RuntimeError(f"cannot find the module's input among its keyword arguments {sorted(kwargs)}")


def _replace_input(args: tuple, kwargs: dict, replace: Callable[[Tensor], Tensor]) -> tuple[tuple, dict]:
    """(args, kwargs) of a module call with its first input passed through ``replace``."""
    if args:
        return (replace(args[0]), *args[1:]), kwargs
    key = next(key for key in _INPUT_KEYWORDS if key in kwargs)
    return args, {**kwargs, key: replace(kwargs[key])}


def truncation_blocker(model: nn.Module, layer_type: str, layer_id: int, hook_point: HookPoint) -> str | None:
    """Why the truncated forward (``truncated.forward_to_sites``) cannot stand in for the hooked forward of this
    model at this site (None: it can)."""
    if _normalises_sublayer_outputs(model):
        return "sublayer outputs normalised before the residual add (Gemma-2/3 layout)"
    if hook_point.name != HOOK_POINTS[layer_type].format(layer_id):
        return f"custom hook point '{hook_point.name}'"
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, name) for name in ("embed_tokens", "rotary_emb", "layers")):
        return f"{type(model).__name__} has no model.embed_tokens / rotary_emb / layers"
    layer = inner.layers[layer_id]
    # The residual sites call whole layers; the sublayer sites call the layer's parts in its own order.
    needed = (
        () if layer_type.startswith("resid_") else ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    )
    if not all(hasattr(layer, name) for name in needed):
        return f"{type(layer).__name__} lacks one of {', '.join(needed)}"
    if layer_type == "mlp_activations" and not all(hasattr(layer.mlp, n) for n in ("act_fn", "gate_proj", "up_proj")):
        return f"{type(layer.mlp).__name__} is not a gated MLP (act_fn, gate_proj, up_proj)"
    # Sliding-window layers need another mask than create_causal_mask's (Mistral, Gemma, Qwen2 with windows on).
    config = model.config
    types = getattr(config, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types[: layer_id + 1]):
        return "sliding-window attention layers"
    if types is None and getattr(config, "sliding_window", None) is not None:
        return "sliding-window attention"
    return None


def _keep_first(fn: Callable[[Tensor], Tensor], skip_first_position: bool) -> Callable[[Tensor], Tensor]:
    """``fn`` applied to the activations, position 0 left clean where ``skip_first_position``."""
    if not skip_first_position:
        return fn
    return lambda acts: torch.cat([acts[:, :1], fn(acts[:, 1:])], dim=1)


class HookedLLM:
    """A frozen causal LM plus one hook point: harvest activations, or splice a replacement back in.

    Args:
        model: a Hugging Face causal LM (Llama-style module names unless ``hook_points`` says otherwise).
        layer_type: one of ``LAYER_TYPES``.
        layer_id: decoder layer index.
        hook_points: overrides of the ``HOOK_POINTS`` templates.
        compile: ``torch.compile`` the truncated forward (fixed shapes: ``dynamic=False``); ignored where the model
            falls back to the hooked forward.
        compile_mode: ``torch.compile`` mode; default ``reduce-overhead`` (CUDA graphs) on CUDA, and on CPU
            inductor with frozen weights and merged products (docs/sae.md, The forward on CPU; run in inference mode).
    """

    def __init__(
        self,
        model: nn.Module,
        layer_type: str,
        layer_id: int,
        hook_points: dict[str, str] | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.layer_type = layer_type
        self.layer_id = layer_id
        self.hook_point = resolve_hook_point(model, layer_type, layer_id, hook_points)
        self.truncated = False
        blocker = truncation_blocker(model, layer_type, layer_id, self.hook_point)
        if blocker is None:
            blocker = self._check_truncation()
        if blocker is not None:
            warnings.warn(
                f"harvesting through the hooked full forward ({blocker}): slower, same activations", stacklevel=2
            )
        self.truncated = blocker is None
        self._site_fn = self._forward_to_site
        if compile and self.truncated:
            self._site_fn = compiled(self._forward_to_site, self.device, compile_mode)
        self.compiled = compile and self.truncated
        self.d_in = self._probe_width()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _probe_width(self) -> int:
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        # Eager even when compiled: compiling for this shape would be wasted (dynamic=False).
        if self.truncated:
            return self._forward_to_site(ids, self._causal_mask(ids)).shape[-1]
        return self._harvest_hooked(ids, None).shape[-1]

    def _check_truncation(self) -> str | None:
        """None if the truncated forward reproduces the hooked one on a probe input, else what differs."""
        site = (self.layer_type, self.layer_id)
        return probe_mismatch(self.model, [site], lambda ids: [self._harvest_hooked(ids, None)])

    def _causal_mask(self, input_ids: Tensor):
        return causal_mask(self.model, input_ids)

    def _forward_to_site(self, input_ids: Tensor, mask, position_embeddings=None) -> Tensor:
        """LlamaModel.forward (no cache, no padding) up to the site, without its per-call wrappers."""
        site = (self.layer_type, self.layer_id)
        return forward_to_sites(self.model, [site], input_ids, mask, position_embeddings)[0]

    @torch.no_grad()
    def harvest(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Activations at the hook point, (batch, seq, d_in); the layers after it are not run."""
        input_ids = input_ids.to(self.device)
        if not self.truncated or attention_mask is not None:
            return self._harvest_hooked(input_ids, attention_mask)
        return run(self._site_fn, self.model, input_ids, self.compiled)

    def _harvest_hooked(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        captured: list[Tensor] = []

        def capture(value) -> None:
            captured.append(_first(value).detach())
            raise StopForward

        module = self.hook_point.module
        if self.hook_point.reads_input:
            handle = module.register_forward_pre_hook(
                lambda _m, args, kwargs: capture(module_input(args, kwargs)), with_kwargs=True
            )
        else:
            handle = module.register_forward_hook(lambda _m, _args, output: capture(output))
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
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
            handle = module.register_forward_pre_hook(
                lambda _m, args, kwargs: _replace_input(args, kwargs, replace), with_kwargs=True
            )
        else:
            handle = module.register_forward_hook(lambda _m, _a, out: _replace_first(out, replace(_first(out))))
        try:
            return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits
        finally:
            handle.remove()

    @torch.no_grad()
    def reference_logits(self, input_ids: Tensor, skip_first_position: bool = False) -> dict[str, Tensor]:
        """The clean and the zero-ablated next-token logits of ``splice_metrics``, (batch, seq - 1, vocab) each:
        the same for every SAE spliced at this site into these contexts, so a sweep computes them once."""
        input_ids = input_ids.to(self.device)
        zero = _keep_first(torch.zeros_like, skip_first_position)
        return {
            "clean": self.logits_with(input_ids)[:, :-1].float(),
            "zero": self.logits_with(input_ids, zero)[:, :-1].float(),
        }

    @torch.no_grad()
    def splice_metrics(
        self,
        input_ids: Tensor,
        reconstruct: Callable[[Tensor], Tensor],
        skip_first_position: bool = False,
        reference: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Next-token CE of the clean model, with the reconstruction spliced in, and with the site zero-ablated.

        Returns ``ce_clean``, ``ce_spliced``, ``ce_zero``, ``ce_loss_recovered`` =
        (CE_zero - CE_spliced) / (CE_zero - CE_clean), and ``kl`` = KL(clean || spliced) per token (nats).
        ``reconstruct`` maps (batch, seq, d_in) activations to their reconstruction. With
        ``skip_first_position`` position 0 keeps its clean activation (the SAE never saw it in training).
        ``reference``: ``reference_logits`` of the same contexts, where already computed.
        """
        input_ids = input_ids.to(self.device)
        targets = input_ids[:, 1:]
        reference = reference or self.reference_logits(input_ids, skip_first_position)
        clean, zero = reference["clean"], reference["zero"]
        splice = _keep_first(lambda a: reconstruct(a).to(a.dtype), skip_first_position)
        spliced = self.logits_with(input_ids, splice)[:, :-1].float()

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
