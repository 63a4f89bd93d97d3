"""The encoder's pre-activations at a few selected entries, with a backward that touches only those entries.

TopK (and AuxK, BatchTopK) pass on a handful of the encoder's pre-activations ``pre = (x - b_dec) @ W_enc.T + b_enc``
(batch, d_sae): ``k`` per token out of ``d_sae``. Autograd through the dense product would scatter their gradient
``g`` into a dense (batch, d_sae) matrix ``G`` and spend two dense products on it, ``G.T @ (x - b_dec)`` and
``G @ W_enc``, as costly as the forward product. With ``G`` zero outside M selected entries ``(n, j)``:

    dL/dW_enc[j] = sum_{(n, j)} g_nj (x_n - b_dec)        (M * d_in multiply-adds, each latent's entries summed)
    dL/db_enc[j] = sum_{(n, j)} g_nj = s_j
    dL/db_dec    = -sum_n dL/dx_n = -s @ W_enc             (one (d_sae,) x (d_sae, d_in) product)
    dL/dx_n      = sum_{(n, j)} g_nj W_enc[j]

the same sums without the zeros (sparsify's ``fused_encoder.py`` does the same for its TopK encoder, through
``index_add_``; here the per-latent sums are an ``embedding_bag`` over the entries sorted by latent, which needs no
(M, d_in) intermediate and no host synchronisation).

Under autocast the dense path multiplies ``x - b_dec`` and ``W_enc`` rounded to the autocast dtype (bf16), adds
``b_enc`` in float32, and its backward rounds the gradient reaching the product to that dtype too; this backward
rounds the gradient and ``x - b_dec`` the same way but accumulates in float32 (the dense path rounds its products'
outputs to bf16 as well). It does not round ``W_enc`` for the gradients towards ``x`` and ``b_dec``: rounding it to
bf16 and back cost two passes over it, 1.6 ms of a 22 ms TopK step on one CPU thread, for one (d_sae,) x (d_sae,
d_in) product, and unrounded the product is nearer the float32 gradient. So W_enc's and b_enc's gradients equal the
dense computation on the rounded operands to float32 precision, and b_dec's that with W_enc unrounded there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn import functional as F

if TYPE_CHECKING:
    from neurolight.lightning_modules.sae.sparse_autoencoder import SparseAutoencoder


def latent_order(cols: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    """Entries' latents ``cols`` (M,) in order by latent: ``(order, starts)``, ``cols[order]`` ascending and latent
    j's entries at ``order[starts[j]:starts[j + 1]]``. Both backwards, the encoder's and the decoder's
    (``sparse_decoder``), sum each latent's entries with it; computed once, it is sorted once."""
    sorted_cols, order = cols.sort()
    return order, torch.searchsorted(sorted_cols, torch.arange(d_sae, device=cols.device))


def gather_pre_acts(
    sae: SparseAutoencoder,
    x: Tensor,
    pre_acts: Tensor,
    indices: Tensor,
    by_latent: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``pre_acts.gather(-1, indices)`` (batch, m), differentiable with respect to ``x``, ``sae.b_dec``,
    ``sae.W_enc`` and ``sae.b_enc`` at the cost of the m gathered entries per row instead of all d_sae.

    ``pre_acts`` (batch, d_sae) must be ``sae``'s pre-activations of ``x`` (batch, d_in), computed in the same
    autocast state; its own gradient, if any, is bypassed, not used. With free decoder norms the encoder is
    ``sae.encoder_weights()``, the norms folded in, and the gradient reaches the norms through it. ``by_latent``:
    ``latent_order(indices.reshape(-1), d_sae)``, where the caller has it already."""
    rows = torch.arange(len(indices), device=indices.device).unsqueeze(1).expand_as(indices)
    entries = gather_pre_acts_at(
        sae, x, pre_acts, rows.reshape(-1), indices.reshape(-1), rows_sorted=True, by_latent=by_latent
    )
    return entries.view(indices.shape)


def gather_pre_acts_at(
    sae: SparseAutoencoder,
    x: Tensor,
    pre_acts: Tensor,
    rows: Tensor,
    cols: Tensor,
    rows_sorted: bool = False,
    by_latent: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``pre_acts[rows, cols]`` (M,) for M entries given by token ``rows`` and latent ``cols`` (both (M,)), as
    ``gather_pre_acts``; any number of entries per token (BatchTopK). ``rows_sorted``: ``rows`` is already in
    ascending order, so the backward need not sort it. ``by_latent``: ``latent_order(cols, d_sae)``, or None."""
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else torch.result_type(x, sae.W_enc)
    W_enc, b_enc = sae.encoder_weights()
    if by_latent is None:
        by_latent = latent_order(cols, len(W_enc))
    return _PreActsAt.apply(pre_acts.detach(), rows, cols, *by_latent, x, sae.b_dec, W_enc, b_enc, dtype, rows_sorted)


class _PreActsAt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre_acts, rows, cols, order, starts, x, b_dec, W_enc, b_enc, dtype, rows_sorted):
        ctx.save_for_backward(rows, cols, order, starts, x, b_dec, W_enc)
        ctx.dtype, ctx.b_enc_dtype, ctx.rows_sorted = dtype, b_enc.dtype, rows_sorted
        return pre_acts[rows, cols]

    @staticmethod
    def backward(ctx, grad):
        rows, cols, order, starts, x, b_dec, W_enc = ctx.saved_tensors
        need_x, need_b_dec, need_W_enc, need_b_enc = ctx.needs_input_grad[5:9]
        d_sae = W_enc.shape[0]
        grad_x = grad_b_dec = grad_W_enc = grad_b_enc = None
        with torch.autocast(x.device.type, enabled=False):
            # b_enc is added after the product, in float32: its gradient is not rounded.
            if need_b_enc:
                grad_b_enc = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
            # The product's operands as the forward rounded them; sums in float32.
            g = grad.to(ctx.dtype).float()
            if need_W_enc:
                centred = (x - b_dec).to(ctx.dtype).float()
                grad_W_enc = F.embedding_bag(rows[order], centred, starts, per_sample_weights=g[order], mode="sum")
            if need_x or need_b_dec:
                weight = W_enc.float()  # unrounded: see the module's docstring
            if need_b_dec:
                s = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
                grad_b_dec = -(s @ weight)
            if need_x:
                # TopK's rows come in order (k entries per token): sorting them again cost ~3% of its step on CPU.
                sorted_rows, row_order = (rows, None) if ctx.rows_sorted else rows.sort()
                offsets = torch.searchsorted(sorted_rows, torch.arange(len(x), device=rows.device))
                cols_by_row, g_by_row = (cols, g) if row_order is None else (cols[row_order], g[row_order])
                grad_x = F.embedding_bag(cols_by_row, weight, offsets, per_sample_weights=g_by_row, mode="sum")
        return (
            None,
            None,
            None,
            None,
            None,
            _like(grad_x, x),
            _like(grad_b_dec, b_dec),
            _like(grad_W_enc, W_enc),
            None if grad_b_enc is None else grad_b_enc.to(ctx.b_enc_dtype),
            None,
            None,
        )


def _like(grad: Tensor | None, input: Tensor) -> Tensor | None:
    return None if grad is None else grad.to(input.dtype)
