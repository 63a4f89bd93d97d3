"""Models that learn from the tensors the datamodules produce."""

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


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_modules' has no attribute '{name}'")
