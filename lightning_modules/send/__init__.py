"""SEND: the fine-tuning module, per-neuron sensitivity, answer generation, QA metrics and EigenScore."""
