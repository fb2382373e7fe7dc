"""Built-in priors (placeholder; being written)."""

from core.hookspecs import hookimpl


@hookimpl
def register_priors(register):
    """Register the built-in priors."""
