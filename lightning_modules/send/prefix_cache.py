"""The hidden states of a frozen prefix, kept across epochs so that later epochs run only the trainable layers.

With the input embeddings and the first n decoder layers frozen (``SendModule(freeze_layers=n,
freeze_embeddings=True)``) and free of dropout, the input of layer n is a fixed function of a sequence's tokens:
every epoch recomputes the same tensor. The SEND demo trains 4 of SmolLM2's 30 layers, so 26 of every 30 layer
forwards of an epoch after the first are such recomputations. ``FrozenPrefixCache`` keeps layer n's input for each
real token of each sequence seen (keyed by the sequence's token ids, so the key survives reshuffled batches), and a
batch whose sequences are all known skips layers 0..n-1: they pass their input through unchanged, and layer n gets
the kept states instead. The decoder still builds its masks and position embeddings for the batch itself, so any
Hugging Face decoder works, masks per layer type included.

Padded positions get zeros instead of the prefix's output for the pad tokens. Batches are right-padded and
attention is causal, so no real token attends to them, and their labels are -100: the loss and every gradient are
unchanged (tests/send/test_prefix_cache.py checks a fit with and without the cache). The memory it takes:
docs/send.md, Fine-tuning cost.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from neurolight.datamodules.llm.zero import zero_stage


def check_cacheable_prefix(model: nn.Module, layers: nn.ModuleList, n: int) -> None:
    """Raise unless the embeddings and decoder ``layers`` 0..n-1 are frozen, deterministic and whole on this
    rank."""
    if not 0 < n < len(layers):
        raise ValueError(
            f"cache_frozen_prefix needs 0 < freeze_layers < {len(layers)} (the layer count); got freeze_layers={n}"
        )
    prefix = [model.get_input_embeddings(), *layers[:n]]
    if any(p.requires_grad for module in prefix for p in module.parameters()):
        raise ValueError(
            "cache_frozen_prefix needs the embeddings and the first freeze_layers layers frozen: set "
            "freeze_embeddings: true (the cached states would go stale as they train)"
        )
    # Hugging Face attention applies its dropout functionally, from the config: no nn.Dropout module shows it.
    config = vars(getattr(model, "config", None) or object())
    rates = {
        name: value
        for name, value in config.items()
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float) and value > 0
    }
    rates.update(
        {name: m.p for module in prefix for name, m in module.named_modules() if isinstance(m, nn.Dropout) and m.p > 0}
    )
    if rates:
        raise ValueError(
            f"cache_frozen_prefix needs a deterministic prefix, but the model has dropout ({rates}); set those rates "
            "to 0 in the model config or turn cache_frozen_prefix off"
        )
    if any(zero_stage(p) == 3 for module in prefix for p in module.parameters()):
        raise ValueError(
            "cache_frozen_prefix does not work under DeepSpeed ZeRO-3, which fetches every layer's parameters in "
            "a fixed order; use stage 2 or turn cache_frozen_prefix off"
        )


def _hidden_of(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


class FrozenPrefixCache:
    """Layer n's input for the real tokens of every sequence seen, on the CPU, in the dtype the model gave it."""

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.rows: dict[bytes, Tensor] = {}
        self.hits = 0  # batches that skipped the prefix
        self.misses = 0  # batches that ran it (and filled the cache)

    def __len__(self) -> int:
        return len(self.rows)

    @staticmethod
    def keys(input_ids: Tensor, attention_mask: Tensor) -> list[bytes]:
        mask = attention_mask.bool()
        return [ids[row_mask].cpu().numpy().tobytes() for ids, row_mask in zip(input_ids, mask)]

    @contextmanager
    def around(self, layers: nn.ModuleList, input_ids: Tensor, attention_mask: Tensor) -> Iterator[None]:
        """Wrap one forward of the model whose decoder ``layers`` these are, on this right-padded batch: skip the
        prefix if every row is cached, else run it and keep layer n's input for the rows not yet cached."""
        lengths = attention_mask.sum(1)
        if not bool((attention_mask.cumprod(1).sum(1) == lengths).all()):
            raise ValueError("the frozen-prefix cache needs right-padded batches (each row's real tokens first)")
        keys, lengths = self.keys(input_ids, attention_mask), lengths.tolist()
        cached = [self.rows.get(key) for key in keys]
        handles = []
        patched: list[nn.Module] = []
        if all(rows is not None for rows in cached):
            self.hits += 1
            hidden = cached[0].new_zeros(len(keys), input_ids.shape[1], cached[0].shape[-1])
            for row, rows in enumerate(cached):
                hidden[row, : len(rows)] = rows
            hidden = hidden.to(input_ids.device, non_blocking=True)

            def replace(module, args, kwargs):
                if args:
                    return (hidden.to(args[0].dtype), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden.to(kwargs["hidden_states"].dtype)}

            handles.append(layers[self.n_layers].register_forward_pre_hook(replace, with_kwargs=True))
            for layer in layers[: self.n_layers]:
                # An instance attribute shadows the class's forward: the layer returns its input untouched.
                layer.forward = lambda hidden_states, *args, **kwargs: hidden_states
                patched.append(layer)
        else:
            self.misses += 1

            def keep(module, args, kwargs):
                states = _hidden_of(args, kwargs).detach()
                for row, (key, length) in enumerate(zip(keys, lengths)):
                    if key not in self.rows:
                        self.rows[key] = states[row, :length].to("cpu", copy=True)

            handles.append(layers[self.n_layers].register_forward_pre_hook(keep, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for layer in patched:
                del layer.forward
