"""Data that flows into the models: text -> tokens -> activations."""

from datamodules.activations import ActivationDataModule

__all__ = ["ActivationDataModule"]
