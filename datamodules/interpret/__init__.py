"""Corpus contexts for sampling latents; the samples format; explain/score tasks."""
