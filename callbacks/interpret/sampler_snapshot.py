"""Progress snapshots of the latent sampler, so that a killed interpretation-sample run continues where it stopped:

    neurolight predict --config configs/interpret/sample.yaml      (the same command again, after a kill)

``neurolight.callbacks.InterpretationSamplesWriter`` saves each rank's ``progress_state(sampler)`` to
``<save_path>/.resume/rank{r}.pt`` every ``snapshot_every_n_contexts`` contexts, and removes the folder once the
samples are written. A rerun compares the fingerprint in every rank's snapshot with its own settings, gives each rank
its state back (``LatentSampler.resume_from``) and tells the datamodule to leave out the contexts already taken in,
which are then neither read nor run through the LLM.

A snapshot is this rank's progress: the contexts of each pass it took in, its OWN firing counts (also in pass 1,
after the band was chosen from the counts of all ranks) and, in pass 1, the band and the ``RunningLatentSamples``
buffers. A resumed run sums the counts over ranks again, so every rank takes part in that collective whichever
pass its own snapshot is in.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from neurolight.datamodules.files import atomic_path

FOLDER = ".resume"
"""Snapshots go to this hidden folder inside the writer's ``save_path``."""


class SamplerSnapshots:
    """The snapshot files of one ``save_path``: ``.resume/rank{r}.pt`` for every rank r that saved one.

    Args:
        save_path: The samples directory the snapshots belong to.
        rank: Global rank of this process; it saves and loads ``rank{rank}.pt``.
    """

    def __init__(self, save_path: str | Path, rank: int) -> None:
        self.folder = Path(save_path) / FOLDER
        self.path = self.folder / f"rank{rank}.pt"

    def save(self, state: dict) -> Path:
        """Write ``state`` under a temporary name, flush it to disk and rename it: a kill at any moment leaves
        either the previous snapshot or this one, never half of one."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path, "progress snapshot of the latent sampler") as temporary:
            with temporary.open("wb") as file:
                torch.save(state, file)
                file.flush()
                os.fsync(file.fileno())
        return self.path

    def exist(self) -> bool:
        """Whether any rank saved a snapshot here."""
        return any(self.folder.glob("rank*.pt"))

    def load(self) -> dict | None:
        """This rank's snapshot, or None where it saved none (it then starts from the first context)."""
        if not self.path.is_file():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def mismatch(self, fingerprint: dict) -> str | None:
        """Why the snapshots here cannot continue a run with ``fingerprint`` (None: they can, or there are none).

        Every rank's file is checked, also those of ranks this run does not have (another world size).
        """
        for file in sorted(self.folder.glob("rank*.pt")):
            try:
                saved = torch.load(file, map_location="cpu", weights_only=True, mmap=True)["fingerprint"]
            except Exception as error:  # whatever torch raises, the file cannot be resumed from
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                return f"{file.name} cannot be read: {reason}"
            differences = describe_differences(saved, fingerprint)
            if differences:
                return differences
        return None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def describe_differences(saved: dict, current: dict) -> str:
    """``"seed 7 there, 8 here; num_top 4 there, 5 here"`` for every key whose value differs ('' if none)."""
    keys = list(saved) + [key for key in current if key not in saved]
    return "; ".join(
        f"{key} {saved.get(key, 'unset')} there, {current.get(key, 'unset')} here"
        for key in keys
        if saved.get(key) != current.get(key)
    )


def fingerprint(sampler) -> dict:
    """Everything a resumed run must share with the killed one for its samples to be what one uninterrupted run
    writes: the SAE's weights, the LLM and hook point, the band, sample sizes and seed, the contexts of both passes,
    the precision and the number of ranks. ``batch_size`` may change (e.g. after an out-of-memory kill).

    Args:
        sampler: A ``LatentSampler`` attached to a trainer whose ``CorpusContextDataModule`` is set up.
    """
    hp, settings, datamodule = sampler.hparams, sampler.llm_settings, sampler.trainer.datamodule
    if not hasattr(datamodule, "fingerprint"):
        raise TypeError(
            f"resuming needs neurolight.datamodules.CorpusContextDataModule, not {type(datamodule).__name__}"
        )
    sizes = ("num_top", "num_quantiles", "num_per_quantile", "num_random", "num_negative")
    return {
        "sae_fingerprint": sampler.checkpoint_fingerprint(),
        **{name: settings[name] for name in ("model_name", "layer_id", "layer_type", "llm_dtype")},
        "hook_point": settings["hook_points"][settings["layer_type"]],
        "exclude_first_position": settings["exclude_first_position"],
        **{name: hp[name] for name in ("log_freq_lower", "log_freq_upper", *sizes, "seed")},
        **datamodule.fingerprint(),
        "precision": str(sampler.trainer.precision),
        "world_size": sampler.trainer.world_size,
    }


def progress_state(sampler) -> dict:
    """A ``LatentSampler``'s progress on this rank, on the CPU, for ``LatentSampler.resume_from``: ``fingerprint``,
    ``pass`` (0 or 1), ``contexts_done`` (2,), this rank's own ``fired`` (d_sae,), ``frequency_max`` (d_sae,) and
    ``frequency_tokens`` (), and in pass 1 the ``band`` and the ``samples`` (``RunningLatentSamples`` buffers),
    None before."""
    in_pass_1 = sampler.samples is not None
    state = {"fingerprint": fingerprint(sampler), "pass": int(in_pass_1)}
    for name in ("contexts_done", "fired", "frequency_max", "frequency_tokens"):
        state[name] = getattr(sampler, name).detach().cpu().clone()
    state["band"] = {**sampler.band, "latents": sampler.band["latents"].cpu()} if in_pass_1 else None
    state["samples"] = {k: v.cpu().clone() for k, v in sampler.samples.state_dict().items()} if in_pass_1 else None
    return state
