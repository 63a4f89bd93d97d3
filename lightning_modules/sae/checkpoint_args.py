"""What a ``SparseAutoencoderModule`` (or a sweep's member) takes from a checkpoint's hyperparameters: its init
arguments, earlier versions' checkpoints translated, and, on resuming, the decoder learning-rate multiplier its
optimizer state was written with."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_warn

# Hyperparameters that checkpoints written before architectures were objects hold beside ``architecture`` (a name).
_LEGACY_SETTINGS = ("k", "l1_coefficient", "auxk_coefficient", "k_aux")


def init_args_from_checkpoint(hyperparameters: dict) -> dict:
    """The ``SparseAutoencoderModule`` init arguments of a checkpoint's hyperparameters (Lightning's private ``_``
    keys left out). A checkpoint written before architectures were objects names its architecture (``"topk"``)
    with the settings beside it (``k``, ``l1_coefficient`` ...); those are moved into the architecture, JumpReLU's
    ``l1_coefficient`` becoming its ``l0_coefficient`` and its bandwidth and initial threshold the 1e-3 it was
    trained with."""
    args = {key: value for key, value in hyperparameters.items() if not key.startswith("_")}
    name = args.get("architecture", "relu")
    if not isinstance(name, str):
        return args
    settings = {key: args.pop(key) for key in _LEGACY_SETTINGS if key in args}
    if name == "relu":
        settings = {"l1_coefficient": settings.get("l1_coefficient", 1e-3)}
    elif name == "jumprelu":
        settings = {"l0_coefficient": settings.get("l1_coefficient", 1e-3), "bandwidth": 1e-3, "init_threshold": 1e-3}
    else:
        settings.pop("l1_coefficient", None)
    args["architecture"] = {"class_path": name, "init_args": settings}
    return args


def saved_decoder_lr_multipliers(hyperparameters: dict) -> dict[str, float]:
    """The ``decoder_lr_multiplier`` each SAE of a checkpoint trained with, by member name (``""``: a single SAE);
    1 where the checkpoint predates the setting."""
    default = hyperparameters.get("decoder_lr_multiplier", 1.0)
    if "saes" not in hyperparameters:
        return {"": default}
    members = hyperparameters["saes"]
    return {
        m["name"]: default if m.get("decoder_lr_multiplier") is None else m["decoder_lr_multiplier"] for m in members
    }


def resume_decoder_lr_multiplier(units: dict, checkpoint: dict, trainer) -> None:
    """Give each of ``units`` (SAE modules by member name, ``""`` for a single one) the multiplier the checkpoint
    trained it with, warning where the configured one differs: the optimizer state holds the parameter groups
    that multiplier made (one group at 1, two otherwise), and a resumed run continues the run it resumes
    (docs/sae.md, Decoder learning rate). Lightning restores the module before building the optimizer, except under a
    strategy that restores after setup (DeepSpeed): a difference is then an error naming the fix."""
    saved = saved_decoder_lr_multipliers(checkpoint.get("hyper_parameters", {}))
    after_setup = trainer is not None and getattr(trainer.strategy, "restore_checkpoint_after_setup", False)
    for name, unit in units.items():
        configured, trained = unit.hparams.decoder_lr_multiplier, saved.get(name, 1.0)
        if configured == trained:
            continue
        if trainer is not None:  # a fit resumes (load_from_checkpoint, with no trainer, resumes nothing: silent)
            where = f"{name}: " if name else ""
            default = " (the architecture's default)" if getattr(unit, "decoder_lr_from_default", False) else ""
            if after_setup:
                raise ValueError(
                    f"{where}the checkpoint was trained with decoder_lr_multiplier={trained}, the configuration sets "
                    f"{configured}{default}; its optimizer state holds the parameter groups of {trained}: resume "
                    f"with decoder_lr_multiplier: {trained}"
                )
            rank_zero_warn(
                f"{where}decoder_lr_multiplier={configured}{default} replaced by the checkpoint's {trained}: its "
                "optimizer state holds that multiplier's parameter groups, and a resumed run continues the run it "
                "resumes"
            )
        unit.hparams.decoder_lr_multiplier = trained
