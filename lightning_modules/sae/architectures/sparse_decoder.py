"""The decoder product of a few latents per token, ``x_hat_n = sum_{(n, j)} v_nj W_dec[j]``, with a backward that sums
each latent's entries in one pass (the TopK family's decode; docs/sae.md, TopK).

Autograd through ``F.embedding_bag`` gives the same gradients, but on CPU its backward sorts the entries by latent
once more (the encoder's backward has sorted them already) and writes W_dec's gradient through a zeroed (d_sae, d_in)
buffer: 3.0 ms of a 24 ms demo step on one thread. Here the gradient of the decoder weight is, per latent j,

    dL/dW_dec[j] = sum_{(n, j)} v_nj dL/dx_hat_n

an ``embedding_bag`` over the entries in the encoder's order by latent (``sparse_encoder.latent_order``), and the
gradient of each value, ``dL/dv_nj = <dL/dx_hat_n, W_dec[j]>``, is the one ``embedding_bag`` computes for its
per-sample weights.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from neurolight.lightning_modules.sae.architectures.sparse_encoder import latent_order


def decode_entries(
    weight: Tensor, cols: Tensor, values: Tensor, offsets: Tensor, by_latent: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """(batch, d_in): row b sums ``values[e] * weight[cols[e]]`` over its entries e, ``offsets[b]`` to
    ``offsets[b + 1]`` (all of ``cols`` and ``values``, (M,), sorted by row). ``by_latent``: ``latent_order(cols,
    d_sae)``, where the caller has it already."""
    if not torch.is_grad_enabled() or not (weight.requires_grad or values.requires_grad):
        return F.embedding_bag(cols, weight, offsets, per_sample_weights=values, mode="sum")
    # The total as a tensor made on the device: new_tensor would copy it from the host, a CUDA synchronisation.
    counts = torch.diff(offsets, append=torch.full((1,), len(cols), dtype=offsets.dtype, device=offsets.device))
    bags = torch.arange(len(offsets), dtype=cols.dtype, device=cols.device)
    rows = torch.repeat_interleave(bags, counts, output_size=len(cols))
    if by_latent is None:
        by_latent = latent_order(cols, len(weight))
    return _DecodeEntries.apply(weight, values, cols, offsets, rows, *by_latent)


class _DecodeEntries(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, values, cols, offsets, rows, order, starts):
        ctx.save_for_backward(weight, values, cols, offsets, rows, order, starts)
        return F.embedding_bag(cols, weight, offsets, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        weight, values, cols, offsets, rows, order, starts = ctx.saved_tensors
        need_weight, need_values = ctx.needs_input_grad[:2]
        grad = grad.contiguous()
        grad_weight = grad_values = None
        if need_weight:
            grad_weight = F.embedding_bag(rows[order], grad, starts, per_sample_weights=values[order], mode="sum")
        if need_values:
            # embedding_bag's own gradient of its per-sample weights (mode 0: sum), entry e in bag rows[e].
            grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad, weight, cols, offsets, rows, 0
            )
        return grad_weight, grad_values, None, None, None, None, None
