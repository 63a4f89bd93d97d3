"""Models that learn from the tensors the datamodules produce."""

from lightning_modules.lazy_exports import lazy_exports

# Lazy, so that light users (the tokenizer's worker processes need only llm.py) do not import Lightning.
_EXPORTS = {
    "MODELS": "lightning_modules.llm",
    "load_causal_lm": "lightning_modules.llm",
    "load_tokenizer": "lightning_modules.llm",
    "resolve_model": "lightning_modules.llm",
    "SparseAutoencoder": "lightning_modules.sparse_autoencoder",
    "SparseAutoencoderModule": "lightning_modules.sae_module",
    "SendModule": "lightning_modules.send_module",
    "AnswerGenerator": "lightning_modules.answer_generator",
    "LatentInterpreter": "lightning_modules.interpreter",
    "LatentSampler": "lightning_modules.latent_sampler",
    "RunningLatentSamples": "lightning_modules.running_samples",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
