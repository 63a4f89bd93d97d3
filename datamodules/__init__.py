"""Data that flows into the models: text -> tokens -> activations."""

from lightning_modules.lazy_exports import lazy_exports

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

__getattr__ = lazy_exports(__name__, _EXPORTS)
