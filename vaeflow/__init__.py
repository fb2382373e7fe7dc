"""vaeflow: train, evaluate and ship variational autoencoders as a plugin-based pipeline.

One import namespace over the repository's three folders, mapped by the build configuration (pyproject.toml,
[tool.setuptools] package-dir): vaeflow.core (core/: the plugin interfaces, config, training engine, checkpoints
and metrics), vaeflow.plugins (plugins/: the built-in components) and vaeflow.pipelines (pipelines/: the Prefect
flows, MLflow tracking and registry, and the `vaeflow` CLI).
"""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "core" / "__init__.py").is_file():
    # A source checkout: core/, plugins/ and pipelines/ lie beside this folder. Resolve vaeflow.core & co from it
    # also where no install maps them (PYTHONPATH=CHECKOUT), or where this checkout shadows an installed copy
    # (python started in the checkout); installed or editable, the same files result.
    __path__.append(str(_CHECKOUT))

try:
    __version__ = version("vaeflow")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"


def load_model(source, device="cpu"):
    """Rebuild a trained model and its config from a run directory or `models:/NAME@alias`, via the plugin registry."""
    from vaeflow.core.checkpoint import load_model as _load

    return _load(source, device)


# before anything imports torch (and with it libgomp, which reads its settings once): idle OpenMP threads spin only
# briefly, so jobs that share cores do not thrash (core.cpu); an exported OMP_WAIT_POLICY or GOMP_SPINCOUNT wins
from vaeflow.core.cpu import set_waiting_policy as _set_waiting_policy  # noqa: E402

_set_waiting_policy()
