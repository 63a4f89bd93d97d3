"""Sparse autoencoders: the nn.Module and its LightningModule."""
