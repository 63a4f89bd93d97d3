"""The `neurolight` command: LightningCLI over every LightningModule and LightningDataModule of the suite.

neurolight fit --config configs/sae/demo.yaml
neurolight fit --config configs/sae/demo.yaml --config configs/trainer/ddp.yaml
"""

from __future__ import annotations

import os
import sys
import warnings

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


def run(args: list[str] | None = None) -> LightningCLI:
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

    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point (returns nothing, so the script prints nothing extra at exit). A store's refusal (wrong
    key, unreachable server, an index of another SAE) is a one-line message that says what to do, not a traceback."""
    from neurolight.callbacks.interpret.stores import LatentStoreError

    try:
        run(args)
    except LatentStoreError as error:
        sys.exit(f"neurolight: {error}")


if __name__ == "__main__":
    main()
