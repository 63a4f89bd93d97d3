"""The `neurolight` command: LightningCLI over every LightningModule and LightningDataModule of the suite.

neurolight fit --config configs/sae/demo.yaml
neurolight fit --config configs/sae/demo.yaml --config configs/trainer/ddp.yaml
"""

from __future__ import annotations

import os
import sys
import warnings
from argparse import ArgumentError

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from neurolight.cli.errors import config_error_line, debug_requested, exit_with


class NeurolightCLI(LightningCLI):
    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        _lines_when_not_a_terminal(trainer)
        return trainer


def _lines_when_not_a_terminal(trainer) -> None:
    """Under a pipe or in a log file a tqdm bar shows nothing until it ends: print a line every N seconds instead."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    from neurolight.callbacks.line_progress import INTERVAL_ENV, LineProgress

    if sys.stderr.isatty() or not isinstance(trainer.progress_bar_callback, TQDMProgressBar):
        return
    line = LineProgress(float(os.environ.get(INTERVAL_ENV, 30)))
    trainer.callbacks[trainer.callbacks.index(trainer.progress_bar_callback)] = line


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

    return NeurolightCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": exit_on_error},
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point (returns nothing, so the script prints nothing extra at exit). A user error (a bad
    setting, a missing file, a store's refusal) is one line that names the cause and the fix, not a traceback;
    ``--debug`` or ``NEUROLIGHT_DEBUG=1`` shows the trace."""
    from neurolight.callbacks.interpret.stores import LatentStoreError

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
    except (LatentStoreError, ValueError, OSError) as error:
        exit_with(error, debug)


if __name__ == "__main__":
    main()
