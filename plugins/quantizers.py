"""Built-in quantizers (placeholder; being written)."""

from core.hookspecs import hookimpl


@hookimpl
def register_quantizers(register):
    """Register the built-in quantizers."""
