"""vaeflow core: plugin interfaces, config, training engine, checkpoints and metrics."""

from vaeflow import __version__, load_model

__all__ = ["__version__", "load_model"]
