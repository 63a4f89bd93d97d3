"""Interpretation: sampling latent activations, explaining them with an LLM and scoring the explanations."""
