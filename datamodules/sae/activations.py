"""ActivationDataModule: tokenized corpus -> frozen LLM -> mixing buffer -> SAE batches.

Training batches are (batch_size_autoencoder, d_in) raw activations (the SAE module applies its normalisation
scalar); validation batches are (batch, num_tokens) token ids, so the module can splice its reconstruction back
into the LLM (``hooked_llm_at(site)``) and measure the downstream loss. Given ``sites``, one forward pass reads them
all (stopped after the deepest) and training batches are ``{site: (batch_size_autoencoder, d_site)}``, the rows of
the same tokens, mixed together: what a sweep over sites trains on (docs/sae.md, Sweeps over sites).
"""

from __future__ import annotations

from collections import deque

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from neurolight.datamodules.llm.capture import SitesReader
from neurolight.datamodules.llm.hooked import HOOK_POINTS, HookedLLM
from neurolight.datamodules.sae.activation_buffer import ActivationBuffer
from neurolight.datamodules.sae.activation_cache import check_site_names, parse_site, site_name
from neurolight.datamodules.sae.held_out import HeldOutBatches, held_out_batches
from neurolight.datamodules.sae.tokenized_corpus import TokenizedCorpus


class _Stream(IterableDataset):
    """Endless placeholders; ``on_before_batch_transfer`` swaps each for a buffer batch when it is consumed."""

    def __iter__(self):
        while True:
            yield _PLACEHOLDER


# Lightning fetches one batch ahead; served at fetch time, the batch after the last step could trigger a whole
# buffer refill (LLM forwards) that is never trained on.
_PLACEHOLDER = torch.empty(0)


class ActivationDataModule(pl.LightningDataModule):
    def __init__(
        self,
        dataset_path: str,
        model_name: str = "smollm2-135m",
        layer_id: int = 15,
        layer_type: str = "mlp_activations",
        num_tokens: int = 64,
        batch_size_llm: int = 16,
        batch_size_autoencoder: int = 1024,
        num_batches_preload: int = 64,
        device_llm: str | None = None,
        llm_dtype: str = "float32",
        compile_llm: bool = False,
        llm_compile_mode: str | None = None,
        buffer_device: str | None = None,
        buffer_dtype: str = "float32",
        exclude_first_position: bool = True,
        mlp_activations_hookpoint: str = HOOK_POINTS["mlp_activations"],
        mlp_sublayer_hookpoint: str = HOOK_POINTS["mlp_sublayer"],
        attn_sublayer_hookpoint: str = HOOK_POINTS["attn_sublayer"],
        resid_pre_hookpoint: str = HOOK_POINTS["resid_pre"],
        resid_post_hookpoint: str = HOOK_POINTS["resid_post"],
        val_contexts: int = 64,
        val_batch_size: int = 8,
        checkpoint_buffer: bool = True,
        seed: int = 0,
        sites: list[str] | None = None,
    ) -> None:
        """
        Args:
            dataset_path: Directory written by ``neurolight-tokenize`` (the tokenized corpus).
            model_name: LLM whose activations are harvested: a short name (see ``neurolight.datamodules.MODELS``),
                a Hugging Face id, or a local directory.
            layer_id: Decoder layer to hook.
            layer_type: ``resid_pre`` (residual stream entering the layer), ``resid_post`` (leaving it),
                ``attn_sublayer`` (attention output), ``mlp_sublayer`` (MLP output) or ``mlp_activations``
                (input of the MLP down projection).
            num_tokens: Tokens per context fed to the LLM (the first ``num_tokens`` of each stored context).
            batch_size_llm: Contexts per LLM forward pass.
            batch_size_autoencoder: Activation vectors per SAE training batch.
            num_batches_preload: Buffer size in SAE batches; half of it is served between refills. Larger mixes
                better and costs ``num_batches_preload * batch_size_autoencoder * d_in`` values of memory.
            device_llm: Device of the LLM, e.g. ``cuda:1``; default: the trainer's device for this rank.
            llm_dtype: ``float32``, ``bfloat16`` or ``float16`` weights for the LLM.
            compile_llm: ``torch.compile`` the LLM forward up to the (deepest) site (``dynamic=False``: the shapes are
                fixed): on CUDA with CUDA graphs (the small forward is launch-bound there), on CPU with inductor, the
                weights frozen and the products that share an input merged (docs/sae.md, The forward on CPU; use it with
                ``llm_dtype: bfloat16`` on a CPU with AMX or AVX512-BF16). The first training and the first validation
                batch each pay the compilation (minutes for a 135M model on 2 cores); bench/forward_speed.py measures
                the gain on a machine.
            llm_compile_mode: ``torch.compile`` mode for ``compile_llm``; default ``reduce-overhead`` (CUDA graphs)
                on CUDA, inductor's default elsewhere; ``max-autotune-no-cudagraphs`` is the alternative without
                graphs.
            buffer_device: Device of the buffer; default: the LLM's device.
            buffer_dtype: Storage dtype of the buffer (``bfloat16`` halves its memory).
            exclude_first_position: Skip position 0 (BOS / attention sink), whose activations are huge outliers.
            mlp_activations_hookpoint: Module whose INPUT is the MLP activation (``{}`` = layer index).
            mlp_sublayer_hookpoint: Module whose output is the MLP sublayer output.
            attn_sublayer_hookpoint: Module whose output (element 0) is the attention sublayer output.
            resid_pre_hookpoint: Decoder layer whose INPUT is the residual stream entering it.
            resid_post_hookpoint: Decoder layer whose output is the residual stream leaving it.
            val_contexts: Contexts held out at the end of the corpus for validation (never trained on).
            val_batch_size: Contexts per validation batch.
            checkpoint_buffer: Save the buffer contents in checkpoints so a resumed run continues exactly;
                off saves memory and disk, and a resume then refills the buffer from the corpus position.
            seed: Seed of corpus order and buffer mixing.
            sites: Several sites to read in each forward pass instead of ``layer_type`` / ``layer_id``, named as
                ``neurolight-harvest`` names them (``[layers.15.mlp_sublayer, layers.10.resid_post]``); batches are
                then ``{site: activations}`` and each SAE names the site it reads (``SweepMember.site``). One forward
                reads them all, stopped after the deepest site (truncated, and compiled with ``compile_llm``).
        """
        super().__init__()
        self.save_hyperparameters()
        self.hook_points = {
            "mlp_activations": mlp_activations_hookpoint,
            "mlp_sublayer": mlp_sublayer_hookpoint,
            "attn_sublayer": attn_sublayer_hookpoint,
            "resid_pre": resid_pre_hookpoint,
            "resid_post": resid_post_hookpoint,
        }
        if sites is not None:
            check_site_names(sites)
            # The checkpoint then records no single site of the data module: each SAE records its own.
            self.hparams.update(layer_id=None, layer_type=None)
        self.hooked_llm: HookedLLM | None = None
        self.hooked_llms: dict[str, HookedLLM] = {}  # by site
        self.sites_reader: SitesReader | None = None  # the one forward of several sites
        self.buffer: ActivationBuffer | None = None
        self.corpus: TokenizedCorpus | None = None
        self._pass, self._position = 0, 0  # corpus pass and position within this rank's order
        self._order: Tensor | None = None
        self._served, self._consumed = 0, 0
        self._recent: deque[Tensor] = deque(maxlen=16)
        self._replay: deque[Tensor] = deque()

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        if self.hooked_llms:  # set up already (with several sites hooked_llm stays None)
            return
        from neurolight.datamodules.llm.models import dtype_from_name, load_causal_lm

        hp = self.hparams
        self.corpus = TokenizedCorpus(hp.dataset_path)
        if hp.num_tokens > self.corpus.context_length:
            raise ValueError(
                f"num_tokens={hp.num_tokens} exceeds the corpus context length {self.corpus.context_length} "
                f"({hp.dataset_path}); rebuild the corpus with a longer context_length or lower num_tokens"
            )
        min_train = hp.batch_size_llm
        if len(self.corpus) < hp.val_contexts + min_train:
            raise ValueError(
                f"corpus {hp.dataset_path} has {len(self.corpus)} contexts: too few for {hp.val_contexts} "
                f"validation contexts plus one LLM batch of {hp.batch_size_llm}"
            )
        device = torch.device(hp.device_llm) if hp.device_llm else self._trainer_device()
        model = load_causal_lm(hp.model_name, dtype=dtype_from_name(hp.llm_dtype, "llm_dtype"), device=device)
        self.corpus.validate(model.get_input_embeddings().num_embeddings)
        for site in self.site_names:
            layer_type, layer_id = parse_site(site)
            compile_site = hp.compile_llm and not hp.sites  # several sites: compiled once, all together, below
            hooked = HookedLLM(model, layer_type, layer_id, self.hook_points, compile_site, hp.llm_compile_mode)
            self.hooked_llms[site] = hooked
        self.hooked_llm = next(iter(self.hooked_llms.values())) if not hp.sites else None
        if hp.sites:
            sites = [(hooked.layer_type, hooked.layer_id) for hooked in self.hooked_llms.values()]
            hooks = [hooked.hook_point for hooked in self.hooked_llms.values()]
            self.sites_reader = SitesReader(model, sites, hooks, hp.compile_llm, hp.llm_compile_mode)
        self.buffer = ActivationBuffer(
            capacity=hp.num_batches_preload * hp.batch_size_autoencoder,
            batch_size=hp.batch_size_autoencoder,
            produce=self._produce,
            seed=hp.seed + 7919 * self._rank()[0],
            device=hp.buffer_device or device,
            dtype=dtype_from_name(hp.buffer_dtype, "buffer_dtype"),
        )

    def _trainer_device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    @property
    def site_names(self) -> list[str]:
        """The sites served: ``sites``, or the one of ``layer_type`` / ``layer_id``."""
        hp = self.hparams
        return list(hp.sites) if hp.sites else [site_name(hp.layer_type, hp.layer_id)]

    @property
    def site_widths(self) -> dict[str, int]:
        """The width (d_in) of each site served, in the order of ``site_names``."""
        return {site: hooked.d_in for site, hooked in self.hooked_llms.items()}

    @property
    def d_in(self) -> int:
        if len(self.hooked_llms) != 1:
            raise AttributeError(f"d_in: this data module serves {len(self.hooked_llms)} sites; see site_widths")
        return next(iter(self.hooked_llms.values())).d_in

    def hooked_llm_at(self, site: str | None = None) -> HookedLLM:
        """The LLM hooked at ``site`` (default: the only site), for validation's splicing."""
        if site is None and len(self.hooked_llms) == 1:
            return next(iter(self.hooked_llms.values()))
        if site not in self.hooked_llms:
            raise ValueError(f"this data module serves {', '.join(self.hooked_llms)}, not {site}")
        return self.hooked_llms[site]

    @property
    def num_train_contexts(self) -> int:
        return len(self.corpus) - self.hparams.val_contexts

    # ------------------------------------------------------------------------------------------ producing
    def _next_contexts(self) -> Tensor:
        """The next batch_size_llm training contexts of this rank; each pass over the corpus reshuffles."""
        rank, world = self._rank()
        picked: list[Tensor] = []
        need = self.hparams.batch_size_llm
        while need:
            if self._order is None:
                g = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self._pass)
                # DDP ranks read disjoint contexts of the same permutation.
                self._order = torch.randperm(self.num_train_contexts, generator=g)[rank::world]
            take = self._order[self._position : self._position + need]
            picked.append(take)
            self._position += len(take)
            need -= len(take)
            if self._position >= len(self._order):
                self._pass, self._position, self._order = self._pass + 1, 0, None
        ids = self.corpus.batch(torch.cat(picked).numpy())
        return ids[:, : self.hparams.num_tokens]

    def _produce(self) -> Tensor:
        """The next contexts' activations, (tokens, d_in); with several sites, their rows side by side."""
        contexts = self._next_contexts()
        if self.hooked_llm is not None:
            acts = self.hooked_llm.harvest(contexts)
        else:
            acts = torch.cat(self.sites_reader.read(contexts), -1)
        if self.hparams.exclude_first_position:
            acts = acts[:, 1:]
        return acts.reshape(-1, acts.shape[-1])

    def _next_train_batch(self) -> Tensor | dict[str, Tensor]:
        batch = self._replay.popleft() if self._replay else self.buffer.next_batch()
        self._served += 1
        self._recent.append(batch)
        return self._by_site(batch)

    def _by_site(self, rows: Tensor) -> Tensor | dict[str, Tensor]:
        """Buffer rows as a batch: the rows themselves for one site, ``{site: its columns}`` for several."""
        if self.hooked_llm is not None:
            return rows
        widths = self.site_widths
        return dict(zip(widths, rows.split(list(widths.values()), dim=-1)))

    def mean_activation_norm(self, site: str | None = None) -> float:
        """Mean L2 norm of the activations of ``site`` (default: the only one) in the (filled) buffer; these rows
        are still served afterwards."""
        rows = self.buffer.peek()
        if self.hooked_llm is None:
            self.hooked_llm_at(site)  # raises unless site is one of the sites
            rows = self._by_site(rows)[site]
        return rows.float().norm(dim=1).mean().item()

    # -------------------------------------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Stream(), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        # Map-style: under DDP Lightning's DistributedSampler splits these batches across ranks (held_out.py).
        contexts = self.corpus.batch(range(self.num_train_contexts, len(self.corpus)))[:, : self.hparams.num_tokens]
        ranges = held_out_batches(len(contexts), self.hparams.val_batch_size, self._rank()[1], "contexts")
        return DataLoader(HeldOutBatches(contexts, ranges), batch_size=None, shuffle=False)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            # Counting the consumed batches tells state_dict which are in flight (none since they are served here;
            # checkpoints of earlier versions can still hold some).
            self._consumed += 1
            if batch.numel() == 0:  # the placeholder (a precision plugin may have converted it: no identity test)
                batch = self._next_train_batch()
        return batch

    # ------------------------------------------------------------------------------------------ resuming
    def state_dict(self) -> dict:
        """Corpus position, buffer and in-flight batches of EVERY rank (collective under DDP: each rank mixes
        its own activations, and only rank 0 writes the checkpoint)."""
        in_flight = self._served - self._consumed
        recent = list(self._recent)
        local = {
            "pass": self._pass,
            "position": self._position,
            "in_flight": [b.cpu() for b in recent[len(recent) - in_flight :]] if in_flight > 0 else [],
            "buffer": None
            if self.buffer is None
            else self.buffer.state_dict(include_storage=self.hparams.checkpoint_buffer),
        }
        _, world = self._rank()
        ranks = [local]
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * world
            torch.distributed.all_gather_object(ranks, local)
        return {"world_size": len(ranks), "ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        rank, world = self._rank()
        if state["world_size"] != world:
            # Each rank's order is a slice of the pass permutation, so positions do not carry over to another
            # world size: start the next pass with empty buffers rather than repeat or skip data silently.
            rank_zero_warn(
                f"checkpoint was written by {state['world_size']} ranks, this run has {world}: the activation "
                "buffers start empty at the next pass over the corpus"
            )
            self._pass, self._position, self._order = max(r["pass"] for r in state["ranks"]) + 1, 0, None
            return
        local = state["ranks"][rank]
        self._pass, self._position, self._order = local["pass"], local["position"], None
        self._replay = deque(local["in_flight"])
        self._served = self._consumed = 0
        self._recent.clear()
        if local["buffer"] is not None:
            if self.buffer is None:
                raise RuntimeError("load_state_dict before setup: the buffer does not exist yet")
            self.buffer.load_state_dict(local["buffer"])
