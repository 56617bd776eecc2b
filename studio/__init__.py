"""Adapter Studio: train, compose and evaluate Stable Diffusion adapters."""

__version__ = "0.1.0"
