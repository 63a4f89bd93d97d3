"""The `neurolight` command: LightningCLI over every LightningModule and LightningDataModule of the suite.

neurolight fit --config configs/sae/demo.yaml
neurolight fit --config configs/sae/demo.yaml --config configs/trainer/ddp.yaml
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from argparse import ArgumentError
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from neurolight.cli.errors import config_error_line, debug_requested, exit_with


class NeurolightCLI(LightningCLI):
    def _parse_ckpt_path(self) -> None:
        # Lightning re-instantiates the model from a checkpoint's hyperparameters, whatever the recipe says: a
        # checkpoint of another module, or of another SAE shape, would silently replace the recipe's model.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            check_checkpoint_matches(ckpt_path, self.config[subcommand].get("model"))
            resume_into_the_checkpoints_version(ckpt_path, self.config[subcommand].get("trainer"))
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        _lines_when_not_a_terminal(trainer)
        _stop_between_steps_on_ctrl_c(trainer)
        return trainer


def _stop_between_steps_on_ctrl_c(trainer) -> None:
    """A first Ctrl-C stops the run at the end of the current step, as Lightning does on SIGTERM, so the checkpoint
    callbacks save a whole state to resume from; a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        trainer._signal_connector.received_sigterm = True
        print(
            "\nneurolight: stopping after this step and saving a checkpoint (Ctrl-C again to abort now)",
            file=sys.stderr,
        )

    signal.signal(signal.SIGINT, stop)


def _lines_when_not_a_terminal(trainer) -> None:
    """Under a pipe or in a log file a tqdm bar shows nothing until it ends: print a line every N seconds instead."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from neurolight.callbacks.line_progress import INTERVAL_ENV, LineProgress

    # Lightning's default bar is Rich where rich is installed (it is, through deepspeed), else tqdm.
    bars = (TQDMProgressBar, RichProgressBar)
    if sys.stderr.isatty() or not isinstance(trainer.progress_bar_callback, bars):
        return
    line = LineProgress(float(os.environ.get(INTERVAL_ENV, 30)))
    trainer.callbacks[trainer.callbacks.index(trainer.progress_bar_callback)] = line


def resume_into_the_checkpoints_version(ckpt_path: str, trainer_config) -> None:
    """A resumed run whose logger leaves its version unset (the SEND recipes) continues in the version folder that
    holds its checkpoint, ``<save_dir>/<name>/version_N/...``, instead of a new ``version_N+1``: its metrics and
    later checkpoints stay with the run's earlier ones."""
    logger = trainer_config.get("logger") if trainer_config is not None else None
    init_args = (
        getattr(logger, "init_args", None) if logger is not None and not isinstance(logger, (bool, list)) else None
    )
    if init_args is None or init_args.get("version") is not None or not init_args.get("save_dir"):
        return
    root = Path(init_args["save_dir"]) / (init_args.get("name") or "lightning_logs")
    try:
        relative = Path(ckpt_path).resolve().relative_to(root.resolve())
    except ValueError:
        return  # a checkpoint from elsewhere: a new version, as Lightning does
    folder = relative.parts[0] if len(relative.parts) > 1 else ""
    if folder.startswith("version_") and folder.removeprefix("version_").isdigit():
        init_args["version"] = int(folder.removeprefix("version_"))


# Init arguments that fix the shapes of a module's weights: a checkpoint must agree with the recipe on them.
_SHAPE_ARGUMENTS = ("act_vec_size", "dict_vec_size", "model_name")


def check_checkpoint_matches(ckpt_path: str, model_config) -> None:
    """Refuse, in one line, a checkpoint written by another module class or with other weight shapes."""
    import importlib

    import torch

    try:
        hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters") or {}
    except Exception as error:  # a truncated or foreign file: say which and why, not pickle's traceback
        raise ValueError(f"--ckpt_path {ckpt_path} cannot be read as a Lightning checkpoint ({error})") from None
    stored, configured = hparams.get("_class_path"), getattr(model_config, "class_path", None)
    if not stored or not configured:
        return

    def resolve(path: str):
        module, _, name = path.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return path

    if resolve(stored) is not resolve(configured):
        raise ValueError(
            f"--ckpt_path {ckpt_path} is a checkpoint of {stored.rsplit('.', 1)[-1]}, but this recipe trains "
            f"{configured.rsplit('.', 1)[-1]}; give a checkpoint of a run of this recipe"
        )
    init_args = getattr(model_config, "init_args", None) or {}
    for key in _SHAPE_ARGUMENTS:
        if key in hparams and key in init_args and init_args[key] != hparams[key]:
            raise ValueError(
                f"--ckpt_path {ckpt_path} was trained with {key}={hparams[key]}, but the recipe sets {key}="
                f"{init_args[key]}; resume with the run's own settings, or start a new run without --ckpt_path"
            )


def run(args: list[str] | None = None, exit_on_error: bool = True) -> LightningCLI:
    # Quiet the tokenizers fork warning: the datamodule forks worker processes after tokenizing.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Lightning 2.6's own pytree helper trips a deprecation of torch >= 2.10 on every fit and predict; nothing the
    # user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # LightningCLI resolves short class names among imported subclasses: import every exported class.
    import neurolight.callbacks
    import neurolight.datamodules
    import neurolight.lightning_modules

    for package in (neurolight.datamodules, neurolight.lightning_modules, neurolight.callbacks):
        for name in package.__all__:
            getattr(package, name)

    previous = signal.getsignal(signal.SIGINT)
    try:
        return NeurolightCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": exit_on_error},
            args=args,
        )
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)


_UNION_ERROR = "Does not validate against any of the Union subtypes"


def main(args: list[str] | None = None) -> None:
    """Console entry point (returns nothing, so the script prints nothing extra at exit). A user error (a bad
    setting, a missing file, a store's refusal, a folder that another live run holds) is one line that names the
    cause and the fix, not a traceback; ``--debug`` or ``NEUROLIGHT_DEBUG=1`` shows the trace."""
    from neurolight.callbacks.interpret.stores import LatentStoreError
    from neurolight.callbacks.run_folder import FolderInUseError

    argv = sys.argv[1:] if args is None else list(args)
    debug, argv = debug_requested(argv)
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself (it warns when given both)
    try:
        run(None if args is None else argv, exit_on_error=debug)
    except ArgumentError as error:
        subcommand = next((arg for arg in argv if not arg.startswith("-")), None)
        print(f"neurolight: error: {config_error_line(str(error), subcommand)}", file=sys.stderr)
        sys.exit(2)
    except (LatentStoreError, FolderInUseError, ValueError, OSError) as error:
        if isinstance(error, ValueError) and str(error).startswith(_UNION_ERROR) and not debug:
            # A class's own error while jsonargparse instantiates it (a missing SAE file) arrives wrapped in the
            # list of Union subtypes it tried: keep the class's message.
            subcommand = next((arg for arg in argv if not arg.startswith("-")), None)
            error = ValueError(config_error_line(str(error), subcommand))
        exit_with(error, debug)


if __name__ == "__main__":
    main()
