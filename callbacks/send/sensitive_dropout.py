"""SensitiveNeuronDropout: SEND's schedule of identifying and dropping the most sensitive hidden units.

After every epoch the tracking set (``datamodule.tracking_dataloader()``, never trained on) is embedded from the
penultimate layer (``neurolight.lightning_modules.send.module.sentence_embeddings``); the embeddings of all epochs,
plus one of
the model before training, form a (T, N, d) history. At each identification the top ``sensitivity_threshold``
fraction of the d residual dimensions by ``sensitivity_scores`` are dropped for the next ``drop_epochs`` epochs
(``drop_schedule``). Needs a LightningModule whose ``model`` attribute is a Hugging Face causal LM
(``SendModule``) and a datamodule with ``tracking_dataloader()`` (``QADataModule``).
"""

from __future__ import annotations

from typing import NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from neurolight.datamodules.llm import zero
from neurolight.datamodules.llm.hooked import StopForward
from neurolight.datamodules.llm.padding import pad_right
from neurolight.lightning_modules.send.module import (
    decoder_layers,
    penultimate_layer,
    select_sensitive,
    sensitivity_scores,
    sentence_embeddings,
)

DROP_MODES = ("weights", "activations")


class DropPhase(NamedTuple):
    """Where an epoch stands in the SEND cycle (see ``drop_schedule``)."""

    drop: bool
    """The epoch trains with the sensitive neurons dropped."""
    identify: bool
    """At the end of the epoch the sensitive neurons are identified, for the window that starts next epoch."""


def drop_schedule(epoch: int, identify_every_n_epochs: int = 2, drop_epochs: int = 3) -> DropPhase:
    """SEND's schedule as a pure function of the (0-based, Lightning's ``current_epoch``) epoch.

    "Identify every ``identify_every_n_epochs`` epochs, drop for the next ``drop_epochs``, repeat" is a cycle of
    ``identify_every_n_epochs + drop_epochs`` epochs: ``identify_every_n_epochs`` epochs train the whole model, at the
    end of the last of them the sensitive neurons are identified, and the following ``drop_epochs`` epochs train with
    them dropped. Windows never overlap, and each one drops the neurons identified right before it. With the defaults
    (2, 3), counting epochs from 1: identify after epoch 2, drop in epochs 3-5, identify after epoch 7, drop in
    8-10, ...; so a 4-epoch run drops in epochs 3 and 4 (docs/send.md, Schedule).

    Returns:
        ``DropPhase(drop, identify)`` for ``epoch``.
    """
    if identify_every_n_epochs < 1 or drop_epochs < 1:
        raise ValueError(
            f"identify_every_n_epochs={identify_every_n_epochs} and drop_epochs={drop_epochs} must both be >= 1"
        )
    if epoch < 0:
        raise ValueError(f"epoch={epoch} must be >= 0")
    position = epoch % (identify_every_n_epochs + drop_epochs)
    return DropPhase(drop=position >= identify_every_n_epochs, identify=position == identify_every_n_epochs - 1)


def _frozen_prefix(model: nn.Module) -> int:
    """k: how many leading decoder layers, below the penultimate one, compute a fixed function of the input ids
    (they, the embeddings and every other parameter of the decoder but its final norm are frozen)."""
    decoder, layers = model.get_decoder(), decoder_layers(model)
    in_layers = {id(p) for p in layers.parameters()} | {
        id(p) for p in getattr(decoder, "norm", nn.Module()).parameters()
    }
    if any(p.requires_grad for p in decoder.parameters() if id(p) not in in_layers):
        return 0
    k = 0
    while k < len(layers) - 2 and not any(p.requires_grad for p in layers[k].parameters()):
        k += 1
    return k


class SensitiveNeuronDropout(pl.Callback):
    def __init__(
        self,
        sensitivity_threshold: float = 0.3,
        identify_every_n_epochs: int = 2,
        drop_epochs: int = 3,
        num_checkpoints: int = 3,
        drop_mode: str = "weights",
        track_initial: bool = True,
        log_eigenscore: bool = True,
        eigenscore_alpha: float = 1e-3,
    ) -> None:
        """
        Args:
            sensitivity_threshold: Fraction of the penultimate layer's d residual dimensions dropped: the most
                sensitive ``round(threshold * d)``; strictly between 0 and 1 (paper: 0.2 for Pythia-1B, 0.3 for
                Llama-3.1-8B).
            identify_every_n_epochs: Epochs of full training before each identification (see ``drop_schedule``).
            drop_epochs: Epochs each drop window lasts.
            num_checkpoints: C: the sensitivity sums the net changes of the tracking embeddings over the last C
                checkpoints (paper: 3).
            drop_mode: ``weights``: the rows of the penultimate layer's ``self_attn.o_proj`` and ``mlp.down_proj``
                weights (and biases) that write the dropped dimensions are zeroed at the start of the window and
                held at zero through it (their gradients and Adam moments masked, re-zeroed after every step);
                afterwards they train again from zero. ``activations``: those dimensions of the penultimate layer's
                output are zeroed in training forward passes (a forward hook, removed when the window ends). See
                docs/send.md, Drop modes.
            track_initial: Also embed the tracking set before the first epoch, so the first identification
                compares ``identify_every_n_epochs + 1`` checkpoints instead of ``identify_every_n_epochs``.
            log_eigenscore: Log the EigenScore and efficient EigenScore of the (N_tracking, d) tracking embeddings
                every epoch (``send/tracking_eigenscore``, ``send/tracking_ees``; not the per-question
                ``answer_eigenscore`` of K sampled answers), and ``send/tracking_ees_estimated``: 1 where EES ran its
                estimate, 0 where the exact score was cheaper (tracking sets below ~800 on their smaller side).
            eigenscore_alpha: The alpha of EigenScore's log(lambda + alpha).
        """
        if not 0 < sensitivity_threshold < 1:
            raise ValueError(
                f"sensitivity_threshold={sensitivity_threshold} must lie strictly between 0 and 1 (0.3 = top 30%)"
            )
        if drop_mode not in DROP_MODES:
            raise ValueError(f"unknown drop_mode '{drop_mode}'; choose one of {', '.join(DROP_MODES)}")
        drop_schedule(0, identify_every_n_epochs, drop_epochs)  # validates both
        if num_checkpoints < 1:
            raise ValueError(f"num_checkpoints must be >= 1, got {num_checkpoints}")
        self.hparams = {
            "sensitivity_threshold": sensitivity_threshold,
            "identify_every_n_epochs": identify_every_n_epochs,
            "drop_epochs": drop_epochs,
            "num_checkpoints": num_checkpoints,
            "drop_mode": drop_mode,
            "track_initial": track_initial,
            "log_eigenscore": log_eigenscore,
            "eigenscore_alpha": eigenscore_alpha,
        }
        self.threshold = sensitivity_threshold
        self.identify_every_n_epochs = identify_every_n_epochs
        self.drop_epochs = drop_epochs
        self.num_checkpoints = num_checkpoints
        self.drop_mode = drop_mode
        self.track_initial = track_initial
        self.log_eigenscore = log_eigenscore
        self.alpha = eigenscore_alpha
        self.history: Tensor | None = None
        """(T, N, d) float32 on CPU: the tracking embeddings of every checkpoint, oldest first."""
        self.history_epochs: list[int] = []
        """The epoch after which each checkpoint of ``history`` was taken (-1: before training)."""
        self.sensitive: Tensor | None = None
        """int64 indices of the dimensions identified last (dropped in the current or the next window)."""
        self.selections: list[dict] = []
        """Every identification: the epoch it followed and the indices chosen."""
        self._hook = None
        self._holding = False
        # (k, per live layer k..L-2: its (args, kwargs) for every tracking batch); see tracking_embeddings
        self._prefix_cache: tuple[int, list[list[tuple]]] | None = None

    @property
    def state_key(self) -> str:
        return f"SensitiveNeuronDropout[{self.drop_mode}]"

    def schedule(self, epoch: int) -> DropPhase:
        return drop_schedule(epoch, self.identify_every_n_epochs, self.drop_epochs)

    # ------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if not callable(getattr(trainer.datamodule, "tracking_dataloader", None)):
            raise ValueError("SensitiveNeuronDropout needs a datamodule with tracking_dataloader() (QADataModule)")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._prefix_cache = None  # the frozen layers of this fit may differ from the last one's
        layer = penultimate_layer(pl_module.model)
        if self.drop_mode == "weights":
            self._writer_params(pl_module)  # fails early on an architecture without o_proj / down_proj
            if not any(p.requires_grad for p in layer.parameters()):
                raise ValueError(
                    "the penultimate decoder layer is frozen, so weights dropped there could never train again; "
                    "lower model.init_args.freeze_layers below num_layers - 1, or use drop_mode: activations"
                )

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        last = self.history_epochs[-1] if self.history_epochs else None
        if last is None and epoch == 0 and self.track_initial:
            self._record(trainer, pl_module, -1)
        elif epoch > 0 and (last is None or last < epoch - 1):
            # Resumed from a checkpoint written before this callback's end-of-epoch work (a checkpoint saved at
            # validation end): the weights are those at the end of epoch - 1, so doing that work now is exact.
            if last is None or last < epoch - 2:
                rank_zero_warn(f"SensitiveNeuronDropout has no tracking embeddings for epochs before {epoch - 1}")
            self._end_of_epoch(trainer, pl_module, epoch - 1)
        if self.schedule(epoch).drop and self.sensitive is not None:
            self._start_dropping(trainer, pl_module)
        else:
            self._stop_dropping()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        if not self.history_epochs or self.history_epochs[-1] < epoch:
            self._end_of_epoch(trainer, pl_module, epoch)
        if not self.schedule(epoch + 1).drop:
            self._stop_dropping()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._holding:
            rows = self.sensitive
            for param in self._writer_params(pl_module):
                zero.update_grad(param, lambda g, _w: g.index_fill(0, rows.to(g.device), 0))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._holding:  # after the optimizer step: nothing regrows, whatever the optimizer does
            self._zero_rows(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop_dropping()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._stop_dropping()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._stop_dropping()
        self._prefix_cache = None

    # --------------------------------------------------------------------------------------- tracking
    @torch.no_grad()
    def tracking_embeddings(self, trainer, pl_module) -> Tensor:
        """(N_tracking, d) float32 CPU embeddings of the tracking set, rank 0's on every rank.

        The forward stops after the penultimate layer. When the embeddings and the first k decoder layers are
        frozen, their output for the tracking set cannot change: the first pass of a fit keeps the input of layer k
        (on the model's device) and later passes run only layers k..L-2 from it.
        """
        model = pl_module.model
        layers = decoder_layers(model)
        layer = layers[-2]
        # Under ZeRO-3 every module must run (parameters are fetched in a fixed order); elsewhere stop early.
        zero3 = any(zero.zero_stage(p) == 3 for p in layer.parameters())
        first_live = 0 if zero3 else _frozen_prefix(model)
        captured: list[Tensor] = []

        def capture(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            if not zero3:  # the penultimate layer ran: the last layer and the LM head are not needed
                raise StopForward

        loader = trainer.datamodule.tracking_dataloader()
        sequences = [ids[mask.bool()] for b in loader for ids, mask in zip(b["input_ids"], b["attention_mask"])]
        # Batches of similar lengths waste less compute on padding; rows go back to the loader's order below.
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
        chunks = [order[i : i + (loader.batch_size or 8)] for i in range(0, len(order), loader.batch_size or 8)]
        live_layers = layers[first_live:-1]  # first_live .. L-2
        cache = self._prefix_cache
        if cache is not None and (cache[0] != first_live or len(cache[1][0]) != len(chunks)):
            self._prefix_cache = None
        inputs: dict[int, list] = {}  # per live layer: its (args, kwargs) of every chunk, when the cache is built

        def keep_inputs(index: int):
            return lambda module, args, kwargs: inputs.setdefault(index, []).append((args, kwargs))

        parts = []
        was_training = model.training
        model.eval()
        handles = [layer.register_forward_hook(capture)]
        if first_live > 0 and self._prefix_cache is None:
            for index, live in enumerate(live_layers):
                handles.append(live.register_forward_pre_hook(keep_inputs(index), with_kwargs=True))
        try:
            for index, chunk in enumerate(chunks):
                # Pad id 0: padded positions are masked, and causal attention never lets a real token see a later pad.
                input_ids, attention_mask = pad_right([sequences[i] for i in chunk], 0, pl_module.device)
                captured.clear()
                with trainer.precision_plugin.forward_context():
                    try:
                        if self._prefix_cache is not None:
                            # Layer k's input, then each live layer with the other arguments the model gave it.
                            hidden = None
                            for live, calls in zip(live_layers, self._prefix_cache[1]):
                                args, kwargs = calls[index]
                                if hidden is None:
                                    hidden = args[0] if args else kwargs["hidden_states"]
                                kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                                hidden = live(hidden, *args[1:], **kwargs)
                                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
                        else:
                            model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                    except StopForward:
                        pass
                parts.append(sentence_embeddings(captured[0], attention_mask).cpu())
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        if inputs:
            self._prefix_cache = (first_live, [inputs[i] for i in range(len(live_layers))])
        embeddings = torch.empty(len(order), parts[0].shape[1])
        embeddings[order] = torch.cat(parts)
        # Ranks hold the same weights and tracking set; rank 0's copy makes their choices identical bit for bit.
        return trainer.strategy.broadcast(embeddings, src=0)

    def _record(self, trainer, pl_module, epoch: int) -> Tensor:
        embeddings = self.tracking_embeddings(trainer, pl_module)
        if self.history is not None and self.history.shape[1:] != embeddings.shape:
            raise RuntimeError(
                f"tracking embeddings changed shape from {tuple(self.history.shape[1:])} to {tuple(embeddings.shape)};"
                " the tracking set must stay the same through training (and a resumed run)"
            )
        new = embeddings.unsqueeze(0)
        self.history = new if self.history is None else torch.cat([self.history, new])
        self.history_epochs.append(epoch)
        return embeddings

    def sensitivity_history(self) -> Tensor:
        """The checkpoints the sensitivity compares: those recorded since the first epoch of the latest drop
        window (all of them before any window). Zeroing the writer rows at a window's start moves the dropped
        dimensions by what the penultimate layer wrote there (hundreds in a massive-activation dimension): that is
        the intervention, not training (docs/send.md, Sensitivity across drop windows)."""
        drop = [e >= 0 and self.schedule(e).drop for e in self.history_epochs]
        starts = [i for i in range(len(drop)) if drop[i] and (i == 0 or not drop[i - 1])]
        return self.history[starts[-1] :] if starts else self.history

    def _end_of_epoch(self, trainer, pl_module, epoch: int) -> None:
        embeddings = self._record(trainer, pl_module, epoch)
        dropped = len(self.sensitive) if self.schedule(epoch).drop and self.sensitive is not None else 0
        metrics = {"send/dropped_neurons": float(dropped)}
        if self.log_eigenscore:
            from neurolight.lightning_modules.send.eigenscore import efficient_eigenscore, eigenscore

            metrics["send/tracking_eigenscore"] = float(eigenscore(embeddings, alpha=self.alpha))
            ees = efficient_eigenscore(embeddings, alpha=self.alpha, seed=0, return_info=True)
            metrics["send/tracking_ees"] = float(ees.score)
            # Which path ran: small tracking sets (below ~800 on the smaller side) get the exact score.
            metrics["send/tracking_ees_estimated"] = float(ees.method != "exact")
        history = self.sensitivity_history()
        if len(history) >= 2:
            scores = sensitivity_scores(history, self.num_checkpoints)
            k = max(1, round(self.threshold * len(scores)))
            metrics["send/sensitivity_mean"] = float(scores.mean())
            metrics["send/sensitivity_max"] = float(scores.max())
            metrics["send/sensitivity_cutoff"] = float(torch.topk(scores, k).values[-1])
            if self.schedule(epoch).identify:
                chosen = select_sensitive(scores, self.threshold)
                if self.sensitive is not None:
                    overlap = len(set(chosen.tolist()) & set(self.sensitive.tolist())) / len(chosen)
                    metrics["send/overlap_with_previous"] = overlap
                self.sensitive = chosen
                self.selections.append({"epoch": epoch, "indices": chosen.tolist()})
                again = metrics.get("send/overlap_with_previous")
                again = "" if again is None else f" ({again:.0%} of them chosen before as well)"
                rank_zero_info(f"SEND: after epoch {epoch}, {len(chosen)} of {len(scores)} neurons chosen as the "
                               f"sensitive ones to drop{again}")  # fmt: skip
        elif self.schedule(epoch).identify:
            rank_zero_warn(
                f"SensitiveNeuronDropout: only one tracking checkpoint after epoch {epoch}; nothing identified, "
                "no neurons dropped in the next window (set track_initial: true)"
            )
        # Equal on every rank (the embeddings are rank 0's); syncing them costs nothing and keeps Lightning quiet.
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    # ---------------------------------------------------------------------------------------- dropping
    def _writer_params(self, pl_module) -> list[nn.Parameter]:
        """Parameters of the penultimate layer whose output rows write the residual stream."""
        layer = penultimate_layer(pl_module.model)
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        writers = [getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None)]
        if any(not isinstance(w, nn.Linear) for w in writers):
            raise ValueError(
                f"drop_mode 'weights' needs self_attn.o_proj and mlp.down_proj in the penultimate layer "
                f"({type(layer).__name__} has other names); use drop_mode: activations"
            )
        return [p for w in writers for p in (w.weight, w.bias) if p is not None]

    def _zero_rows(self, pl_module) -> None:
        rows = self.sensitive
        for param in self._writer_params(pl_module):
            if zero.zero_stage(param):  # ZeRO: the fp32 master copy too
                zero.update_param(param, lambda w: w.index_fill(0, rows.to(w.device), 0))
            else:
                with torch.no_grad():
                    param.index_fill_(0, rows.to(param.device), 0)

    def _start_dropping(self, trainer, pl_module) -> None:
        if self.drop_mode == "activations":
            if self._hook is None:
                self._hook = penultimate_layer(pl_module.model).register_forward_hook(self._drop_activations)
            return
        if not self._holding:
            self._zero_rows(pl_module)
            for param in self._writer_params(pl_module):  # stale momentum would push them off zero
                zero.zero_adam_rows(trainer.optimizers[0], param, self.sensitive)
            self._holding = True

    def _drop_activations(self, module, args, output):
        if not module.training:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.index_fill(-1, self.sensitive.to(hidden.device), 0)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _stop_dropping(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._holding = False

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "history": self.history,
            "history_epochs": list(self.history_epochs),
            "sensitive": self.sensitive,
            "selections": [dict(s) for s in self.selections],
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"]
        self.history_epochs = list(state["history_epochs"])
        self.sensitive = state["sensitive"]
        self.selections = [dict(s) for s in state["selections"]]
