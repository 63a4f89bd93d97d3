"""A sweep's members spread over DDP ranks (``SparseAutoencoderSweep(distribute_members=True)``; docs/sae.md, Sweeps).

Under DDP with W ranks each member has one owner rank. Every rank gathers all ranks' rows (rank 0's first), so a
member's owner trains it on the global batch of a single-process sweep with W times the batch size; the other ranks
skip its forward and backward. Every rank still holds every member, so the optimiser steps stay identical:

- the owner's loss is scaled by W and the other ranks give the member's parameters zero gradients, so DDP's
  gradient average is the owner's gradient on every rank and every rank's Adam takes the same step (rank 0's
  checkpoint is complete; resuming needs nothing new);
- what the owner's forward alone produces (firing counts, the architecture's running estimates such as BatchTopK's
  threshold, the metrics due for logging) travels in one all-reduced vector per step, the other ranks contributing
  zeros, so every rank updates every member's counters alike and logs every member's values.

sparsify's ``distribute_modules`` instead keeps on each rank only its own SAEs and their optimiser state, without DDP,
and writes each SAE from its rank: less memory, but checkpoints and metrics of its own making.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from neurolight.lightning_modules.sae.metrics import firing_counts
from neurolight.lightning_modules.sae.module import TRAINING_METRICS, SparseAutoencoderModule


def assign_members(costs: dict[str, int], world_size: int) -> dict[str, int]:
    """Owner rank of each member, balancing the summed cost (d_sae * d_in) per rank: the costliest member first,
    each to the least loaded rank (the lower rank on a tie). Deterministic, so every rank computes the same plan."""
    loads = [0] * world_size
    owners = {}
    for name in sorted(costs, key=lambda name: -costs[name]):  # sorted is stable: equal costs keep the sweep's order
        rank = min(range(world_size), key=lambda rank: (loads[rank], rank))
        owners[name] = rank
        loads[rank] += costs[name]
    return {name: owners[name] for name in costs}


def plan_owners(trainer: pl.Trainer, units: dict[str, SparseAutoencoderModule]) -> dict[str, int]:
    """The members' owner ranks under ``trainer``'s DDP strategy; any other multi-process strategy is refused."""
    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy) or isinstance(strategy, DeepSpeedStrategy):
        raise ValueError(
            f"distribute_members spreads a sweep over DDP ranks, but the trainer's strategy is "
            f"{type(strategy).__name__}; use trainer.strategy: ddp (configs/trainer/ddp.yaml) or set "
            f"model.init_args.distribute_members: false"
        )
    costs = {name: unit.hparams.dict_vec_size * unit.hparams.act_vec_size for name, unit in units.items()}
    owners = assign_members(costs, trainer.world_size)
    plan = "; ".join(
        f"rank {r}: {', '.join(n for n in owners if owners[n] == r) or '-'}" for r in range(trainer.world_size)
    )
    rank_zero_info(f"sweep members spread over ranks: {plan}")
    return owners


def gather_rows(x: Tensor) -> Tensor:
    """(n_r, d) rows of each rank -> (n_0 + ... + n_{W-1}, d) on every rank, rank 0's first. Ranks may hold
    different numbers of rows (a last, short batch): the row counts are exchanged first (a host sync)."""
    world = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(x)], device=x.device))
    counts = torch.cat(counts).tolist()
    padded = x.new_zeros(max(counts), *x.shape[1:])
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def gather_batch(batch) -> Tensor | dict[str, Tensor]:
    """Every rank's rows of a training batch (``gather_rows``): of each site for a batch ``{site: rows}``."""
    if isinstance(batch, dict):
        return {site: gather_rows(rows) for site, rows in batch.items()}
    return gather_rows(SparseAutoencoderModule.batch_activations(batch))


def spread_training_step(units: dict[str, SparseAutoencoderModule], owners: dict[str, int], batch) -> dict:
    """One training step of the members ``units`` on every rank's rows ``batch`` (raw activations, gathered by
    ``gather_batch``), each member's forward run by its owner in ``owners`` only; returns the sweep's training_step
    output."""
    world, rank = dist.get_world_size(), dist.get_rank()
    losses, packed, outputs = [], [], {}
    for name, unit in units.items():
        x = unit.activations(batch)  # its site's rows
        if owners[name] == rank:
            inputs = unit.normalize(x)
            out = unit.sae(inputs, dead_mask=unit.dead_latents())
            losses.append(out.loss * world)  # DDP divides the summed gradients by W: the owner's gradient remains
            packed.append(_pack(unit, firing_counts(out.latents), unit.training_metrics(inputs, out)))
            outputs[name] = {"loss": out.loss}
        else:
            # A zero gradient for every parameter of a member trained elsewhere: DDP then reduces every parameter
            # on every rank (no find_unused_parameters), and an empty slice costs no pass over the weights.
            losses += [parameter.view(-1)[:0].sum() for parameter in unit.parameters()]
            packed.append(x.new_zeros(_packed_length(unit), dtype=torch.float64))
            outputs[name] = {}
    # Owners' values plus the other ranks' zeros: every member's values, exactly (float64 holds the counts and every
    # float32 or bfloat16 value exactly).
    reduced = torch.cat(packed)
    dist.all_reduce(reduced)
    rows = len(x)  # every site's rows are those of the same tokens
    for (name, unit), values in zip(units.items(), reduced.split([len(part) for part in packed])):
        fired, metrics = _unpack(unit, values)
        unit.record_firing(fired, rows)
        unit.log_training_metrics(metrics, sync_dist=False)
        outputs[name].update(fired=fired, num_tokens=rows)
    return {"loss": torch.stack(losses).sum(), "units": outputs, "activations": batch}


def _pack(unit: SparseAutoencoderModule, fired: Tensor, metrics: dict[str, Tensor]) -> Tensor:
    """One float64 vector: ``fired`` (d_sae,), the SAE's buffers (its architecture's running estimates), then for
    each of ``TRAINING_METRICS`` its value and whether it is due (1) or not (0); ``_packed_length(unit)`` long."""
    zero, one = fired.new_zeros(1), fired.new_ones(1)
    due = [(metrics[name].detach().reshape(1), one) if name in metrics else (zero, zero) for name in TRAINING_METRICS]
    parts = [fired, *(buffer.detach().flatten() for buffer in unit.sae.buffers()), *(t for pair in due for t in pair)]
    return torch.cat([part.to(torch.float64) for part in parts])


def _packed_length(unit: SparseAutoencoderModule) -> int:
    return unit.sae.d_sae + sum(buffer.numel() for buffer in unit.sae.buffers()) + 2 * len(TRAINING_METRICS)


def _unpack(unit: SparseAutoencoderModule, values: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """``_pack``'s inverse: the firing counts and the due metrics; the buffers are copied into the SAE."""
    fired, values = values[: unit.sae.d_sae].long(), values[unit.sae.d_sae :]
    with torch.no_grad():
        for buffer in unit.sae.buffers():
            buffer.copy_(values[: buffer.numel()].view_as(buffer))
            values = values[buffer.numel() :]
    if not unit.metrics_due():
        return fired, {}
    values, due = values.view(len(TRAINING_METRICS), 2).unbind(1)
    # On a logging step only: reading the flags on the host waits for the GPU.
    return fired, {name: value.float() for name, value, flag in zip(TRAINING_METRICS, values, due.tolist()) if flag}
