"""Models that learn from the tensors the datamodules produce."""

from lightning_modules.llm import MODELS, load_causal_lm, load_tokenizer, resolve_model

__all__ = ["MODELS", "load_causal_lm", "load_tokenizer", "resolve_model"]
