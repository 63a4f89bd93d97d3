"""SaeMetadata: where an SAE reads its activations and how it was trained, whatever format it came from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class SaeMetadata:
    """What a pipeline needs to know about an SAE beyond its weights: the LLM site it encodes, and the data
    settings it was trained with. ``SparseAutoencoder.from_pretrained`` fills it from any format (docs/sae.md,
    Formats); a field the source does not record stays None."""

    model_name: str | None = None
    """The LLM: a neurolight short name (``smollm2-135m``), a Hugging Face id or a local directory."""
    layer_type: str | None = None
    """neurolight's site: ``resid_pre``, ``resid_post``, ``attn_sublayer``, ``mlp_sublayer``, ``mlp_activations``."""
    layer_id: int | None = None
    """Decoder layer of the site."""
    hook_name: str | None = None
    """The site as the source named it (``blocks.15.hook_mlp_out`` for SAELens); informational."""
    hook_points: dict[str, str] | None = None
    """Module-path template overrides of the training run (``{layer_type: template}``); None: the defaults."""
    context_size: int | None = None
    """Tokens per context in training."""
    exclude_first_position: bool | None = None
    """Whether training left out position 0 (BOS / attention sink); None: not recorded (pipelines then default to
    True, as a neurolight training run does)."""
    llm_dtype: str | None = None
    """dtype of the LLM in training (``float32``, ``bfloat16``)."""
    dataset: str | None = None
    """The training corpus (path or id)."""
    activation_scale: float = 1.0
    """The normalisation scalar of training, already folded into the weights (recorded, never applied again)."""
    training: dict = field(default_factory=dict)
    """Training hyperparameters the source recorded (``learning_rate`` ...), for naming and provenance."""
    source_format: str | None = None
    """``neurolight-checkpoint``, ``neurolight``, ``saelens`` or ``sparsify``."""
    source: str | None = None
    """Path the SAE was loaded from."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> SaeMetadata:
        """Fields of ``data`` this class knows (a newer writer's extra keys are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in (data or {}).items() if key in known})

    def site(self) -> str:
        """``mlp_sublayer l15`` (or the hook name, or ``unknown site``), for messages and titles."""
        if self.layer_type is not None and self.layer_id is not None:
            return f"{self.layer_type} l{self.layer_id}"
        return self.hook_name or "unknown site"
