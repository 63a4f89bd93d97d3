"""Beside SEND: the sensitive-neuron dropout schedule and the QA prediction writer."""
