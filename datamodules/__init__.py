"""The lowest floor: data and the frozen LLM, one subpackage per pipeline (``sae/``, ``send/``, ``interpret/``)
plus ``llm/`` (model loading, hooking, DeepSpeed ZeRO access), which every pipeline shares.

text -> tokens -> activations, from the LLM or from a cache on disk (SAE); QA records -> prompts and labels (SEND);
samples -> explain/score tasks.
"""

from neurolight._lazy import lazy_exports

# Lazy, so that the tokenizer's worker processes (which import datamodules.sae.tokenized_corpus) do not pay for
# importing Lightning.
_EXPORTS = {
    "ActivationDataModule": "neurolight.datamodules.sae.activations",
    "CachedActivationDataModule": "neurolight.datamodules.sae.cached_activations",
    "ActivationCache": "neurolight.datamodules.sae.activation_cache",
    "harvest_activations": "neurolight.datamodules.sae.harvest",
    "CorpusContextDataModule": "neurolight.datamodules.interpret.corpus_contexts",
    "InterpretationDataModule": "neurolight.datamodules.interpret.tasks",
    "InterpretationSamples": "neurolight.datamodules.interpret.samples",
    "save_interpretation_samples": "neurolight.datamodules.interpret.samples",
    "QADataModule": "neurolight.datamodules.send.qa",
    "QARecord": "neurolight.datamodules.send.qa_records",
    "load_qa_records": "neurolight.datamodules.send.qa_records",
    "HookedLLM": "neurolight.datamodules.llm.hooked",
    "MODELS": "neurolight.datamodules.llm.models",
    "load_causal_lm": "neurolight.datamodules.llm.models",
    "load_tokenizer": "neurolight.datamodules.llm.models",
    "resolve_model": "neurolight.datamodules.llm.models",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
