"""The SAE step of the 8-SAE sweep alone: no LLM, random activations, a Lightning Trainer as in ``sae_sweep.py``.

    .venv/bin/python bench/sae_sweep_step.py [--steps 30] [--precision 32-true|bf16-mixed] [--dead] [--profile]

Trains ``configs/sae/sweep-demo.yaml``'s ``SparseAutoencoderSweep`` (TopK, k in {16, 32, 64, 128} x d_sae in {2304,
4608}, d_in 576) on 512-row batches of synthetic activations (a 256-direction sparse code plus noise) on one torch
thread, and prints the median and minimum of the step (forward, backward, optimiser, decoder constraint, counters)
in wall time and in this thread's CPU time (less sensitive to other jobs on a shared machine), with the load.
``--dead`` marks latents dead after 1024 tokens, so the AuxK loss runs; ``--profile`` prints torch.profiler's table
of the last 6 steps. To compare two trees, run each tree's copy alternately (A B B A).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sae_runs

from neurolight.lightning_modules import SparseAutoencoderSweep


def activations(rows: int, d_in: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(256, d_in, generator=generator)
    codes = torch.randn(rows, 256, generator=generator) * (torch.rand(rows, 256, generator=generator) < 0.1)
    return codes @ basis + 0.1 * torch.randn(rows, d_in, generator=generator)


class StepClock(pl.Callback):
    def __init__(self, profile_from: int | None) -> None:
        self.wall, self.cpu, self.profile_from, self.profiler = [], [], profile_from, None

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.profile_from:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()
        self.start = time.perf_counter(), time.thread_time()

    def on_train_batch_end(self, *args) -> None:
        self.wall.append(time.perf_counter() - self.start[0])
        self.cpu.append(time.thread_time() - self.start[1])

    def on_train_end(self, *args) -> None:
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            print(self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/sae/sweep-demo.yaml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--dead", action="store_true", help="latents dead after 1024 tokens: the AuxK loss runs")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of the last 6 steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = sae_runs.load_recipe(args.config)
    settings = {**recipe["model"], **({"dead_tokens_threshold": 1024} if args.dead else {})}
    pl.seed_everything(0, verbose=False)
    module = SparseAutoencoderSweep(**settings)
    batch = int(recipe["data"]["batch_size_autoencoder"])
    data = activations(batch * args.steps, module.units[next(iter(module.units))].hparams.act_vec_size)
    clock = StepClock(args.steps - 6 if args.profile else None)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision=args.precision, max_steps=args.steps, max_epochs=-1, logger=False,
        callbacks=[clock], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=10,
    )  # fmt: skip
    before = os.getloadavg()
    trainer.fit(module, DataLoader(TensorDataset(data), batch_size=batch))
    wall, cpu = clock.wall[3:], clock.cpu[3:]  # the first steps hold one-off allocations
    load = "/".join(f"{x:.2f}" for x in before) + " -> " + "/".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{args.precision}{' with AuxK' if args.dead else ''}: step of {len(module.units)} SAEs, median "
        f"{statistics.median(wall) * 1000:.0f} ms (min {min(wall) * 1000:.0f}) wall, "
        f"{statistics.median(cpu) * 1000:.0f} ms (min {min(cpu) * 1000:.0f}) thread CPU; load {load}"
    )


if __name__ == "__main__":
    main()
