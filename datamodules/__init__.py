"""Data that flows into the models: text -> tokens -> activations."""
