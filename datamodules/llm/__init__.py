"""Shared by every pipeline: language models by name, hooked activation sites, DeepSpeed ZeRO access."""
