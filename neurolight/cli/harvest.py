"""neurolight-harvest --config configs/sae/harvest-demo.yaml

Runs the frozen LLM once over a tokenized corpus and writes the activations of its sites to an activation cache, which
``neurolight fit`` then trains SAEs from (``neurolight.datamodules.CachedActivationDataModule``). Rerun the same
command, or only ``--output_dir DIR``, to continue a killed harvest or rewrite a damaged shard.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

from neurolight.datamodules.sae.harvest import harvest_activations

_SKIPPED = {"overwrite", "on_shard"}


class _Progress:
    """A line per shard on a terminal; elsewhere (a log, a pipe) one every ``$NEUROLIGHT_PROGRESS_SECONDS``."""

    def __init__(self) -> None:
        from neurolight.callbacks.line_progress import INTERVAL_ENV

        self.interval = 0.0 if sys.stderr.isatty() else float(os.environ.get(INTERVAL_ENV, 30))
        self.started = self.printed = time.monotonic()
        self.first: int | None = None

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.first is None:  # the call before this run's first shard
            self.first, self.started, self.printed = done, now, now
            return
        if now - self.printed < self.interval and done < total:
            return
        self.printed = now
        rate = (done - self.first) / max(now - self.started, 1e-9)
        eta = f", {(total - done) / rate / 60:.1f} min left" if rate > 0 and done < total else ""
        print(f"neurolight-harvest: {done}/{total} contexts ({100 * done / total:.0f}%), {rate:.1f}/s{eta}",
              file=sys.stderr, flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Console script ``neurolight-harvest``: every parameter of ``harvest_activations``, plus ``--config``."""
    import docstring_parser
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    from neurolight.callbacks.run_folder import FolderInUseError, FolderLock
    from neurolight.cli.errors import debug_requested, exit_with

    debug, argv = debug_requested(sys.argv[1:] if argv is None else list(argv))
    parser = ArgumentParser(prog="neurolight-harvest", description=harvest_activations.__doc__.split("\n")[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(harvest_activations, skip=_SKIPPED)
    docs = {p.arg_name: p.description for p in docstring_parser.parse(harvest_activations.__doc__).params}
    parser.add_argument("--overwrite", action=ActionYesNo, default=False, help=docs["overwrite"])
    config = parser.parse_args(argv).as_dict()
    # A warning here is for the user (a damaged shard harvested again), not for a developer: one line, no source.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"{category.__name__}: {message}\n"
    config.pop("config", None)
    lock = FolderLock(config["output_dir"], "neurolight-harvest")
    try:
        lock.acquire()
        output = harvest_activations(**config, on_shard=_Progress())
    except (FolderInUseError, ValueError, OSError) as error:
        exit_with(error, debug, prefix="neurolight-harvest")
    finally:
        lock.release()
    print(f"activation cache complete: {output}")


if __name__ == "__main__":
    main()
