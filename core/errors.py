"""User-facing errors: the CLI prints them without a traceback and exits with code 2."""

from __future__ import annotations

from urllib.parse import urlsplit


class VaeflowError(Exception):
    """A mistake the user can fix: bad config, unknown plugin, missing file, corrupt checkpoint."""

    exit_code = 2


class ConfigError(VaeflowError):
    """The config is invalid; `problems` holds (field path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "config"):
        self.problems = problems
        self.source = source
        lines = [f"{source}: {len(problems)} problem(s)"]
        lines += [f"  {path}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


class PluginError(VaeflowError):
    """A plugin is unknown, clashes with another, or failed to load."""


class DataError(VaeflowError):
    """A dataset is missing, corrupt, or has the wrong shape."""


class CheckpointError(VaeflowError):
    """A run directory, checkpoint or weights file is missing or corrupt."""


class NonFiniteError(VaeflowError):
    """Training produced NaN or Inf; the last good checkpoint is kept."""


def masked_url(url: str) -> str:
    """A URL as messages show it: any password in it masked."""
    try:
        parts = urlsplit(url)
        if parts.password:
            return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()
    except ValueError:
        pass
    return url
