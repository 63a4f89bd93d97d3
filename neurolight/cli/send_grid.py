"""Run SEND over models x datasets: `neurolight fit` then `neurolight predict` for every pair, one subprocess each.

    neurolight-send-grid --dry_run
    neurolight-send-grid --models llama2-7b vicuna-7b --datasets triviaqa truthfulqa --max_samples 300 --num_epochs 3
    neurolight-send-grid --models smollm2-135m --datasets fanoutqa --output_dir runs/grid --trainer.precision bf16-true
    neurolight-send-grid --datasets coqa --fit_config configs/send/coqa.yaml configs/trainer/deepspeed.yaml

The runner never reads stdin (its children get /dev/null), goes on past a failed run, prints a table of every pair
(status, wall time, EM / F1 of each model), then each pair's models side by side (``neurolight-qa-scores``), and
exits with 1 if any run failed (130 if interrupted).

Per pair it scores three models (``--arms``): ``send``, SEND fine-tuning; ``plain``, the control: the same recipe,
seed and data without the ``SensitiveNeuronDropout`` callback, since SEND's claim is relative to plain fine-tuning;
``base``, the model as given. It runs
  1. ``neurolight fit --config <recipe> [--config <model overlay>]`` with the model, the dataset and the shared
     training options; the SEND module writes ``{output_dir}/{model}_{dataset}_SEND/``. The recipe is the
     dataset's, ``configs/send/{dataset}.yaml`` (fanoutqa: ``configs/send/demo.yaml``), followed by the model's
     overlay ``configs/send/models/{model}.yaml`` where one exists, as the README composes them by hand;
     ``--fit_config A [B ...]`` replaces both with the given files for every pair; the control fit is the same
     command with the callbacks list minus SEND's, writing ``{output_dir}/{model}_{dataset}_plain/``;
  2. ``neurolight predict --config <predict_config>`` from each model, writing
     ``{output_dir}/predictions_{model}_{dataset}.json`` (SEND), ``..._plain.json`` and ``..._base.json``.
Data options (``--max_samples``, ``--max_length``, ``--batch_size`` and every passed-through ``--data.*``) go to
both commands, so that predict asks exactly the fit run's held-out test questions. Any other option this runner
does not know is passed through to the fit command (``--trainer.precision bf16-true``,
``--model.init_args.freeze_layers 13``); ``--predict_args "..."`` adds options to the predict command only.
Everything a run writes stays under ``--output_dir``: the recipes' ``default_root_dir`` and logger folders are
replaced by ``{output_dir}/logs/{model}_{dataset}/`` (fit) and ``.../predict/`` (predict, its ``config.yaml``), and
each run's console output is kept in ``{output_dir}/logs/{model}_{dataset}_{stage}.log``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from neurolight.cli.grid_process import execute, tail
from neurolight.cli.send_grid_recipes import (
    find_config,
    fit_configs,
    logger_args,
    plain_callbacks,
    sensitivity_callbacks,
)
from neurolight.datamodules.llm.models import check_model_name

DEFAULT_MODELS = ["llama2-7b", "llama3.1-8b", "vicuna-7b"]
DEFAULT_DATASETS = ["triviaqa", "truthfulqa", "coqa", "tydiqa"]
STAGES = ("fit", "predict")
ARMS = ("base", "plain", "send")
"""The models scored per pair: the model as given, plain fine-tuning (the control) and SEND fine-tuning."""

DATA_FLAGS = {
    "max_samples": "--data.init_args.max_samples",
    "max_length": "--data.init_args.max_length",
    "batch_size": "--data.init_args.batch_size",
}
"""Grid options that set the data module: given to fit AND predict (same split)."""
FIT_FLAGS = {
    "num_epochs": "--trainer.max_epochs",
    "learning_rate": "--model.init_args.learning_rate",
}
"""Grid options given to fit only (``sensitivity_threshold``: see ``sensitivity_callbacks``)."""
PREDICT_FLAGS = {
    "num_samples": "--data.init_args.num_samples",
    "max_new_tokens": "--model.init_args.max_new_tokens",
    "temperature": "--model.init_args.temperature",
    "top_p": "--model.init_args.top_p",
    "num_generations": "--model.init_args.num_generations",
}
"""Grid options given to predict only."""
ACCELERATORS = {"auto": "auto", "cuda": "gpu", "gpu": "gpu", "cpu": "cpu", "mps": "mps"}


def model_slug(model: str) -> str:
    """The model's part of run names: a short name as is, else the last part of its id or path (as SendModule)."""
    return Path(model.rstrip("/")).name


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="neurolight-send-grid",
        description=__doc__.split("\n\n", 1)[0],
        allow_abbrev=False,  # never let an unknown --model.* option abbreviate --models
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    grid = parser.add_argument_group("grid")
    grid.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="models: short names, HF ids or paths")
    grid.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS, help="QA data sets")
    grid.add_argument("--dry_run", action="store_true", help="print the commands without running them")
    grid.add_argument("--output_dir", default="runs/send_grid", help="SEND models, predictions, logs, summary")
    grid.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="what to run per pair")
    grid.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS,
        default=list(ARMS),
        help="models scored per pair: base (the model as given), plain (fine-tuned by the same recipe, seed and data "
        "without the SEND callback: the control), send",
    )
    grid.add_argument(
        "--fit_config",
        nargs="+",
        metavar="CONFIG",
        help="recipe(s) of `neurolight fit` for every pair, composed in order (later files override); default, per "
        "pair: configs/send/{dataset}.yaml (fanoutqa: configs/send/demo.yaml), then configs/send/models/{model}.yaml "
        "where it exists",
    )
    grid.add_argument("--predict_config", default="configs/send/generate.yaml", help="recipe of `neurolight predict`")
    grid.add_argument("--skip_existing", action="store_true", help="skip fit where the SEND folder already exists")
    grid.add_argument("--overwrite", action="store_true", help="let fit replace an existing SEND folder")
    grid.add_argument("--timeout_s", type=float, default=None, help="stop a run after this many seconds")
    grid.add_argument("--quiet", action="store_true", help="keep run output in the logs only (tail on failure)")
    grid.add_argument(
        "--neurolight_cmd",
        default=f"{shlex.quote(sys.executable)} -m neurolight",
        help="command that runs the neurolight CLI (e.g. 'torchrun --nproc_per_node 4 -m neurolight')",
    )
    grid.add_argument("--predict_args", default="", help="extra options for predict only, as one quoted string")

    train = parser.add_argument_group("training (passed to fit)")
    train.add_argument("--max_samples", type=int, help="questions used per data set (fit and predict split)")
    train.add_argument("--num_epochs", type=int, help="training epochs (trainer.max_epochs)")
    train.add_argument("--learning_rate", type=float, help="AdamW learning rate")
    train.add_argument("--sensitivity_threshold", type=float, help="fraction of neurons SEND drops (0.3 = 30%%)")
    train.add_argument("--batch_size", type=int, help="sequences per batch (fit and predict)")
    train.add_argument("--max_length", type=int, help="longest prompt + answer in tokens (fit and predict)")
    train.add_argument("--device", choices=sorted(ACCELERATORS), help="trainer.accelerator (cuda = gpu)")
    train.add_argument("--use_wandb", action="store_true", help="log fit runs to Weights & Biases")
    train.add_argument("--wandb_project", default="neurolight-send", help="W&B project with --use_wandb")

    generate = parser.add_argument_group("generation (passed to predict)")
    generate.add_argument("--num_samples", type=int, help="test questions answered per pair")
    generate.add_argument("--max_new_tokens", type=int, help="longest answer in tokens")
    generate.add_argument("--temperature", type=float, help="0 = greedy")
    generate.add_argument("--top_p", type=float, help="nucleus sampling of the answer")
    generate.add_argument("--num_generations", type=int, help="K sampled answers for EigenScore (0 = off, K >= 2)")
    args, passthrough = parser.parse_known_args(argv)
    stray = [a for a in passthrough if a.startswith("-") and not a.startswith("--")]
    if stray:
        parser.error(f"unknown short option(s) {' '.join(stray)}; pass neurolight options in their long form")
    return args, passthrough


@dataclass
class Run:
    """One model x dataset pair of the grid and what became of it."""

    model: str
    dataset: str
    status: str = "pending"
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per stage."""
    fit_configs: list[str] = field(default_factory=list)
    """The ``--config`` files of its fit, in order."""
    send_dir: str = ""
    predictions: dict[str, str] = field(default_factory=dict)
    """Prediction JSON per arm (base, plain, send)."""
    aggregate: dict[str, dict] = field(default_factory=dict)
    """``aggregate`` of each arm's prediction JSON (exact_match, f1, the detection table, ...)."""

    @property
    def name(self) -> str:
        return f"{model_slug(self.model)}_{self.dataset}"

    @property
    def failed(self) -> bool:
        return self.status.startswith(("FAILED", "interrupted"))


def build_commands(args: argparse.Namespace, passthrough: list[str], run: Run) -> dict[str, list[str]]:
    """The fit and predict command lines of one pair (only the stages asked for)."""
    out = Path(args.output_dir)
    logs = out / "logs" / run.name
    neurolight = shlex.split(args.neurolight_cmd)
    send_dir = out / f"{run.name}_SEND"
    run.send_dir = str(send_dir)
    models = {"base": run.model, "plain": str(out / f"{run.name}_plain"), "send": str(send_dir)}
    suffix = {"base": "_base", "plain": "_plain", "send": ""}
    run.predictions = {arm: str(out / f"predictions_{run.name}{suffix[arm]}.json") for arm in ARMS if arm in args.arms}
    shared = _flags(args, DATA_FLAGS)
    if args.device is not None:
        shared += ["--trainer.accelerator", ACCELERATORS[args.device]]
    data_passthrough = _data_options(passthrough)
    commands = {}
    if "fit" in args.stages:
        configs = fit_configs(args, run.model, run.dataset)
        run.fit_configs = [str(path) for path in configs]
        fit = [*neurolight, "fit", *(item for path in configs for item in ("--config", str(path)))]
        fit += ["--model.init_args.model_name", run.model, "--data.init_args.model_name", run.model]
        fit += ["--data.init_args.dataset", run.dataset]
        fit += ["--model.init_args.output_dir", str(out), "--model.init_args.run_name", send_dir.name]
        fit += ["--trainer.default_root_dir", str(logs)]
        fit += shared
        fit += _flags(args, FIT_FLAGS)
        if args.sensitivity_threshold is not None:
            fit += ["--trainer.callbacks", sensitivity_callbacks(configs, args.sensitivity_threshold)]
        if args.overwrite:
            fit += ["--model.init_args.overwrite", "true"]
        if args.use_wandb:
            fit += ["--trainer.logger", "lightning.pytorch.loggers.WandbLogger"]
            fit += ["--trainer.logger.init_args.project", args.wandb_project]
            fit += ["--trainer.logger.init_args.name", run.name]
            fit += ["--trainer.logger.init_args.save_dir", str(out / "logs")]
        else:
            # The recipe's logger (and the checkpoints in its folder) would otherwise mix every pair's runs.
            fit += _logger_folder(configs, out / "logs", run.name)
        if "plain" in args.arms:
            # The control: the same command, the SEND callback taken out of the recipe's callbacks list.
            plain = _set(fit, "--model.init_args.run_name", Path(models["plain"]).name)
            plain = _set(plain, "--trainer.default_root_dir", str(logs.with_name(f"{run.name}_plain")))
            plain = _set(plain, "--trainer.callbacks", plain_callbacks(configs))
            if "--trainer.logger.init_args.name" in plain:  # its own logger folder (or W&B run name)
                plain = _set(plain, "--trainer.logger.init_args.name", f"{run.name}_plain")
            commands["fit_plain"] = plain + passthrough
        if "send" in args.arms:
            commands["fit"] = fit + passthrough
    if "predict" in args.stages:
        config = find_config(args.predict_config)
        for arm, path in run.predictions.items():
            predict = [*neurolight, "predict", "--config", str(config)]
            model = models[arm]
            predict += ["--model.init_args.model_name", model, "--data.init_args.model_name", model]
            predict += ["--data.init_args.dataset", run.dataset]
            predict += ["--trainer.callbacks.init_args.output_file", path]
            # The predict recipe's root (runs/demo/send) would receive, and overwrite, every pair's config.yaml.
            folder = "predict" if arm == "send" else f"predict_{arm}"
            predict += ["--trainer.default_root_dir", str(logs / folder)]
            predict += _logger_folder([config], logs, folder)
            predict += shared
            predict += _flags(args, PREDICT_FLAGS)
            stage = "predict" if arm == "send" else f"predict_{arm}"
            commands[stage] = predict + data_passthrough + shlex.split(args.predict_args)
    return commands


def _logger_folder(configs: list[Path], save_dir: Path, name: str) -> list[str]:
    """Options that move the recipes' logger, when it has a ``save_dir``, to ``save_dir/name``."""
    if "save_dir" not in logger_args(configs):
        return []
    return ["--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.logger.init_args.name", name]


def _flags(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """``[flag, value, ...]`` for the options of ``flags`` that were given."""
    return [
        item
        for key, flag in flags.items()
        if getattr(args, key) is not None
        for item in (flag, str(getattr(args, key)))
    ]


def _data_options(passthrough: list[str]) -> list[str]:
    """The ``--data.*`` options among the passed-through ones, with their values."""
    out, keep = [], False
    for item in passthrough:
        if item.startswith("--"):
            keep = item.startswith("--data.")
        if keep:
            out.append(item)
    return out


def run_pair(args: argparse.Namespace, run: Run, commands: dict[str, list[str]]) -> None:
    logs = Path(args.output_dir) / "logs"
    for stage, command in commands.items():
        folder = Path(
            value_of(command, "--model.init_args.output_dir") or ".",
            value_of(command, "--model.init_args.run_name") or "",
        )
        if stage.startswith("fit") and args.skip_existing and (folder / "config.json").is_file():
            print(f"  {stage} skipped: {folder} exists (--skip_existing)")
            run.seconds[stage] = 0.0
            continue
        print(f"$ {shlex.join(command)}", flush=True)
        log = logs / f"{run.name}_{stage}.log"
        code, seconds = execute(command, log, args.timeout_s, args.quiet)
        run.seconds[stage] = seconds
        if code != 0:
            why = f"timeout after {args.timeout_s:g} s" if code is None else f"exit {code}"
            run.status = f"FAILED ({stage}, {why})"
            print(f"  {stage} of {run.name} failed ({why}); log: {log}")
            if args.quiet:
                print(tail(log))
            return
    if "predict" in args.stages:
        for arm, path in map(lambda item: (item[0], Path(item[1])), run.predictions.items()):
            if not path.is_file():
                run.status = f"FAILED (predict wrote no {path.name})"
                return
            run.aggregate[arm] = json.loads(path.read_text()).get("aggregate") or {}
    run.status = "ok"


def value_of(command: list[str], flag: str) -> str | None:
    """The value after ``flag`` in ``command``, if it is there."""
    return command[command.index(flag) + 1] if flag in command else None


def _set(command: list[str], flag: str, value: str) -> list[str]:
    """``command`` with ``flag`` set to ``value`` (replaced where it is there, appended where not)."""
    if flag not in command:
        return [*command, flag, value]
    at = command.index(flag) + 1
    return [*command[:at], value, *command[at + 1 :]]


def summary_table(runs: list[Run], arms: list[str]) -> str:
    def number(run: Run, arm: str, key: str) -> str:
        value = run.aggregate.get(arm, {}).get(key)
        return "-" if value is None else f"{value:.3f}"

    header = ("pair", "status", "wall time", *(f"{key} {arm}" for arm in arms for key in ("EM", "F1")))
    rows = [
        (
            f"{run.model} x {run.dataset}",
            run.status,
            f"{sum(run.seconds.values()):.0f} s" if run.seconds else "-",
            *(number(run, arm, key) for arm in arms for key in ("exact_match", "f1")),
        )
        for run in runs
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, passthrough = parse_args(argv)
    for model in args.models:  # a dry run checks them too: a typo should not wait for the real run to surface
        try:
            check_model_name(model)
        except (ValueError, OSError) as error:
            raise SystemExit(f"neurolight-send-grid: error: --models: {error}") from None
    runs = [Run(model, dataset) for model in args.models for dataset in args.datasets]
    plans = [(run, build_commands(args, passthrough, run)) for run in runs]
    if args.dry_run:
        for run, commands in plans:
            print(f"# {run.model} x {run.dataset}")
            if run.fit_configs:
                print(f"#   fit recipe: {' + '.join(run.fit_configs)}")
            for command in commands.values():
                print(f"$ {shlex.join(command)}")
            run.status = "dry run"
        print(f"\n{len(runs)} pairs, {sum(len(c) for _, c in plans)} commands (dry run: nothing was run)")
        return 0
    interrupted = False
    for number, (run, commands) in enumerate(plans, 1):
        print(f"\n=== [{number}/{len(runs)}] {run.model} x {run.dataset}", flush=True)
        try:
            run_pair(args, run, commands)
        except KeyboardInterrupt:
            run.status = "interrupted"
            interrupted = True
            break
    for run in runs:
        if run.status == "pending":
            run.status = "not run"
    for run in runs:
        if run.status == "ok" and run.predictions:
            from neurolight.cli.qa_scores import comparison_table

            print(f"\n{run.model} x {run.dataset}, models side by side:")
            try:
                print(comparison_table(list(run.predictions.values())))
            except ValueError as error:
                print(f"  no detection table: {error}")
    table = summary_table(runs, [arm for arm in ARMS if arm in args.arms])
    print(f"\n{table}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid_summary.json").write_text(json.dumps([asdict(run) for run in runs], indent=2))
    failed = [run for run in runs if run.failed]
    print(f"\n{len(runs) - len(failed)} of {len(runs)} pairs ok; summary in {out / 'grid_summary.json'}")
    return 130 if interrupted else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
