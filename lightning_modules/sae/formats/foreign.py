"""Metadata of SAEs in other libraries' formats: model names as they publish them, hook names mapped to
neurolight's sites, and the ``neurolight`` entry that neurolight adds to their configs so that a round trip keeps
everything (the libraries ignore keys they do not know)."""

from __future__ import annotations

from pathlib import Path

from neurolight.lightning_modules.sae.metadata import SaeMetadata


def published_model_name(name: str | None) -> str | None:
    """The Hugging Face id of a neurolight short name (what other tools load); other names as they are."""
    from neurolight.datamodules.llm.models import MODELS

    return MODELS.get(name, name) if name is not None else None


def local_model_name(name: str | None) -> str | None:
    """A published Hugging Face id back to neurolight's short name where it has one (the embedded default then
    loads offline)."""
    from neurolight.datamodules.llm.models import MODELS

    by_id = {hf_id: short for short, hf_id in MODELS.items()}
    return by_id.get(name, name) if name is not None else None


def neurolight_blob(config_metadata: dict) -> dict | None:
    """The ``neurolight`` entry a neurolight export wrote into the config, if this SAE came from one."""
    blob = (config_metadata or {}).get("neurolight")
    return blob if isinstance(blob, dict) and "architecture" in blob else None


def foreign_metadata(config_metadata: dict, cfg: dict, source_format: str, path: Path) -> SaeMetadata:
    """SaeMetadata of a foreign config: from neurolight's own entry when a neurolight export wrote it, else from
    the library's fields (model, hook name mapped to a site where it maps, context size, dataset)."""
    from neurolight.datamodules.llm.hook_names import site_of_hook_name

    blob = neurolight_blob(config_metadata)
    if blob is not None:
        metadata = SaeMetadata.from_dict(blob.get("metadata"))
    else:
        hook_name = config_metadata.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
        layer_type = layer_id = None
        if hook_name:
            try:
                layer_type, layer_id = site_of_hook_name(str(hook_name))
            except ValueError:
                pass  # kept as hook_name; a pipeline that needs the site says which forms map
        metadata = SaeMetadata(
            model_name=local_model_name(config_metadata.get("model_name") or cfg.get("model_name")),
            layer_type=layer_type,
            layer_id=layer_id,
            hook_name=hook_name,
            context_size=config_metadata.get("context_size") or cfg.get("context_size"),
            dataset=config_metadata.get("dataset_path") or cfg.get("dataset_path"),
        )
    metadata.source_format, metadata.source = source_format, str(path)
    return metadata
