"""The interface every SAE architecture implements, and the unit-norm decoder constraint they share.

An architecture is a small settings object: its ``__init__`` arguments are its settings (each stored under its own
name, each documented, so the CLI shows them), and a handful of methods tell ``SparseAutoencoder`` what it does
differently from the others (docs/sae.md, Architectures). It holds no tensors of its own: the per-latent tensors it
needs are registered on the SAE (``tensors``), so checkpoints keep the keys ``sae.log_threshold``, ``sae.threshold``.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from neurolight.lightning_modules.sae.sparse_autoencoder import SparseAutoencoder

UNIT_NORM_EPS = 1e-12
"""Floor of a decoder row's norm when it is divided by it (a zero row stays zero instead of turning NaN)."""


def unit_norm_rows(weight: Tensor) -> Tensor:
    """``weight`` (d_sae, d_in) with every row scaled to unit norm: the decoder constraint of Towards
    Monosemanticity, applied after each optimizer step and to resampled directions."""
    return weight / weight.norm(dim=1, keepdim=True).clamp_min(UNIT_NORM_EPS)


def remove_parallel_component(grad: Tensor, weight: Tensor) -> Tensor:
    """``grad`` without the component of each row along the same row of ``weight`` (Towards Monosemanticity: before
    the step, so that the step does not spend itself on a norm the renormalisation would undo)."""
    direction = unit_norm_rows(weight)
    return grad - (grad * direction).sum(1, keepdim=True) * direction


def unit_norm_rows_(weight: Tensor) -> Tensor:
    """``unit_norm_rows`` in place, returning ``weight``: no (d_sae, d_in) temporaries, which on CPU cost more than
    the arithmetic (the decoder constraint after every step)."""
    return weight.div_(weight.norm(dim=1, keepdim=True).clamp_min(UNIT_NORM_EPS))


_DOT_ROWS = 256


def remove_parallel_component_(grad: Tensor, weight: Tensor) -> Tensor:
    """``remove_parallel_component`` in place, returning ``grad``: (g . d) d with d = w / |w| is (g . w) w / |w|^2,
    so the unit directions need not be formed."""
    # The row dot products in blocks of rows: over the whole matrix, the (d_sae, d_in) product's temporary made the
    # dots take 1.6 of the TopK step's 22 ms on one CPU thread; a block's stays in cache.
    dots = torch.cat([torch.linalg.vecdot(g, w) for g, w in zip(grad.split(_DOT_ROWS), weight.split(_DOT_ROWS))])
    scale = dots / weight.norm(dim=1).clamp_min(UNIT_NORM_EPS).square()
    return grad.addcmul_(weight, scale.unsqueeze(1), value=-1)


class ResampleReset(NamedTuple):
    """A tensor of the SAE, besides the encoder and decoder, that dead-latent resampling must set."""

    name: str
    """Attribute of the SparseAutoencoder: a parameter or buffer the architecture registered through ``tensors``."""
    value: float
    """The value written: to the dead latents' entries of a (d_sae, ...) tensor, to the whole of a scalar one.
    A parameter's Adam moments are zeroed where it is written."""


class Architecture(ABC):
    """Activation, losses and constraints of one SAE architecture; a subclass's init arguments are its settings.

    Subclasses set ``sparsity_setting`` (the init argument that controls L0) and ``raise_for_sparsity`` (whether
    raising or lowering it makes the SAE sparser), store every init argument under its own name (``settings`` reads them
    back), implement ``activation``, and override the other methods where they differ from the defaults: no
    threshold at inference, dense decoding, no sparsity or auxiliary loss, nothing to reset on resampling.
    """

    sparsity_setting: ClassVar[str]
    """Name of the init argument that controls L0, named by the warning of a dense SAE."""
    raise_for_sparsity: ClassVar[bool] = True
    """Whether raising ``sparsity_setting`` lowers L0 (a coefficient) or lowering it does (k)."""
    sparsity_note: ClassVar[str] = ""
    """What else the warning of a dense SAE should say about this architecture's sparsity."""
    normalize_decoder: bool = True
    """The decoder constraint: rows of W_dec kept at unit norm (gradient projected before each step, rows
    renormalised after it)."""
    decoder_init_norm: float | None = None
    """None: the decoder constraint above. A norm: decoder rows are free, start at this norm, and the latents are
    selected on and scaled by them, as SAELens's ``rescale_acts_by_decoder_norm`` (docs/sae.md, Free decoder norms)."""

    # ------------------------------------------------------------------------------------------------ settings
    @classmethod
    def setting_names(cls) -> list[str]:
        """The init arguments, in order."""
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    def settings(self) -> dict:
        """The init arguments and their values (what a checkpoint's hyperparameters record)."""
        return {name: getattr(self, name) for name in self.setting_names()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.settings() == self.settings()

    def check(self, d_in: int, d_sae: int) -> None:
        """Raise a ValueError naming the setting when the settings do not fit an SAE of these sizes."""
        return None

    def default_decoder_lr_multiplier(self) -> float:
        """The decoder weight's learning rate as a multiple of the others' when the module sets none; 1 by default
        (docs/sae.md, Decoder learning rate)."""
        return 1.0

    # ---------------------------------------------------------------------------------------------------- init
    def tied_encoder_scale(self, sae: SparseAutoencoder) -> float:
        """The multiple of the unit-norm decoder that the encoder starts from (tied initialisation); 1 by default."""
        return 1.0

    # ------------------------------------------------------------------------------------------------- tensors
    def tensors(self, d_in: int, d_sae: int) -> dict[str, Tensor]:
        """Extra tensors the SAE registers under these names: ``nn.Parameter``s are trained, plain tensors are
        buffers (moved and checkpointed with the module)."""
        return {}

    # -------------------------------------------------------------------------------------------------- encode
    @abstractmethod
    def activation(self, sae: SparseAutoencoder, pre_acts: Tensor, update: bool) -> Tensor:
        """Latents (batch, d_sae) of ``pre_acts`` (batch, d_sae) by the training rule (at inference too, where
        ``inference_threshold`` is None). ``update`` is True in a training forward: running estimates may move."""

    def inference_threshold(self, sae: SparseAutoencoder) -> Tensor | None:
        """Threshold, (d_sae,) or scalar, above which latents keep their pre-activation at inference; None where
        inference uses the training rule."""
        return None

    def encode_decode(self, sae: SparseAutoencoder, x: Tensor, pre_acts: Tensor, update: bool) -> tuple[Tensor, Tensor]:
        """``(latents, x_hat)`` of a forward pass on ``x`` (batch, d_in) with pre-activations ``pre_acts``; override
        to encode or decode faster where the latents' structure allows (``sparse_encoder.gather_pre_acts``)."""
        latents = sae.activate(pre_acts, update)
        return latents, sae.decode(latents)

    # -------------------------------------------------------------------------------------------------- losses
    def reconstruction_loss(self, sae: SparseAutoencoder, x: Tensor, latents: Tensor, mse: Tensor) -> Tensor:
        """The reconstruction term of the loss; ``mse`` is the full reconstruction's squared error."""
        return mse

    def sparsity_loss(self, sae: SparseAutoencoder, pre_acts: Tensor, latents: Tensor) -> Tensor:
        """The sparsity penalty, coefficient included (0 where the activation itself sets L0)."""
        return pre_acts.new_zeros(())

    def aux_loss(self, sae: SparseAutoencoder, x: Tensor, x_hat: Tensor, pre_acts: Tensor, dead: Tensor) -> Tensor:
        """An auxiliary loss on the latents marked in ``dead`` (d_sae,) bool, coefficient included; 0 by default."""
        return pre_acts.new_zeros(())

    # ---------------------------------------------------------------------------------------------- resampling
    def resample_resets(self) -> list[ResampleReset]:
        """What dead-latent resampling must set besides the encoder, decoder and encoder bias."""
        return []
