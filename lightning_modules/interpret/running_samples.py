"""Running per-latent selection of the contexts shown to an explainer: pure tensors, bounded memory, mergeable.

For each of L kept latents, ``RunningLatentSamples`` keeps a fixed number of context slots of four kinds
(``neurolight.datamodules.interpret.samples.KINDS``; docs/interpret.md, Sample kinds), each slot holding a context's
corpus row and the latent's (T,) activations there, never more:

- ``top``: the contexts with the highest MAX activation, in descending order (ties: lower corpus row first).
- ``quantile``: ``num_quantiles`` bins of the contexts where the latent fires, bin q holding those whose max lies in
  [q, q + 1) * reference_max / num_quantiles (the last bin also everything above), ``num_per_quantile`` contexts
  sampled uniformly in each bin.
- ``random``: uniformly random contexts (firing or not).
- ``negative``: uniformly random contexts where the latent's max is 0.

Uniform sampling is a priority reservoir: every (context, latent, kind) gets a fixed pseudo-random key (a hash of
the seed, the corpus row and the latent index) and a kind keeps the smallest keys among its eligible contexts.
Every kind is therefore "the n best under a total order on (key, row)", so selecting from the union of two
accumulators that saw disjoint contexts gives exactly what one accumulator over all of them gives: DDP ranks merge
into the single-process result, whatever the batch order or the number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from neurolight.lightning_modules.counter_hash import mix32

# Hash streams, so that a context's key differs between kinds: otherwise the random context with the smallest key
# would also be picked first in its quantile bin.
_STREAMS = {"quantile": 1, "random": 2, "negative": 3}


def random_keys(seed: int, kind: str, rows: Tensor, latents: Tensor) -> Tensor:
    """Uniform keys in [0, 1), (L, B) float64, that depend only on (seed, kind, corpus row, latent index)."""
    stream = mix32(torch.tensor(seed * 8 + _STREAMS[kind], dtype=torch.long, device=rows.device))
    per_row = mix32(rows.long() ^ stream)
    per_latent = mix32(latents.long().to(rows.device) + 0x632BE5AB)
    return mix32(per_row[None, :] ^ per_latent[:, None]).double() / 2.0**32


def _select(
    key: Tensor, row: Tensor, acts: Tensor, cand_key: Tensor, cand_row: Tensor, cand_acts: Tensor, cand_pos: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Keep, per latent and group, the n smallest (key, row) among the current slots and the candidates.

    Args:
        key, row: (L, G, n) current slots; ``key`` is +inf (and ``row`` -1) for an empty slot.
        acts: (L, G * n, T) activations of the current slots.
        cand_key, cand_row: (L, G, C) candidates; +inf marks a candidate that is not eligible for that group.
        cand_acts: (L, M, T) activations of the candidates.
        cand_pos: (L, G, C) index of each candidate into ``cand_acts``'s second dimension.

    Returns:
        The new ``key``, ``row`` and ``acts``.
    """
    num_latents, groups, n = key.shape
    all_key, all_row = torch.cat([key, cand_key], -1), torch.cat([row, cand_row], -1)
    # Lexicographic order: a stable sort by key of what is already sorted by row.
    by_row = all_row.argsort(dim=-1, stable=True)
    by_key = all_key.gather(-1, by_row).argsort(dim=-1, stable=True)[..., :n]
    pick = by_row.gather(-1, by_key)
    new_key, new_row = all_key.gather(-1, pick), all_row.gather(-1, pick)
    empty = new_key.isinf()
    new_row = new_row.masked_fill(empty, -1)
    slot_base = torch.arange(groups, device=key.device)[None, :, None] * n
    old_index = (slot_base + pick.clamp(max=n - 1)).reshape(num_latents, groups * n, 1)
    cand_index = cand_pos.gather(-1, (pick - n).clamp(min=0)).reshape(num_latents, groups * n, 1)
    tokens = acts.shape[-1]
    from_old = acts.gather(1, old_index.expand(-1, -1, tokens))
    from_cand = cand_acts.gather(1, cand_index.expand(-1, -1, tokens))
    new_acts = torch.where((pick < n).reshape(num_latents, groups * n, 1), from_old, from_cand)
    return new_key, new_row, new_acts.masked_fill(empty.reshape(num_latents, groups * n, 1), 0.0)


class RunningLatentSamples(nn.Module):
    """Per-latent context slots of every kind, updated batch by batch; all state is in buffers on the device.

    Memory: L x (num_top + num_quantiles * num_per_quantile + num_random + num_negative) x T activations.

    Args:
        latents: (L,) indices of the kept latents in the SAE (they seed the random keys).
        reference_max: (L,) each latent's max activation from the frequency pass; it sets the quantile bins.
        num_tokens: Context length T.
        num_top: Top-activating contexts kept per latent.
        num_quantiles: Activation bins of the quantile kind.
        num_per_quantile: Contexts sampled per bin.
        num_random: Uniformly random contexts per latent.
        num_negative: Random contexts where the latent does not fire, per latent.
        seed: Seed of the random keys.

    The sizes have no defaults here: ``LatentSampler``'s config holds them, once.
    """

    def __init__(
        self,
        latents: Tensor,
        reference_max: Tensor,
        num_tokens: int,
        *,
        num_top: int,
        num_quantiles: int,
        num_per_quantile: int,
        num_random: int,
        num_negative: int,
        seed: int,
    ) -> None:
        super().__init__()
        sizes = {"num_top": num_top, "num_quantiles": num_quantiles, "num_per_quantile": num_per_quantile}
        sizes |= {"num_random": num_random, "num_negative": num_negative, "num_tokens": num_tokens}
        bad = {name: value for name, value in sizes.items() if value < 0}
        if bad or num_tokens < 1:
            raise ValueError(f"sample sizes must be >= 0 and num_tokens >= 1, got {bad or {'num_tokens': num_tokens}}")
        if latents.ndim != 1 or reference_max.shape != latents.shape:
            raise ValueError(
                f"latents {tuple(latents.shape)} and reference_max {tuple(reference_max.shape)} must both be (L,)"
            )
        self.num_tokens, self.seed = num_tokens, seed
        # kind -> (groups, slots per group)
        self.layout = {
            "top": (1, num_top),
            "quantile": (num_quantiles, num_per_quantile),
            "random": (1, num_random),
            "negative": (1, num_negative),
        }
        self.register_buffer("latents", latents.long().clone())
        self.register_buffer("reference_max", reference_max.float().clone())
        self.register_buffer("max_activation", torch.zeros(len(latents), device=latents.device))
        for kind, (groups, n) in self.layout.items():
            self.register_buffer(f"{kind}_key", torch.full((len(latents), groups, n), torch.inf, dtype=torch.float64))
            self.register_buffer(f"{kind}_row", torch.full((len(latents), groups, n), -1, dtype=torch.long))
            self.register_buffer(f"{kind}_acts", torch.zeros(len(latents), groups * n, num_tokens))
        self.to(latents.device)

    @property
    def num_latents(self) -> int:
        return len(self.latents)

    def reset(self) -> None:
        self.max_activation.zero_()
        for kind in self.layout:
            getattr(self, f"{kind}_key").fill_(torch.inf)
            getattr(self, f"{kind}_row").fill_(-1)
            getattr(self, f"{kind}_acts").zero_()

    def _candidate_keys(self, kind: str, context_max: Tensor, rows: Tensor) -> Tensor:
        """(L, G, B) keys of a batch's contexts for one kind; +inf where a context is not eligible."""
        fires = context_max > 0
        if kind == "top":
            return torch.where(fires, -context_max.double(), torch.inf)[:, None]
        keys = random_keys(self.seed, kind, rows, self.latents)
        if kind == "random":
            return keys[:, None]
        if kind == "negative":
            return torch.where(fires, torch.inf, keys)[:, None]
        groups = self.layout["quantile"][0]
        scale = groups / self.reference_max.clamp_min(torch.finfo(torch.float32).tiny)
        bins = (context_max * scale[:, None]).floor().clamp(max=groups - 1).long()
        in_bin = fires[:, None] & (bins[:, None] == torch.arange(groups, device=bins.device)[None, :, None])
        return torch.where(in_bin, keys[:, None], torch.inf)

    @torch.no_grad()
    def update(self, latent_acts: Tensor, context_rows: Tensor) -> None:
        """Offer a batch of contexts.

        Args:
            latent_acts: (B, T, L) activations of the kept latents (positions to ignore already set to 0).
            context_rows: (B,) corpus rows of the contexts; never offer a row twice.
        """
        batch, tokens, num_latents = latent_acts.shape
        if tokens != self.num_tokens or num_latents != self.num_latents or context_rows.shape != (batch,):
            raise ValueError(
                f"update takes latent_acts (B, {self.num_tokens}, {self.num_latents}) and context_rows (B,), got "
                f"{tuple(latent_acts.shape)} and {tuple(context_rows.shape)}"
            )
        acts = latent_acts.float().permute(2, 0, 1)  # (L, B, T)
        rows = context_rows.to(self.latents.device).long()
        context_max = acts.amax(-1)  # (L, B)
        torch.maximum(self.max_activation, context_max.amax(-1), out=self.max_activation)
        for kind, (groups, n) in self.layout.items():
            if groups * n == 0:
                continue
            cand_key = self._candidate_keys(kind, context_max, rows)
            cand_row = rows.expand(num_latents, groups, batch)
            cand_pos = torch.arange(batch, device=rows.device).expand(num_latents, groups, batch)
            self._store(kind, *_select(*self._slots(kind), cand_key, cand_row, acts, cand_pos))

    def _slots(self, kind: str) -> tuple[Tensor, Tensor, Tensor]:
        return getattr(self, f"{kind}_key"), getattr(self, f"{kind}_row"), getattr(self, f"{kind}_acts")

    def _store(self, kind: str, key: Tensor, row: Tensor, acts: Tensor) -> None:
        setattr(self, f"{kind}_key", key)
        setattr(self, f"{kind}_row", row)
        setattr(self, f"{kind}_acts", acts)

    @torch.no_grad()
    def merge(self, other: RunningLatentSamples | Mapping[str, Tensor]) -> None:
        """Take in another accumulator (or its ``state_dict``) that saw contexts disjoint from this one's."""
        state = other.state_dict() if isinstance(other, RunningLatentSamples) else other
        device = self.latents.device
        if not torch.equal(state["latents"].to(device), self.latents):
            raise ValueError("cannot merge samples of different latents: every rank must keep the same latents")
        torch.maximum(self.max_activation, state["max_activation"].to(device), out=self.max_activation)
        for kind, (groups, n) in self.layout.items():
            if groups * n == 0:
                continue
            cand_key, cand_row = state[f"{kind}_key"].to(device), state[f"{kind}_row"].to(device)
            if cand_key.shape != (self.num_latents, groups, n):
                raise ValueError(f"cannot merge {kind} slots of shape {tuple(cand_key.shape)} into {(groups, n)}")
            cand_pos = torch.arange(groups * n, device=device).view(1, groups, n).expand(self.num_latents, -1, -1)
            cand_acts = state[f"{kind}_acts"].to(device)
            self._store(kind, *_select(*self._slots(kind), cand_key, cand_row, cand_acts, cand_pos))

    @torch.no_grad()
    def gather(self, all_gather: Callable[[dict[str, Tensor]], dict[str, Tensor]], world_size: int) -> None:
        """Replace this rank's state by the merge over all ranks (a collective: every rank calls it).

        ``all_gather`` maps a dict of tensors to the same dict with a leading (world_size,) dimension, as
        ``LightningModule.all_gather`` does under DDP.
        """
        if world_size == 1:
            return
        gathered = all_gather({name: buffer for name, buffer in self.named_buffers()})
        self.reset()
        for rank in range(world_size):
            self.merge({name: tensor[rank] for name, tensor in gathered.items()})

    def results(self) -> dict[str, Tensor]:
        """``{kind}_row`` (L, n_kind) corpus rows (-1: empty slot) and ``{kind}_activations`` (L, n_kind, T),
        quantile slots lowest bin first, plus ``max_activation`` (L,) over everything offered."""
        out = {"max_activation": self.max_activation.clone()}
        for kind in self.layout:
            _, row, acts = self._slots(kind)
            out[f"{kind}_row"] = row.reshape(self.num_latents, -1).clone()
            out[f"{kind}_activations"] = acts.clone()
        return out
