"""A test-only DeepSpeedStrategy that runs on CPU, so ZeRO code paths are exercised without a GPU.

Lightning's DeepSpeedStrategy refuses any accelerator but CUDA; DeepSpeed itself runs on CPU (gloo backend, its
CPU accelerator). Only the two CUDA checks are skipped; everything DeepSpeed does with the model and optimizer is
the real thing.
"""

from __future__ import annotations

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CpuDeepSpeedStrategy(DeepSpeedStrategy):
    def __init__(self, **kwargs) -> None:
        super().__init__(
            parallel_devices=[torch.device("cpu", 0)],  # the index is needed: DeepSpeed reads device.index
            process_group_backend="gloo",
            **kwargs,
        )

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA check

    def setup_distributed(self) -> None:
        # DeepSpeedStrategy.setup_distributed minus its CUDA device-index validation.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()
