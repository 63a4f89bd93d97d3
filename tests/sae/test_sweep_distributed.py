"""A sweep whose members are spread over DDP ranks (``distribute_members``; docs/sae.md, Sweeps), on 2 CPU ranks
(gloo): each member's forward runs on its owner only, on both ranks' rows, and the sweep ends as a one-process sweep
does with the doubled batch (rank 0's rows, then rank 1's), with the same metrics in rank 0's log; resuming from
a step checkpoint ends where the straight run does."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler, TensorDataset

from neurolight.callbacks import DeadLatentResampler, SaeCheckpoint
from neurolight.lightning_modules import BatchTopK, ReLU, SparseAutoencoderSweep, SweepMember, TopK
from neurolight.lightning_modules.sae.sweep_ranks import assign_members, gather_rows, plan_owners
from tests.helpers.gloo import free_port, run_on_ranks
from tests.helpers.sae import synthetic_sparse_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MEMBERS = [
    SweepMember("topk_k4", 256, TopK(k=4, k_aux=8), learning_rate=3e-3),
    SweepMember("batchtopk_k6", 96, BatchTopK(k=6, k_aux=8)),
    SweepMember("relu", 48, ReLU(l1_coefficient=1e-3), lr_warmup_steps=4),
]
OWNERS = {"topk_k4": 0, "batchtopk_k6": 1, "relu": 1}  # 256 | 96 + 48 latents
SHARED = dict(
    learning_rate=2e-3, dead_tokens_threshold=256, metrics_every_n_steps=3, max_l0_fraction=None,
    norm_estimation_batches=4,  # an epoch: the same rows on 2 ranks and in one process
)  # fmt: skip
# Rows per rank and step; a plain DataLoader resumes at an epoch's start, so the checkpoint ends one.
BATCH, STEPS, CHECKPOINT_EVERY = 32, 12, 8
DATA = synthetic_sparse_data(2 * BATCH * 4, seed=3)  # 4 steps an epoch


def sweep() -> SparseAutoencoderSweep:
    torch.manual_seed(0)
    return SparseAutoencoderSweep(32, MEMBERS, distribute_members=True, **SHARED)


class RecordRank(pl.Callback):
    """Counts each member's training forwards (with gradients: not the resampler's) on this rank, and writes them
    with the sweep's state and the owners it planned to ``folder/rank<r>.pt`` when training ends. Listed right
    after SaeCheckpoint, whose setup moves itself last: this one's setup must run all the same."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.forwards = dict.fromkeys(pl_module.units, 0)
        for name, unit in pl_module.units.items():
            unit.sae.register_forward_hook(lambda *_, name=name: self._count(name))

    def _count(self, name: str) -> None:
        self.forwards[name] += torch.is_grad_enabled()

    def on_train_end(self, trainer, pl_module) -> None:
        state = {key: value.clone() for key, value in pl_module.state_dict().items()}
        record = {"state": state, "forwards": self.forwards, "owners": pl_module._owners}
        torch.save(record, self.folder / f"rank{trainer.global_rank}.pt")


def trainer(root: Path, ranks: int, **options) -> pl.Trainer:
    # Spawned, not forked: a fork of the test process, which earlier tests left with threads (torch's pools, W&B's
    # service), can deadlock in the ranks' first collective; it did so in the whole suite.
    spawn = "ddp_spawn"
    return pl.Trainer(
        accelerator="cpu", devices=ranks, strategy=spawn if ranks > 1 else "auto", max_steps=STEPS,
        max_epochs=-1, default_root_dir=str(root), log_every_n_steps=2, enable_checkpointing=False,
        logger=pl.loggers.CSVLogger(str(root), name="logs", version=0), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[SaeCheckpoint(CHECKPOINT_EVERY, dirpath=str(root / "checkpoints")), RecordRank(root),
                   DeadLatentResampler(method="anthropic", neuron_resampling_interval=5, num_resampling_inputs=96)],
        **options,
    )  # fmt: skip


class RanksInTurn(Sampler):
    """The rows of a one-process run with batch 2 * BATCH that trains, each step, on rank 0's batch then rank 1's.
    Lightning gives each rank a DistributedSampler, shuffled by seed PL_GLOBAL_SEED (0) and the epoch."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # called by Lightning, as on a DistributedSampler
        self.epoch = epoch

    def __len__(self) -> int:
        return len(DATA)

    def __iter__(self):
        ranks = []
        for rank in range(2):
            sampler = DistributedSampler(TensorDataset(DATA), num_replicas=2, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(self.epoch)
            ranks.append(torch.tensor(list(sampler)).split(BATCH))
        return iter(torch.cat([torch.cat(pair) for pair in zip(*ranks)]).tolist())


def metrics(root: Path) -> dict[tuple[int, str], float]:
    with (root / "logs" / "version_0" / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    return {
        (int(row["step"]), key): float(value) for row in rows for key, value in row.items() if value and key != "step"
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 2-rank spread sweep, the same resumed from its step-8 checkpoint, and the one-process reference."""
    root = tmp_path_factory.mktemp("spread")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MASTER_ADDR", "127.0.0.1")
        patch.setenv("MASTER_PORT", str(free_port()))
        patch.setenv("PL_GLOBAL_SEED", "0")  # the samplers' seed, whatever an earlier test seeded
        loader = DataLoader(TensorDataset(DATA), batch_size=BATCH)  # Lightning adds the DistributedSampler
        trainer(root / "straight", 2).fit(sweep(), loader)
        resume = root / "straight" / "checkpoints" / f"step_{CHECKPOINT_EVERY:07d}.ckpt"
        trainer(root / "resumed", 2).fit(sweep(), loader, ckpt_path=resume)
    # distribute_members in one process: the plain sweep
    reference = DataLoader(TensorDataset(DATA), batch_size=2 * BATCH, sampler=RanksInTurn())
    trainer(root / "reference", 1).fit(sweep(), reference)
    return {name: root / name for name in ("straight", "resumed", "reference")}


def test_spread_sweep__ends_as_one_process_with_both_ranks_rows_and_equal_on_both_ranks(runs):
    rank0, rank1 = (torch.load(runs["straight"] / f"rank{rank}.pt") for rank in range(2))
    reference = torch.load(runs["reference"] / "rank0.pt")["state"]
    for key, value in reference.items():
        assert torch.equal(rank0["state"][key], rank1["state"][key]), key
        torch.testing.assert_close(rank0["state"][key], value, atol=1e-5, rtol=1e-4, msg=key)
    # Rank 0's checkpoint holds Adam's moments as the reference's: with gradients off by a factor (an owner's loss
    # not scaled by the world size) Adam's steps would barely differ, its moments would.
    checkpoints = [torch.load(runs[run] / "checkpoints" / "last.ckpt") for run in ("straight", "reference")]
    spread, one_process = (checkpoint["optimizer_states"][0]["state"] for checkpoint in checkpoints)
    assert spread.keys() == one_process.keys() and len(spread) == 4 * len(MEMBERS)
    for index, moments in one_process.items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(spread[index][key], moments[key], atol=1e-7, rtol=1e-4, msg=f"{index}.{key}")


def test_spread_sweep__each_member_runs_forward_only_on_its_owner(runs):
    assert assign_members({m.name: m.dict_vec_size * 32 for m in MEMBERS}, 2) == OWNERS
    for rank in range(2):
        record = torch.load(runs["straight"] / f"rank{rank}.pt")
        assert record["owners"] == OWNERS
        assert record["forwards"] == {name: STEPS if owner == rank else 0 for name, owner in OWNERS.items()}


def test_spread_sweep__rank_zero_logs_every_members_metrics_as_the_reference(runs):
    logged, expected = metrics(runs["straight"]), metrics(runs["reference"])
    for member in MEMBERS:
        for key in ("train/loss", "train/aux", "train/l0", "train/explained_variance", "train/dead_fraction"):
            assert (STEPS - 1, f"{member.name}/{key}") in logged, key
    assert logged.keys() == expected.keys()
    # Anthropic resampling ran, on both ranks' inputs (the reference's), and revived latents.
    assert max(value for (_, key), value in logged.items() if key == "topk_k4/train/resampled") > 0
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_spread_sweep__resumed_from_a_step_checkpoint_ends_as_the_straight_run(runs):
    straight, resumed = (torch.load(runs[run] / "rank0.pt") for run in ("straight", "resumed"))
    for key, value in straight["state"].items():
        torch.testing.assert_close(resumed["state"][key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert resumed["forwards"] == {name: (STEPS - CHECKPOINT_EVERY) * (owner == 0) for name, owner in OWNERS.items()}


def test_assign_members__balances_latents_deterministically():
    costs = {"a": 10, "b": 40, "c": 30, "d": 20, "e": 20}
    assert assign_members(costs, 2) == {"a": 1, "b": 0, "c": 1, "d": 1, "e": 0}
    assert assign_members(costs, 8) == {"b": 0, "c": 1, "d": 2, "e": 3, "a": 4}


def test_spread_sweep__a_strategy_other_than_ddp_is_refused_in_one_line():
    fake = SimpleNamespace(strategy=pl.strategies.SingleDeviceStrategy(), world_size=2)
    with pytest.raises(ValueError, match=r"strategy is SingleDeviceStrategy; use trainer.strategy: ddp .*false$"):
        plan_owners(fake, sweep().units)


def _gather_on_rank(rank: int, folder: Path) -> None:
    rows = torch.arange(6.0).view(3, 2)[: 3 - rank] + 10 * rank  # rank 0: 3 rows, rank 1: 2 (a short batch)
    torch.save(gather_rows(rows), folder / f"gathered{rank}.pt")


def test_gather_rows__takes_ranks_with_different_row_counts_in_rank_order(tmp_path):
    run_on_ranks(_gather_on_rank, tmp_path)
    expected = torch.tensor([[0.0, 1], [2, 3], [4, 5], [10, 11], [12, 13]])
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"gathered{rank}.pt"), expected)


# ------------------------------------------------------------------------------------------ over sites, spread
SITE_DATA = {"layers.0.a": DATA, "layers.1.b": synthetic_sparse_data(len(DATA), seed=4)[:, :16] * 2.0}
SITE_MEMBERS = [
    SweepMember("a_k4", 128, TopK(k=4, k_aux=8), site="layers.0.a", act_vec_size=32),
    SweepMember("b_k3", 64, TopK(k=3, k_aux=8), site="layers.1.b", act_vec_size=16),
    SweepMember("b_relu", 48, ReLU(l1_coefficient=1e-3), site="layers.1.b", act_vec_size=16),
]


class SiteRows(torch.utils.data.Dataset):
    """Row i of each site, as a data module serving several sites batches them: ``{site: rows}``."""

    def __len__(self) -> int:
        return len(DATA)

    def __getitem__(self, index: int) -> dict:
        return {site: rows[index] for site, rows in SITE_DATA.items()}


def test_spread_sweep_over_sites__ends_as_one_process_with_both_ranks_rows(tmp_path):
    def members():
        torch.manual_seed(0)
        return SparseAutoencoderSweep(None, SITE_MEMBERS, distribute_members=True, **SHARED)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MASTER_ADDR", "127.0.0.1")
        patch.setenv("MASTER_PORT", str(free_port()))
        patch.setenv("PL_GLOBAL_SEED", "0")
        trainer(tmp_path / "spread", 2).fit(members(), DataLoader(SiteRows(), batch_size=BATCH))
    reference = DataLoader(SiteRows(), batch_size=2 * BATCH, sampler=RanksInTurn())
    trainer(tmp_path / "reference", 1).fit(members(), reference)
    rank0, rank1 = (torch.load(tmp_path / "spread" / f"rank{rank}.pt") for rank in range(2))
    assert rank0["owners"] == {"a_k4": 0, "b_k3": 1, "b_relu": 1}  # 128 x 32 | 64 x 16 + 48 x 16
    for key, value in torch.load(tmp_path / "reference" / "rank0.pt")["state"].items():
        assert torch.equal(rank0["state"][key], rank1["state"][key]), key
        torch.testing.assert_close(rank0["state"][key], value, atol=1e-5, rtol=1e-4, msg=key)
