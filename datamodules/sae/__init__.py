"""Text -> tokens -> activations of a frozen LLM, for SAE training."""
