"""The `neurolight` command: LightningCLI over every LightningModule and LightningDataModule of the suite.

neurolight fit --config configs/sae/demo.yaml
neurolight fit --config configs/sae/demo.yaml --config configs/trainer/ddp.yaml
"""

from __future__ import annotations

import os

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


def run(args: list[str] | None = None) -> LightningCLI:
    # Quiet the tokenizers fork warning: the datamodule forks worker processes after tokenizing.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import callbacks  # noqa: F401  registers callbacks for `--trainer.callbacks+=Name`
    import datamodules.activations  # noqa: F401  registers the datamodules as subclasses
    import lightning_modules.sae_module  # noqa: F401

    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point (returns nothing, so the script prints nothing extra at exit)."""
    run(args)


if __name__ == "__main__":
    main()
