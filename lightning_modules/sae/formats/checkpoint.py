"""A ``SparseAutoencoderModule`` checkpoint (``last.ckpt``, ``step_*.ckpt``), or one member of a
``SparseAutoencoderSweep``'s, read as an SAE: the weights with the normalisation scalar folded in, and the metadata
from the checkpoint's datamodule hyperparameters."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from neurolight.lightning_modules.sae.checkpoint_args import saved_decoder_lr_multipliers
from neurolight.lightning_modules.sae.formats.base import SaeFormat, fold_input_scale_
from neurolight.lightning_modules.sae.metadata import SaeMetadata

_SAE_CLASS = "SparseAutoencoderModule"
_SWEEP_CLASS = "SparseAutoencoderSweep"
_FIX = "pass the last.ckpt (or step_*.ckpt) that neurolight.callbacks.SaeCheckpoint wrote during `neurolight fit`"
# The datamodule's template arguments, ``mlp_sublayer_hookpoint`` -> ``mlp_sublayer``.
_HOOKPOINT_SUFFIX = "_hookpoint"


def load_sae_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict of a ``SparseAutoencoderModule`` (memory-mapped: only what is read is loaded), or a
    one-line error that says what ``path`` is instead."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(
            f"{path} is a directory, not a checkpoint file (a DeepSpeed checkpoint? merge it with "
            "lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict); " + _FIX
        )
    if not path.is_file():
        raise FileNotFoundError(f"the SAE checkpoint {path} does not exist; {_FIX}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # whatever torch raises, the file is not a checkpoint this can use
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a loadable PyTorch checkpoint ({reason}); {_FIX}") from error
    what = _describe_non_sae(checkpoint)
    if what is not None:
        raise ValueError(f"{path} is {what}, not a sparse autoencoder ({_SAE_CLASS}); {_FIX}")
    return checkpoint


def _describe_non_sae(checkpoint) -> str | None:
    if not isinstance(checkpoint, dict):
        return f"a pickled {type(checkpoint).__name__}"
    if "state_dict" not in checkpoint:
        keys = ", ".join(list(map(str, checkpoint))[:4])
        return f"a plain state dict or dict (keys {keys}, ...) rather than a Lightning checkpoint"
    hparams = checkpoint.get("hyper_parameters") or {}
    class_path = hparams.get("_class_path", "")
    state = checkpoint["state_dict"]
    is_sae = "sae.W_enc" in state and "activation_scale" in state and {"act_vec_size", "dict_vec_size"} <= set(hparams)
    if is_sae and (not class_path or class_path.endswith(_SAE_CLASS)):
        return None
    if "saes" in hparams and (not class_path or class_path.endswith(_SWEEP_CLASS)):
        return None
    if class_path:
        return f"a checkpoint of {class_path}"
    return f"a Lightning checkpoint of another module (weights {', '.join(list(state)[:3])}, ...)"


def _sweep_member(hparams: dict, path: Path, name: str | None) -> tuple[dict, str]:
    """The init arguments of sweep member ``name`` and the prefix of its weights in the state dict."""
    members = {member["name"]: member for member in hparams["saes"]}
    if name not in members:
        given = "no name was given" if name is None else f"it has no SAE named '{name}'"
        raise ValueError(
            f"{path} is a sweep of {len(members)} SAEs and {given}; name one of: {', '.join(members)} "
            "(--model.init_args.sae_name for sampling and validate, --name for neurolight-export, "
            "name= for SparseAutoencoder.from_pretrained)"
        )
    member = members[name]
    args = {
        "act_vec_size": hparams["act_vec_size"] if member.get("act_vec_size") is None else member["act_vec_size"],
        "dict_vec_size": member["dict_vec_size"],
        "architecture": member["architecture"],
        "learning_rate": hparams["learning_rate"] if member.get("learning_rate") is None else member["learning_rate"],
        "decoder_lr_multiplier": saved_decoder_lr_multipliers(hparams)[name],
        "site": member.get("site"),
    }
    return args, f"units.{name}."


@torch.no_grad()
def raw_space_sae(module):
    """A copy of a ``SparseAutoencoderModule``'s SAE that takes RAW activations (its normalisation scalar folded into
    the weights, as ``load`` does for a checkpoint of it), with the metadata its checkpoint would record."""
    import copy

    from neurolight.lightning_modules.sae.checkpoint_args import init_args_from_checkpoint

    scale = float(module.activation_scale)
    if scale != scale:  # NaN: estimated at the first training step
        raise ValueError(
            "this SparseAutoencoderModule has not trained a step yet, so it has no normalisation scalar to fold in; "
            "train it first (the scalar comes from the first batches), or build it with normalize_dataset=False"
        )
    datamodule = module._datamodule()
    data = dict(getattr(datamodule, "hparams", None) or {})
    sae = copy.deepcopy(module.sae).eval()
    sae.expects_scaled_input = False
    sae.metadata = checkpoint_metadata({"datamodule_hyper_parameters": data}, init_args_from_checkpoint(module.hparams))
    return _folded(sae, scale)


def _folded(sae, scale: float):
    """``sae``, trained on ``scale * x``, for raw ``x``: its rows would be ``1 / scale`` long in raw space, which free
    decoder norms cannot hold, so those are folded into unit rows first."""
    if scale != 1.0:
        sae = sae.with_unit_decoder()
    fold_input_scale_(sae, scale)
    return sae


def checkpoint_metadata(checkpoint: dict, init_args: dict) -> SaeMetadata:
    """The site, data settings and training hyperparameters a checkpoint records: the SAE's own ``site`` where it
    names one (a data module serving several sites), else the data module's."""
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    layer_type, layer_id = data.get("layer_type"), data.get("layer_id")
    if init_args.get("site"):
        from neurolight.datamodules.sae.activation_cache import parse_site

        layer_type, layer_id = parse_site(init_args["site"])
    overrides = {}
    for key, template in data.items():
        if key.endswith(_HOOKPOINT_SUFFIX) and template:
            overrides[key[: -len(_HOOKPOINT_SUFFIX)]] = template
    from neurolight.datamodules.llm.hooked import HOOK_POINTS

    overrides = {site: template for site, template in overrides.items() if HOOK_POINTS.get(site) != template}
    hook_name = None
    if layer_type is not None and layer_id is not None:
        hook_name = {**HOOK_POINTS, **overrides}.get(layer_type, "").format(layer_id) or None
    training = {
        key: init_args[key]
        for key in (
            "learning_rate",
            "decoder_lr_multiplier",
            "lr_warmup_steps",
            "dead_tokens_threshold",
            "normalize_dataset",
        )
        if key in init_args
    }
    return SaeMetadata(
        model_name=data.get("model_name"),
        layer_type=layer_type,
        layer_id=layer_id,
        hook_name=hook_name,
        hook_points=overrides or None,
        context_size=data.get("num_tokens"),
        exclude_first_position=data.get("exclude_first_position"),
        llm_dtype=data.get("llm_dtype"),
        dataset=data.get("dataset_path"),
        training=training,
    )


class CheckpointFormat(SaeFormat):
    name = "neurolight-checkpoint"
    files = "a neurolight checkpoint is a .ckpt file written by `neurolight fit`"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_file()

    @classmethod
    def load(cls, path: Path, name: str | None = None):
        from neurolight.lightning_modules.sae.checkpoint_args import init_args_from_checkpoint
        from neurolight.lightning_modules.sae.sparse_autoencoder import SparseAutoencoder

        checkpoint = load_sae_checkpoint(path)
        hparams, state = checkpoint["hyper_parameters"], checkpoint["state_dict"]
        if "saes" in hparams:
            args, prefix = _sweep_member(hparams, path, name)
        elif name is not None:
            raise ValueError(f"{path} holds one SAE, not a sweep; leave out the name ('{name}')")
        else:
            args, prefix = init_args_from_checkpoint(hparams), ""
        sae = SparseAutoencoder(int(args["act_vec_size"]), int(args["dict_vec_size"]), args.get("architecture", "relu"))
        weights = f"{prefix}sae."
        sae.load_state_dict({key[len(weights) :]: value for key, value in state.items() if key.startswith(weights)})
        scale = float(state[f"{prefix}activation_scale"])
        if scale != scale:  # NaN: estimated at the first training step, which this checkpoint never reached
            raise ValueError(f"{path} was saved before its first training step (no normalisation scalar yet); {_FIX}")
        sae.metadata = checkpoint_metadata(checkpoint, args)
        return _folded(sae, scale)

    @classmethod
    def cannot_hold(cls, sae) -> str | None:
        return "a .ckpt is written by `neurolight fit` only (it holds the optimiser state too)"

    @classmethod
    def save(cls, sae, directory: Path, firing_frequency: Tensor | None) -> list[Path]:
        raise ValueError(cls.cannot_hold(sae))
