"""Other libraries' names of an activation site, mapped to neurolight's ``(layer_type, layer_id)`` for Llama-style
models, and back (docs/sae.md, Formats).

- SAELens on TransformerLens models: ``blocks.15.hook_resid_pre``, ``blocks.15.hook_resid_post``,
  ``blocks.15.hook_attn_out``, ``blocks.15.hook_mlp_out``, ``blocks.15.mlp.hook_post`` (the gated MLP's
  ``act_fn(gate) * up``, the input of ``W_out``).
- SAELens on Hugging Face models, and sparsify: the path of the module whose OUTPUT is read, with or without the
  ``model.`` prefix: ``model.layers.15`` (the residual stream leaving the layer), ``layers.15.mlp``,
  ``layers.15.self_attn``, ``layers.15.mlp.down_proj`` (its output is the MLP's).

neurolight's own sites are documented in ``neurolight.datamodules.llm.hooked``.
"""

from __future__ import annotations

import re

_TRANSFORMER_LENS = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_sublayer",
    "hook_mlp_out": "mlp_sublayer",
    "mlp.hook_post": "mlp_activations",
}
_MODULE_OUTPUTS = {
    "": "resid_post",
    ".mlp": "mlp_sublayer",
    ".mlp.down_proj": "mlp_sublayer",
    ".self_attn": "attn_sublayer",
}
_SPARSIFY_NAMES = {"resid_post": "layers.{}", "mlp_sublayer": "layers.{}.mlp", "attn_sublayer": "layers.{}.self_attn"}

_TL_PATTERN = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in _TRANSFORMER_LENS) + r")$")
_MODULE_PATTERN = re.compile(
    r"^(?:model\.)?layers\.(\d+)(" + "|".join(re.escape(k) for k in _MODULE_OUTPUTS if k) + r")?$"
)

ACCEPTED_FORMS = (
    "blocks.L.hook_resid_pre | blocks.L.hook_resid_post | blocks.L.hook_attn_out | blocks.L.hook_mlp_out | "
    "blocks.L.mlp.hook_post (TransformerLens, as SAELens names them); [model.]layers.L | [model.]layers.L.mlp | "
    "[model.]layers.L.self_attn | [model.]layers.L.mlp.down_proj | embed_tokens (module outputs, as SAELens on "
    "Hugging Face models and sparsify name them)"
)


def site_of_hook_name(hook_name: str) -> tuple[str, int]:
    """``(layer_type, layer_id)`` of a hook name in the TransformerLens or module-output convention; a ValueError
    listing the accepted forms where there is no neurolight site for it."""
    match = _TL_PATTERN.match(hook_name)
    if match:
        return _TRANSFORMER_LENS[match.group(2)], int(match.group(1))
    match = _MODULE_PATTERN.match(hook_name)
    if match:
        return _MODULE_OUTPUTS[match.group(2) or ""], int(match.group(1))
    if hook_name in ("embed_tokens", "model.embed_tokens"):  # its output is the residual entering layer 0
        return "resid_pre", 0
    raise ValueError(
        f"no neurolight site for the hook name '{hook_name}' on a Llama-style model; accepted forms: {ACCEPTED_FORMS}; "
        "or give the site directly (layer_type and layer_id)"
    )


def transformer_lens_hook_name(layer_type: str, layer_id: int) -> str:
    """The TransformerLens name of a neurolight site (what SAELens and Neuronpedia record as ``hook_name``)."""
    for suffix, site in _TRANSFORMER_LENS.items():
        if site == layer_type:
            return f"blocks.{layer_id}.{suffix}"
    raise ValueError(f"unknown layer_type '{layer_type}'; choose one of {', '.join(_TRANSFORMER_LENS.values())}")


def sparsify_hook_name(layer_type: str, layer_id: int) -> str | None:
    """sparsify's hookpoint of a neurolight site (the module whose output it reads); None for ``mlp_activations``,
    which no module outputs. The residual entering layer L is the output of layer L - 1 (of the embedding for 0)."""
    if layer_type == "resid_pre":
        return f"layers.{layer_id - 1}" if layer_id > 0 else "embed_tokens"
    template = _SPARSIFY_NAMES.get(layer_type)
    return None if template is None else template.format(layer_id)
