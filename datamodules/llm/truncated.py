"""The truncated forward: a Llama-style model's own modules called in its forward's order, up to the deepest site read.

``LlamaModel.forward`` without a cache or padding, stopped after the last site it is asked for and without the
per-call wrappers of the model's forward; several sites of one pass are read on the way (docs/sae.md, Sites). Where
a layer holds a sublayer site, the layer is run part by part (attention, residual add, norm, MLP, residual add),
as its forward runs them, so every site's value is bit-identical to a hooked full forward; the callers check that
on a probe input before trusting it (``HookedLLM``, ``capture.SitesReader``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from neurolight.datamodules.llm.models import cache_argument

_SUBLAYER_SITES = frozenset({"attn_sublayer", "mlp_sublayer", "mlp_activations"})


def _position_ids(input_ids: Tensor) -> Tensor:
    """(1, seq): the positions LlamaModel.forward gives unpadded input without a cache."""
    return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)


def causal_mask(model: nn.Module, input_ids: Tensor):
    """The mask LlamaModel.forward builds for unpadded input (None under SDPA: it uses is_causal)."""
    from transformers.masking_utils import create_causal_mask

    inputs_embeds = torch.empty(*input_ids.shape, 0, device=input_ids.device, dtype=model.dtype)
    return create_causal_mask(
        config=model.config,
        inputs_embeds=inputs_embeds,
        attention_mask=None,
        position_ids=_position_ids(input_ids),
        **{cache_argument(create_causal_mask): None},  # no cache, under either name
    )


def rotary_embeddings(model: nn.Module, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """The (cos, sin) LlamaModel.forward computes for unpadded input of ``input_ids``'s length."""
    like = torch.empty(0, device=input_ids.device, dtype=model.dtype)  # only its device and dtype are read
    return model.model.rotary_emb(like, position_ids=_position_ids(input_ids))


def forward_to_sites(
    model: nn.Module,
    sites: Sequence[tuple[str, int]],
    input_ids: Tensor,
    mask,
    position_embeddings: tuple[Tensor, Tensor] | None = None,
) -> list[Tensor]:
    """The activations of ``sites`` (``(layer_type, layer_id)`` pairs) for ``input_ids`` (batch, seq), in the order
    given; nothing after the deepest site runs. ``mask``: ``causal_mask(model, input_ids)``; ``position_embeddings``:
    ``rotary_embeddings(model, input_ids)``, computed here when None."""
    inner = model.model
    wanted: dict[int, set[str]] = {}
    for layer_type, layer_id in sites:
        wanted.setdefault(layer_id, set()).add(layer_type)
    read: dict[tuple[str, int], Tensor] = {}
    hidden = inner.embed_tokens(input_ids)
    if position_embeddings is None:
        position_embeddings = rotary_embeddings(model, input_ids)
    context = {
        "attention_mask": mask,
        "position_embeddings": position_embeddings,
        "position_ids": _position_ids(input_ids),
    }
    last = max(wanted)
    for layer_id, layer in enumerate(inner.layers[: last + 1]):
        here = wanted.get(layer_id, set())
        if "resid_pre" in here:
            read[("resid_pre", layer_id)] = hidden
        if layer_id == last and here <= {"resid_pre"}:
            break
        if not here & _SUBLAYER_SITES:
            hidden = layer(hidden, **context)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        else:
            hidden = _layer_by_parts(layer, hidden, context, here, layer_id, read, stop=layer_id == last)
        if "resid_post" in here:
            read[("resid_post", layer_id)] = hidden
    return [read[site] for site in sites]


def _layer_by_parts(layer: nn.Module, hidden: Tensor, context: dict, here: set, layer_id: int, read: dict, stop: bool):
    """One decoder layer run as its forward runs it, recording its sublayer sites; None where ``stop`` (the deepest
    layer) and nothing after its last site is needed."""
    attn = layer.self_attn(layer.input_layernorm(hidden), **context)[0]
    read[("attn_sublayer", layer_id)] = attn
    if stop and here <= {"resid_pre", "attn_sublayer"}:
        return None
    hidden = hidden + attn
    normed = layer.post_attention_layernorm(hidden)
    if "mlp_activations" in here:
        mlp = layer.mlp
        activations = mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed)
        read[("mlp_activations", layer_id)] = activations
        if stop and "mlp_sublayer" not in here and "resid_post" not in here:
            return None
        out = mlp.down_proj(activations)
    else:
        out = layer.mlp(normed)
    read[("mlp_sublayer", layer_id)] = out
    return None if stop and "resid_post" not in here else hidden + out


@torch.no_grad()
def probe_mismatch(
    model: nn.Module, sites: Sequence[tuple[str, int]], hooked: Callable[[Tensor], list[Tensor]]
) -> str | None:
    """None if ``forward_to_sites`` reproduces ``hooked`` (the hooked forward's activations of ``sites`` for given
    input ids) on a probe input, else what differs: the check ``HookedLLM`` and ``capture.SitesReader`` run before
    trusting the truncated forward."""
    ids = torch.randint(model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(model.parameters()).device)
    try:
        fast = forward_to_sites(model, sites, ids, causal_mask(model, ids))
    except Exception as error:  # an unexpected layer signature: the hooked forward still works
        return f"truncated forward failed: {error!r}"
    for (layer_type, layer_id), a, b in zip(sites, fast, hooked(ids)):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
            return f"truncated forward differs from the hooked one at layers.{layer_id}.{layer_type} on a probe input"
    return None


@torch.no_grad()
def run(fn: Callable, model: nn.Module, input_ids: Tensor, is_compiled: bool):
    """``fn(input_ids, causal_mask, rotary_embeddings)``: a truncated forward, or its ``compiled`` version (then in
    inference mode, what inductor's freezing compiles for, and its outputs copied: a CUDA-graph replay reuses its
    output memory, so the buffer may still hold the previous output's rows, and the copies, made outside inference
    mode, are ordinary tensors later code may write into). The rotary embeddings come in computed: compiled, their
    cos and sin were fused into the rotary kernel and recomputed for every head and context, ~6% of the forward on
    CPU (docs/sae.md, The forward on CPU)."""
    context = causal_mask(model, input_ids), rotary_embeddings(model, input_ids)
    if not is_compiled:
        return fn(input_ids, *context)
    with torch.inference_mode():
        out = fn(input_ids, *context)
    return [tensor.clone() for tensor in out] if isinstance(out, list) else out.clone()


# Inductor settings of the compiled forward on CPU (docs/sae.md, The forward on CPU): ``freezing`` turns the
# weights into constants, and ``enable_concat_linear`` then merges the products that share an input (q, k, v; gate,
# up) into one wider product, which oneDNN runs faster on AMX; the two together cut the SmolLM2 forward by ~15%.
CPU_INDUCTOR_PATCH = {"freezing": True, "cpp.enable_concat_linear": True}


def compiled(fn: Callable, device: torch.device, compile_mode: str | None) -> Callable:
    """``torch.compile(fn)`` for fixed shapes: by default CUDA graphs (``reduce-overhead``) on CUDA, and on CPU
    inductor with ``CPU_INDUCTOR_PATCH`` (weights frozen into constants at the first call, the products that share
    an input merged, bf16 run by oneDNN on AMX / AVX512-BF16; it compiles for inference mode, so call it under
    ``torch.inference_mode()``). Frozen means the compiled forward keeps the weights it was compiled with, in a
    second, packed copy: right for the frozen LLM of SAE training, at the memory of its weights up to the site."""
    if compile_mode is None and device.type == "cuda":
        compile_mode = "reduce-overhead"
    compiled_fn = torch.compile(fn, dynamic=False, mode=compile_mode)
    if compile_mode is not None or device.type != "cpu":
        return compiled_fn
    from torch._inductor import config as inductor_config

    def frozen(*args):
        # As a patch around the call, not torch.compile(options=...): given as options, freezing compiles nothing
        # frozen on torch 2.13 (the weights stay graph inputs; checked on the generated code), and compiling
        # happens inside the first call (or a recompilation), so the patch must hold there.
        with inductor_config.patch(CPU_INDUCTOR_PATCH):
            return compiled_fn(*args)

    return frozen
