"""vaeflow core: plugin interfaces, config, training engine, checkpoints and metrics."""

__version__ = "0.1.0"


def load_model(source, device="cpu"):
    """Rebuild a trained model (and its config) from a run directory or `models:/NAME@alias`, via the plugin registry."""
    from core.checkpoint import load_model as _load

    return _load(source, device)
