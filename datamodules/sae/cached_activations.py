"""CachedActivationDataModule: an activation cache on disk -> shuffled SAE batches, without running the LLM.

    neurolight-harvest --config configs/sae/harvest-demo.yaml
    neurolight fit --config configs/sae/demo-cached.yaml

The order of the rows is a pure function of the seed and the number of batches served (docs/sae.md, Activation
cache): each pass (epoch) permutes the blocks of ``block_rows`` consecutive training rows, deals them to the ranks
(rank ``r`` takes blocks ``r, r + world, ...`` of the permutation), and each rank reads its blocks a window of
``shuffle_rows`` rows at a time and serves that window's rows in a random order. Every training row is served
exactly once per pass over all ranks, memory holds one window, and a resumed fit needs only the count of
batches served to continue at the right row. Validation batches are the rows of the last ``val_contexts``
contexts, never trained on; without an LLM the SAE module reports the activation-space metrics on them. Given
``sites``, every batch is ``{site: rows}``: the same rows (tokens) of each site, for a sweep over sites.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from neurolight.datamodules.prefetch import Prefetcher
from neurolight.datamodules.sae.activation_cache import (
    STORAGE_DTYPES,
    ActivationCache,
    check_site_names,
    model_id,
    site_name,
    to_tensor,
)
from neurolight.datamodules.sae.held_out import held_out_batches


def pass_blocks(seed: int, epoch: int, num_blocks: int, rank: int, world: int) -> np.ndarray:
    """The blocks rank ``rank`` of ``world`` reads in pass ``epoch``, in reading order: its share of the pass's
    permutation of all blocks."""
    return np.random.default_rng([seed, epoch]).permutation(num_blocks)[rank::world]


def block_ranges(blocks: np.ndarray, block_rows: int, train_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """First and end row of each block (the last block of the training rows may be short)."""
    starts = blocks * block_rows
    return starts, np.minimum(starts + block_rows, train_rows)


class _TrainStream(IterableDataset):
    """Endless training batches, starting after those the data module has seen consumed (a resumed fit)."""

    def __init__(self, datamodule: CachedActivationDataModule) -> None:
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[Tensor]:
        return self.datamodule.train_stream()


class _ValidationRows(Dataset):
    """The held-out rows from ``start``, in the batches of ``held_out.held_out_batches``."""

    def __init__(self, datamodule: CachedActivationDataModule, start: int, ranges: list[tuple[int, int]]) -> None:
        self.datamodule, self.start, self.ranges = datamodule, start, ranges

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, index: int) -> Tensor | dict[str, Tensor]:
        start, stop = (self.start + at for at in self.ranges[index])
        cache = self.datamodule.cache
        return self.datamodule.as_batch({site: cache.read(site, start, stop) for site in self.datamodule.sites})


class CachedActivationDataModule(pl.LightningDataModule):
    def __init__(
        self,
        cache_path: str,
        layer_id: int | None = None,
        layer_type: str | None = None,
        model_name: str | None = None,
        batch_size_autoencoder: int = 1024,
        shuffle_rows: int = 65_536,
        block_rows: int = 64,
        val_contexts: int = 64,
        val_batch_size: int = 1024,
        verify_checksums: bool = True,
        seed: int = 0,
        sites: list[str] | None = None,
        prefetch_batches: int = 4,
    ) -> None:
        """
        Args:
            cache_path: Directory written by ``neurolight-harvest`` (the activation cache).
            layer_id: Decoder layer of the site to train on; default: the cache's only site.
            layer_type: Layer type of the site (``mlp_sublayer``, ...); default: the cache's only site.
            model_name: The LLM the recipe expects; refused if the cache was harvested from another. Default: the
                cache's. The checkpoint records it (with the site and hook point) as a fit from the LLM does, so
                sampling and interpretation find the model.
            batch_size_autoencoder: Activation vectors per SAE training batch.
            shuffle_rows: Rows mixed at once (one window); memory holds ``shuffle_rows * d_in`` values.
            block_rows: Consecutive rows read together; the unit of the per-pass permutation and of the split across
                ranks. Smaller mixes better and reads in smaller pieces.
            val_contexts: Contexts at the end of the cache held out for validation (never trained on).
            val_batch_size: Rows per validation batch.
            verify_checksums: Check every shard of the site against the manifest's checksum at setup (reads the
                site once; a damaged shard is named). Off for caches too large to read at every start: sizes and
                headers are checked either way.
            seed: Seed of the block permutation and the window shuffles.
            sites: Several of the cache's sites to serve together instead of ``layer_type`` / ``layer_id``
                (``[layers.15.mlp_sublayer, layers.10.resid_post]``): every batch is then ``{site: rows}``, the
                same rows of each, and each SAE names the site it reads (``SweepMember.site``).
            prefetch_batches: Training batches read ahead in a background thread, so that reading overlaps the
                training step (on a GPU the read of a batch takes longer than the SAE step); pinned for an
                asynchronous copy when training on CUDA. 0 reads each batch in the training loop's thread. The
                batches and their order are the same either way.
        """
        super().__init__()
        self.save_hyperparameters()
        sizes = dict(batch_size_autoencoder=batch_size_autoencoder, shuffle_rows=shuffle_rows, block_rows=block_rows,
                     val_batch_size=val_batch_size)  # fmt: skip
        if bad := [f"{name}={value}" for name, value in sizes.items() if value < 1]:
            raise ValueError(f"{', '.join(bad)}: must be at least 1")
        if prefetch_batches < 0:
            raise ValueError(f"prefetch_batches={prefetch_batches} must be 0 (no reading ahead) or more")
        if sites is not None:
            if layer_id is not None or layer_type is not None:
                raise ValueError("give either sites (a non-empty list) or layer_id and layer_type, not both")
            check_site_names(sites)
        self.cache: ActivationCache | None = None
        self.sites: list[str] = []
        self.train_rows = 0
        self.consumed = 0  # training batches consumed in this run's stream (restored on resume)
        self.first_pass = 0  # the pass the stream starts at (a resume with another layout starts a new one)
        self._prefetcher: Prefetcher | None = None

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        if self.cache is not None:
            return
        hp = self.hparams
        cache = ActivationCache(hp.cache_path)
        manifest = cache.manifest
        self.sites = self._choose_sites(cache)
        if hp.model_name is not None and model_id(hp.model_name) != manifest["model"]:
            raise ValueError(
                f"activation cache {cache.path} was harvested from {manifest['model_name']} ({manifest['model']}), "
                f"but the recipe names model_name {hp.model_name}; set data.init_args.model_name: "
                f"{manifest['model_name']}, or harvest {hp.model_name} with neurolight-harvest"
            )
        train_contexts = manifest["num_contexts"] - hp.val_contexts
        self.train_rows = train_contexts * cache.rows_per_context
        if train_contexts * cache.rows_per_context < hp.block_rows * self._rank()[1] or hp.val_contexts < 0:
            raise ValueError(
                f"activation cache {cache.path} has {manifest['num_contexts']} contexts: too few for "
                f"{hp.val_contexts} validation contexts plus a block of {hp.block_rows} rows per rank; lower "
                "val_contexts or block_rows, or harvest more contexts"
            )
        for site in self.sites:
            cache.open(site, verify=hp.verify_checksums)
        self.cache = cache
        if not hp.sites:
            info = manifest["sites"][self.sites[0]]
            hp.update(layer_id=info["layer_id"], layer_type=info["layer_type"])
        # What a fit from the LLM records (ActivationDataModule's settings), so the checkpoint names its LLM and its
        # site (with several sites, each SAE records its own).
        hp.update(
            model_name=hp.model_name or manifest["model_name"],
            dataset_path=manifest["corpus"]["path"],
            num_tokens=manifest["num_tokens"],
            exclude_first_position=manifest["exclude_first_position"],
            llm_dtype=manifest["llm_dtype"],
            **{f"{layer_type}_hookpoint": template for layer_type, template in manifest["hook_templates"].items()},
        )

    def _choose_sites(self, cache: ActivationCache) -> list[str]:
        hp = self.hparams
        if hp.sites:
            if missing := [site for site in hp.sites if site not in cache.sites]:
                raise ValueError(
                    f"activation cache {cache.path} holds no site {', '.join(missing)} (it holds "
                    f"{', '.join(cache.sites)}); choose among those, or harvest them: neurolight-harvest --sites [...]"
                )
            return list(hp.sites)
        if hp.layer_id is None and hp.layer_type is None and len(cache.sites) == 1:
            return [cache.sites[0]]
        if hp.layer_id is None or hp.layer_type is None:
            raise ValueError(
                f"activation cache {cache.path} holds the sites {', '.join(cache.sites)}; set both "
                "data.init_args.layer_id and data.init_args.layer_type"
            )
        site = site_name(hp.layer_type, hp.layer_id)
        if site not in cache.sites:
            raise ValueError(
                f"activation cache {cache.path} holds no site {site} (it holds {', '.join(cache.sites)}); choose one "
                f"of those, or harvest it: neurolight-harvest --sites [{site}] ..."
            )
        return [site]

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    @property
    def site_widths(self) -> dict[str, int]:
        """The width (d_in) of each site served, in the order of ``sites``."""
        return {site: self.cache.d_in(site) for site in self.sites}

    @property
    def d_in(self) -> int:
        if len(self.sites) != 1:
            raise AttributeError(f"d_in: this data module serves {len(self.sites)} sites; see site_widths")
        return self.cache.d_in(self.sites[0])

    def mean_activation_norm(self, site: str | None = None) -> float:
        """Mean L2 norm of the rows of ``site`` (default: the only one), from the cache's manifest (all rows: no
        pass over the data)."""
        if site is None and len(self.sites) == 1:
            site = self.sites[0]
        if site not in self.sites:
            raise ValueError(f"this data module serves {', '.join(self.sites)}, not {site}")
        return self.cache.mean_norm(site)

    def as_batch(self, rows: dict[str, np.ndarray]) -> Tensor | dict[str, Tensor]:
        """Rows read per site as a batch: a tensor for one site, ``{site: tensor}`` for ``sites``."""
        tensors = {site: to_tensor(array, self.cache.dtype) for site, array in rows.items()}
        return tensors if self.hparams.sites else next(iter(tensors.values()))

    # ---------------------------------------------------------------------------------------------- order
    def windows(self, offset: int, rank: int, world: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """This rank's training rows from row ``offset`` of its stream on, as (block starts, block ends, row order)
        per window: the window's rows, read block by block and concatenated, are served in ``row order`` (after
        the offset)."""
        hp = self.hparams
        per_window, num_blocks = max(1, hp.shuffle_rows // hp.block_rows), -(-self.train_rows // hp.block_rows)
        epoch = self.first_pass
        while True:
            blocks = pass_blocks(hp.seed, epoch, num_blocks, rank, world)
            starts, stops = block_ranges(blocks, hp.block_rows, self.train_rows)
            for window, first in enumerate(range(0, len(starts), per_window)):
                in_window = slice(first, first + per_window)
                rows = int((stops[in_window] - starts[in_window]).sum())
                if offset >= rows:
                    offset -= rows
                    continue
                generator = np.random.default_rng([hp.seed, epoch, rank, window])
                yield starts[in_window], stops[in_window], generator.permutation(rows)[offset:]
                offset = 0
            epoch += 1

    def batches(self, start: int = 0) -> Iterator[Tensor | dict[str, Tensor]]:
        """(batch_size_autoencoder, d_in) training batches of this rank from batch ``start`` of its stream on
        (``{site: rows}`` with ``sites``)."""
        rank, world = self._rank()
        size = self.hparams.batch_size_autoencoder
        pieces, have = [], 0  # the next batch's rows; a batch may take the end of one window and the start of the next
        for starts, stops, order in self.windows(start * size, rank, world):
            windows = {site: self._read_window(site, starts, stops) for site in self.sites}
            # One gather a batch: memory holds one window, not a shuffled copy of it.
            position = 0
            while position < len(order):
                take = order[position : position + size - have]
                pieces.append({site: window[take] for site, window in windows.items()})
                have, position = have + len(take), position + len(take)
                if have == size:
                    if len(pieces) > 1:
                        pieces = [{site: np.concatenate([piece[site] for piece in pieces]) for site in self.sites}]
                    yield self.as_batch(pieces[0])
                    pieces, have = [], 0

    def _read_window(self, site: str, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """The rows of the blocks ``starts``-``stops`` of ``site``, block after block."""
        window = np.empty((int((stops - starts).sum()), self.cache.d_in(site)), STORAGE_DTYPES[self.cache.dtype])
        at = 0
        for first, stop in zip(starts.tolist(), stops.tolist()):
            self.cache.read(site, first, stop, out=window[at : at + stop - first])
            at += stop - first
        return window

    def train_stream(self) -> Iterator[Tensor | dict[str, Tensor]]:
        """The training batches from the first one not yet consumed, read ahead by ``prefetch_batches``."""
        batches = self.batches(self.consumed)
        if self.hparams.prefetch_batches == 0:
            return batches
        self._close_prefetcher()
        pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        self._prefetcher = Prefetcher(batches, self.hparams.prefetch_batches, _pinned if pin else None)
        return self._prefetcher

    def _close_prefetcher(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def teardown(self, stage: str) -> None:
        self._close_prefetcher()

    # -------------------------------------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_TrainStream(self), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        # Map-style: under DDP Lightning's DistributedSampler splits these batches across ranks (held_out.py).
        ranges = held_out_batches(self.cache.num_rows - self.train_rows, self.hparams.val_batch_size, self._rank()[1],
                                  "rows")  # fmt: skip
        rows = _ValidationRows(self, self.train_rows, ranges)
        return DataLoader(rows, batch_size=None, shuffle=False)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            self.consumed += 1  # Lightning fetches a batch ahead: count what a step takes, not what was read
        return batch

    # ------------------------------------------------------------------------------------------ resuming
    def state_dict(self) -> dict:
        """Where the stream stands: the same on every rank (each rank served as many batches)."""
        hp = self.hparams
        layout = {"world_size": self._rank()[1], "batch_size": hp.batch_size_autoencoder, "seed": hp.seed,
                  "block_rows": hp.block_rows, "shuffle_rows": hp.shuffle_rows,
                  "train_rows": self.train_rows}  # fmt: skip
        return {"first_pass": self.first_pass, "batches": self.consumed, "layout": layout}

    def load_state_dict(self, state: dict) -> None:
        layout = self.state_dict()["layout"]
        self.first_pass, self.consumed = state["first_pass"], state["batches"]
        if state["layout"] == layout:
            return
        changed = ", ".join(f"{k} {v} -> {layout[k]}" for k, v in state["layout"].items() if layout.get(k) != v)
        # The stream's rows depend on the layout: continuing at the same batch count would repeat or skip rows.
        self.first_pass, self.consumed = self._pass_reached(state) + 1, 0
        rank_zero_warn(f"the cached activation stream's layout changed ({changed}): starting a new pass over the cache")

    @staticmethod
    def _pass_reached(state: dict) -> int:
        """The pass that rank 0 of the run that saved ``state`` was in."""
        layout = state["layout"]
        rows, epoch = state["batches"] * layout["batch_size"], state["first_pass"]
        num_blocks = -(-layout["train_rows"] // layout["block_rows"])
        while True:
            blocks = pass_blocks(layout["seed"], epoch, num_blocks, 0, layout["world_size"])
            starts, stops = block_ranges(blocks, layout["block_rows"], layout["train_rows"])
            if rows < int((stops - starts).sum()):
                return epoch
            rows -= int((stops - starts).sum())
            epoch += 1


def _pinned(batch: Tensor | dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
    """The batch in page-locked memory, so Lightning's ``non_blocking`` copy to the GPU runs asynchronously."""
    if isinstance(batch, dict):
        return {site: rows.pin_memory() for site, rows in batch.items()}
    return batch.pin_memory()
