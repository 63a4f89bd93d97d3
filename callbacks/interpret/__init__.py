"""Beside interpretation: the samples writer, the interpretation writer, latent stores and the feature browser."""
