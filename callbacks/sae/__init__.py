"""Beside SAE training: dead-latent resampling and step checkpoints."""
