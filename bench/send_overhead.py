"""SEND's epoch-time overhead over plain fine-tuning, on the demo recipe, both measured in the same run.

    .venv/bin/python bench/send_overhead.py [--config configs/send/demo.yaml] [--epochs 4] [--repeats 1]
                                            [--threads N] [--json FILE]

Both sides fine-tune the same model on the same data with the same settings, all taken from the recipe
(``configs/send/demo.yaml``: SmolLM2-135M-Instruct, 300 FanOutQA questions, 26 of 30 layers and the embeddings
frozen, 64 tokens, batch 8, float32): ``send`` with the recipe's ``SensitiveNeuronDropout`` callback, ``plain``
with the same ``SendModule`` and no callback. No logger, checkpoints, progress bar or model writing on either side.
The sides alternate (plain send send plain ...) so that load from other processes hits both alike.

An epoch's time is the time from the end of the previous epoch (for the first, from the start of training) to
the end of this one: training steps, validation and, for ``send``, the callback's work (the tracking-set forward
after every epoch and once before the first, EigenScore/EES, sensitivity, and in drop windows the gradient masks
and re-zeroing). It is taken as wall time and as this process's CPU time; on a machine shared with other jobs the
CPU time is the steadier of the two (use ``--threads 1`` there: two threads waiting for each other on a busy
machine can make a step ten times slower). Printed: both sides' epoch times and means, the overhead of ``send``
over ``plain`` in percent from each, and, within the ``send`` runs themselves, the time spent in the callback's
hooks against the rest of the same epochs, which no load difference between the runs can distort. The SEND paper
reported +11% (61 vs 55 min/epoch, Llama-3.1-8B on 2,000 examples).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from neurolight.callbacks.send.sensitive_dropout import SensitiveNeuronDropout  # noqa: E402
from neurolight.datamodules.send.qa import QADataModule  # noqa: E402
from neurolight.lightning_modules.send.module import SendModule  # noqa: E402


class EpochTimer(pl.Callback):
    """Wall and CPU (this process) time between consecutive epoch ends, the first from the start of training, and
    the CPU time inside training batches and validation; add it last."""

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self.epoch_cpu_seconds: list[float] = []
        self.batches_cpu_seconds: list[float] = []
        self.validation_cpu_seconds: list[float] = []
        self._mark = (0.0, 0.0)
        self._batches = self._validation = self._start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._mark = (time.perf_counter(), time.process_time())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._start = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._batches += time.process_time() - self._start

    def on_validation_start(self, trainer, pl_module) -> None:
        self._start = time.process_time()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._validation += time.process_time() - self._start

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        now = (time.perf_counter(), time.process_time())
        self.epoch_seconds.append(now[0] - self._mark[0])
        self.epoch_cpu_seconds.append(now[1] - self._mark[1])
        self.batches_cpu_seconds.append(self._batches)
        self.validation_cpu_seconds.append(self._validation)
        self._mark, self._batches, self._validation = now, 0.0, 0.0


_SEND_HOOKS = ("on_train_epoch_start", "on_train_epoch_end", "on_before_optimizer_step", "on_train_batch_end")


class TimedSend(SensitiveNeuronDropout):
    """The recipe's callback, with the wall and CPU time spent in its hooks, and in its tracking forward passes."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hook_seconds = [0.0, 0.0]
        self.tracking_seconds: list[float] = []
        for name in _SEND_HOOKS:
            setattr(self, name, self._timed(getattr(self, name)))

    def _timed(self, hook):
        def timed(*args, **kwargs):
            start = (time.perf_counter(), time.process_time())
            try:
                return hook(*args, **kwargs)
            finally:
                self.hook_seconds[0] += time.perf_counter() - start[0]
                self.hook_seconds[1] += time.process_time() - start[1]

        return timed

    def tracking_embeddings(self, trainer, pl_module):
        start = time.perf_counter()
        try:
            return super().tracking_embeddings(trainer, pl_module)
        finally:
            self.tracking_seconds.append(time.perf_counter() - start)


def load_recipe(path: Path) -> dict:
    config = yaml.safe_load(path.read_text())
    send_args = next(
        c.get("init_args", {})
        for c in config["trainer"]["callbacks"]
        if c["class_path"].endswith("SensitiveNeuronDropout")
    )
    return {
        "seed": config.get("seed_everything", 0),
        "precision": config["trainer"].get("precision", "32-true"),
        "model": dict(config["model"]["init_args"]),
        "data": dict(config["data"]["init_args"]),
        "send": dict(send_args),
    }


def run_side(side: str, recipe: dict, epochs: int, accelerator: str) -> dict:
    pl.seed_everything(recipe["seed"], verbose=False)
    datamodule = QADataModule(**recipe["data"])
    module = SendModule(**{**recipe["model"], "save_model": False})
    timer = EpochTimer()
    send = TimedSend(**recipe["send"]) if side == "send" else None
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=recipe["precision"],
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[send, timer] if send else [timer],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    result = {
        "side": side,
        "epoch_seconds": timer.epoch_seconds,
        "epoch_cpu_seconds": timer.epoch_cpu_seconds,
        "batches_cpu_seconds": timer.batches_cpu_seconds,
        "validation_cpu_seconds": timer.validation_cpu_seconds,
        "fit_seconds": time.perf_counter() - start,
        "train_batches_per_epoch": trainer.num_training_batches,
        "val_loss": float(trainer.callback_metrics.get("val/loss", float("nan"))),
    }
    if send is not None:
        result["send_hook_seconds"], result["send_hook_cpu_seconds"] = send.hook_seconds
        result["tracking_seconds"] = send.tracking_seconds
        result["tracking_samples"] = len(datamodule.tracking_records)
        result["dropped_per_epoch"] = [len(s["indices"]) for s in send.selections]
    return result


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def pct(new: float, base: float) -> float:
    return 100 * (new / base - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "send" / "demo.yaml")
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's trainer.max_epochs")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, alternating")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(args.config)
    epochs = args.epochs or yaml.safe_load(args.config.read_text())["trainer"]["max_epochs"]
    order = [side for r in range(args.repeats) for side in (("plain", "send") if r % 2 == 0 else ("send", "plain"))]
    results = []
    for side in order:
        r = run_side(side, recipe, epochs, args.accelerator)
        results.append(r)
        print(
            f"{side:>5}: epoch wall "
            + " ".join(f"{s:6.1f}" for s in r["epoch_seconds"])
            + " s | cpu "
            + " ".join(f"{s:6.1f}" for s in r["epoch_cpu_seconds"])
            + " s (in training batches "
            + " ".join(f"{s:5.1f}" for s in r["batches_cpu_seconds"])
            + ", validation "
            + " ".join(f"{s:4.1f}" for s in r["validation_cpu_seconds"])
            + ")",
            flush=True,
        )

    def epochs_of(side: str, key: str) -> list[float]:
        return [s for r in results if r["side"] == side for s in r[key]]

    sends = [r for r in results if r["side"] == "send"]
    send_wall, send_cpu = sum(epochs_of("send", "epoch_seconds")), sum(epochs_of("send", "epoch_cpu_seconds"))
    hook_wall, hook_cpu = sum(r["send_hook_seconds"] for r in sends), sum(r["send_hook_cpu_seconds"] for r in sends)
    summary = {
        "plain_epoch_s": mean(epochs_of("plain", "epoch_seconds")),
        "send_epoch_s": mean(epochs_of("send", "epoch_seconds")),
        "plain_epoch_cpu_s": mean(epochs_of("plain", "epoch_cpu_seconds")),
        "send_epoch_cpu_s": mean(epochs_of("send", "epoch_cpu_seconds")),
        "send_hooks_per_epoch_s": hook_wall / (epochs * len(sends)),
        "tracking_pass_s": mean([s for r in sends for s in r["tracking_seconds"]]),
        "tracking_passes_per_run": len(sends[0]["tracking_seconds"]),
        "tracking_samples": sends[0]["tracking_samples"],
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}".strip(),
    }
    summary["overhead_wall_pct"] = pct(summary["send_epoch_s"], summary["plain_epoch_s"])
    summary["overhead_cpu_pct"] = pct(summary["send_epoch_cpu_s"], summary["plain_epoch_cpu_s"])
    # Within the SEND runs: what the callback's hooks cost against the rest of the same epochs.
    summary["overhead_in_run_wall_pct"] = 100 * hook_wall / (send_wall - hook_wall)
    summary["overhead_in_run_cpu_pct"] = 100 * hook_cpu / (send_cpu - hook_cpu)
    print(
        f"mean epoch wall: plain {summary['plain_epoch_s']:.1f} s, send {summary['send_epoch_s']:.1f} s "
        f"-> {summary['overhead_wall_pct']:+.1f}%\n"
        f"mean epoch cpu:  plain {summary['plain_epoch_cpu_s']:.1f} s, send {summary['send_epoch_cpu_s']:.1f} s "
        f"-> {summary['overhead_cpu_pct']:+.1f}%\n"
        f"SEND hooks within the SEND runs: {summary['send_hooks_per_epoch_s']:.2f} s/epoch = "
        f"{summary['overhead_in_run_wall_pct']:+.1f}% wall, {summary['overhead_in_run_cpu_pct']:+.1f}% cpu of the rest "
        f"of the epoch ({summary['tracking_passes_per_run']} tracking passes of {summary['tracking_samples']} "
        f"questions, {summary['tracking_pass_s']:.2f} s each)"
    )
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
