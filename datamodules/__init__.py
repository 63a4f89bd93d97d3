"""Data that flows into the models: text -> tokens -> activations."""

# Lazy, so that the tokenizer's worker processes (which import datamodules.tokenized_corpus) do not pay for
# importing Lightning.
_EXPORTS = {
    "ActivationDataModule": "datamodules.activations",
    "CorpusContextDataModule": "datamodules.corpus_contexts",
    "InterpretationDataModule": "datamodules.interpretation",
    "InterpretationSamples": "datamodules.interpretation_samples",
    "save_interpretation_samples": "datamodules.interpretation_samples",
    "QADataModule": "datamodules.qa",
    "QARecord": "datamodules.qa_records",
    "load_qa_records": "datamodules.qa_records",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute '{name}'")
