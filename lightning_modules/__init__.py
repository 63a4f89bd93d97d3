"""Models that learn from the tensors the datamodules produce."""

from lightning_modules.llm import MODELS, load_causal_lm, load_tokenizer, resolve_model
from lightning_modules.sae_module import SparseAutoencoderModule
from lightning_modules.sparse_autoencoder import SparseAutoencoder

__all__ = [
    "MODELS",
    "SparseAutoencoder",
    "SparseAutoencoderModule",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_model",
]
