"""The LLM site a loaded SAE reads: its metadata, overridden where the user says, and the frozen LLM hooked there.
Shared by everything that runs a pretrained SAE on a corpus (the latent sampler, the SAE evaluator)."""

from __future__ import annotations

import torch

from neurolight.datamodules.llm.hooked import HOOK_POINTS, HookedLLM
from neurolight.lightning_modules.sae.metadata import SaeMetadata


def resolve_site(
    metadata: SaeMetadata,
    source: str,
    model_name: str | None = None,
    layer_type: str | None = None,
    layer_id: int | None = None,
    llm_dtype: str | None = None,
    exclude_first_position: bool | None = None,
    hook_points: dict[str, str | None] | None = None,
) -> dict:
    """The settings of the LLM site: each argument given overrides the SAE's metadata. ``exclude_first_position``
    defaults to the metadata's, and to True where the source does not record it (as a neurolight training run).
    Raises, naming the arguments to pass, where neither gives the model or the site."""
    trained_first = metadata.exclude_first_position
    settings = {
        "model_name": model_name or metadata.model_name,
        "layer_id": layer_id if layer_id is not None else metadata.layer_id,
        "layer_type": layer_type or metadata.layer_type,
        "llm_dtype": llm_dtype or metadata.llm_dtype or "float32",
        "exclude_first_position": bool(
            (True if trained_first is None else trained_first)
            if exclude_first_position is None
            else exclude_first_position
        ),
    }
    missing = [name for name in ("model_name", "layer_id", "layer_type") if settings[name] is None]
    if missing:
        if metadata.hook_name and "layer_type" in missing:
            from neurolight.datamodules.llm.hook_names import site_of_hook_name

            site_of_hook_name(metadata.hook_name)  # raises with the accepted forms
        raise ValueError(
            f"the SAE {source} ({metadata.source_format}) does not record its {' and '.join(missing)}; pass "
            f"{', '.join(f'model.init_args.{name}' for name in missing)}"
        )
    trained, given = metadata.hook_points or {}, {k: v for k, v in (hook_points or {}).items() if v}
    settings["hook_points"] = {
        site: given.get(site) or trained.get(site) or default for site, default in HOOK_POINTS.items()
    }
    return settings


def load_site_llm(settings: dict, device: torch.device, d_in: int, source: str) -> HookedLLM:
    """The frozen LLM of ``settings`` hooked at its site, checked against the SAE's width."""
    from neurolight.datamodules.llm.models import dtype_from_name, load_causal_lm

    model = load_causal_lm(
        settings["model_name"], dtype=dtype_from_name(settings["llm_dtype"], "llm_dtype"), device=device
    )
    hooked = HookedLLM(model, settings["layer_type"], settings["layer_id"], settings["hook_points"])
    if hooked.d_in != d_in:
        raise ValueError(
            f"the hook point '{hooked.hook_point.name}' of {settings['model_name']} gives d_in={hooked.d_in}, but the "
            f"SAE in {source} expects {d_in}; pass the model_name / layer_type / layer_id the SAE was trained on"
        )
    return hooked
