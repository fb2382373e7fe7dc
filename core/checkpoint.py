"""Run directories, atomic checkpoints, and safe weight loading (never unpickling arbitrary objects)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
import difflib
from typing import Any, Optional

import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, TypeAdapter

from vaeflow.core.config import Config, config_hash, dump_yaml, read_yaml, validate
from vaeflow.core.errors import CheckpointError, PluginError, VaeflowError
from vaeflow.core.files import append_line, atomic_write, read_record, write_text  # noqa: F401 (re-exported: callers import them from here)

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoints/last.pt"
METRICS_FILE = "metrics.jsonl"
PLUGINS_FILE = "plugins.json"
STORE_FILE = "mlflow.db"  # the embedded MLflow store (sqlite) of a project folder


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in a nested dict/list/tuple: a lower bound of its saved size."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically torch.save a dict of tensors and plain values; a full disk is a DiskFullError (exit 2) naming the
    path and the space needed, with no temp file left."""
    atomic_write(path, lambda tmp: torch.save(state, tmp), size=tensor_bytes(state))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with weights_only=True; a corrupt file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train first with `vaeflow train CONFIG --out RUN_DIR`")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a vaeflow checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}); delete it to train from scratch") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not a vaeflow checkpoint (missing model/step)")
    return state


def save_weights(path: str | Path, model: torch.nn.Module, metadata: dict[str, str]) -> None:
    """Atomically write the model's state dict as safetensors, with string metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata),
                 size=tensor_bytes(tensors))


def architecture_signature(module: torch.nn.Module) -> str:
    """sha256 of the state dict's names, shapes and dtypes: changes when a plugin's architecture changes, so
    cache keys built on it never hand back weights that the current code cannot load."""
    import hashlib

    lines = [f"{name}:{tuple(t.shape)}:{t.dtype}" for name, t in sorted(module.state_dict().items())]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def read_run_config(run_dir: str | Path) -> Config:
    """The resolved config stored in a run directory."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        hint = f" (pass its folder, {run_dir.parent})" if (run_dir.parent / CONFIG_FILE).is_file() else ""
        raise CheckpointError(f"{run_dir} is a file, not a run directory{hint}; pass the --out folder of "
                              f"`vaeflow train`, or a registered model models:/NAME@ALIAS")
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist; pass the --out folder of `vaeflow train`")
    if not (run_dir / CONFIG_FILE).is_file():
        raise CheckpointError(not_a_run(run_dir))
    return validate(_upgrade(read_yaml(run_dir / CONFIG_FILE), run_dir), source=str(run_dir / CONFIG_FILE))


def not_a_run(folder: Path) -> str:
    """Why `folder` is not a run directory, what one holds, and any run directories inside it."""
    inner = sorted(p for p in folder.iterdir() if (p / CONFIG_FILE).is_file()) if folder.is_dir() else []
    hint = f"; it holds run directories: {', '.join(str(p) for p in inner[:5])}" if inner else ""
    return (f"{folder} is not a run directory: it has no {CONFIG_FILE}. A run directory is the --out folder of "
            f"`vaeflow train CONFIG --out RUN_DIR`, holding {CONFIG_FILE}, {PLUGINS_FILE}, {METRICS_FILE}, "
            f"{CHECKPOINT_FILE} and, once trained, {WEIGHTS_FILE}{hint}")


class PluginRecord(BaseModel):
    """One entry of a run's plugins.json: the plugin a config field selected, and the package that provided it."""

    model_config = ConfigDict(extra="allow")
    family: str
    name: str
    package: Optional[str] = None
    version: Optional[str] = None


def read_plugins(folder: Path) -> dict[str, PluginRecord] | None:
    """The plugins a run directory's model needs ({config field: record}), or None when it has no plugins.json."""
    path = folder / PLUGINS_FILE
    if not path.is_file():
        return None
    return read_record(path, TypeAdapter(dict[str, PluginRecord]),
                       f"`vaeflow train` writes it as {{config field: {{family, name, package, version}}}}; restore "
                       f"it from a copy of the run (its MLflow run's artifacts), or delete it to load the model with "
                       f"the plugins its {CONFIG_FILE} names")


def _upgrade(raw: dict, run_dir: Path) -> dict:
    """A run config written before model kinds were plugins (its plugins.json names no `kind`) carried every
    model field of every kind (vq defaults on a vae, say): drop the keys its kind does not declare."""
    from vaeflow.core.registry import get_registry

    plugins = read_plugins(run_dir)
    model = raw.get("model")
    if plugins is None or not isinstance(model, dict) or "kind" in plugins:
        return raw
    entry = get_registry().entries["model"].get(model.get("kind", "vae"))
    if entry is not None:
        known = {"kind", *entry.cls.Options.model_fields, *entry.cls.slots}
        raw = {**raw, "model": {k: v for k, v in model.items() if k in known}}
    return raw


def write_run_config(run_dir: str | Path, cfg: Config) -> None:
    """Store the resolved config (every default filled in) and the plugins it needs in the run directory."""
    write_text(Path(run_dir) / CONFIG_FILE, dump_yaml(cfg))
    write_text(Path(run_dir) / PLUGINS_FILE, json.dumps(plugins_used(cfg), indent=2))


def begin_run(run_dir: str | Path, cfg: Config) -> None:
    """Start a fresh run in run_dir: store its config, and empty the metrics a failed earlier start left (e.g. an
    epoch logged before its checkpoint hit a full disk), so that the new run's epochs are not logged twice."""
    write_run_config(run_dir, cfg)
    if (Path(run_dir) / METRICS_FILE).exists():
        write_text(Path(run_dir) / METRICS_FILE, "")


def append_metrics(run_dir: str | Path, record: dict) -> None:
    """Append one epoch's record to metrics.jsonl; a full disk is a DiskFullError naming the file."""
    append_line(Path(run_dir) / METRICS_FILE, json.dumps(record))


def plugins_used(cfg: Config, sections: tuple[str, ...] | None = None) -> dict[str, dict[str, str]]:
    """{config field: {family, name, source, package, version, code_sha256}} for the model kind and every component
    the config selects (only those of `sections`, e.g. ("model",), when given). `code_sha256` hashes the plugin's
    module source and what it imports from its own package and from core (vaeflow.core.registry.code_sha256)."""
    from vaeflow.core.config import LIST_COMPONENTS, component_fields
    from vaeflow.core.interfaces import TAGS
    from vaeflow.core.registry import get_registry

    registry = get_registry()
    chosen = [("model", "kind", "model", cfg.model.kind)]
    for (section, field), family in component_fields(registry).items():
        if field in LIST_COMPONENTS:  # renderers draw a model; loading it never needs them
            continue
        spec = getattr(getattr(cfg, section), field, None)
        if spec is not None:
            chosen.append((section, field, family, getattr(spec, TAGS.get(family, "name"))))
    out = {}
    for section, field, family, name in chosen:
        if sections is None or section in sections:
            entry = registry.get(family, name)
            out[field] = {"family": family, "name": entry.name, "source": entry.source, "package": entry.package,
                          "version": entry.version, "code_sha256": entry.code_sha256()}
    return out


def check_plugins(folder: Path) -> None:
    """Fail with the missing plugin and its package when a model needs components not installed here."""
    from vaeflow.core.registry import get_registry

    registry = get_registry()
    for field, info in (read_plugins(folder) or {}).items():
        known = registry.entries.get(info.family, {})
        if info.name in known:
            continue
        installed = installed_version(info.package)
        if installed is None:
            raise PluginError(f"this model needs the {info.family} {info.name!r} (for {field}) from the package "
                              f"{info.package!r}, which is not installed here: `pip install {info.package}`, "
                              f"or set VAEFLOW_PLUGINS to the module that provides it")
        close = difflib.get_close_matches(info.name, list(known), n=1)
        raise PluginError(f"this model needs the {info.family} {info.name!r} (for {field}, {folder / PLUGINS_FILE}), "
                          f"but the package {info.package!r} installed here ({installed}; the model was made with "
                          f"{info.version}) has no such {info.family}"
                          f"{f' (did you mean {close[0]!r}?)' if close else ''}; known {info.family}s: "
                          f"{', '.join(sorted(known)) or 'none'}. Install the version the model was made with, or "
                          f"set VAEFLOW_PLUGINS to the module that provides it")


def installed_version(package: str | None) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package) if package else None
    except PackageNotFoundError:
        return None


def missing_store(uri: str, cli: bool = True) -> str | None:
    """Why there is no store at a sqlite URI (what the user may have meant), or None when there is one (or the URI
    names a server: it answers for itself). `cli`: the advice of the `vaeflow` commands (VAEFLOW_HOME), else of a
    Python caller (MLFLOW_TRACKING_URI)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri.removeprefix("sqlite:///"))
    if path.is_file() and path.stat().st_size > 0:
        return None
    why = "an empty file" if path.is_file() else "no file"  # sqlite would make its tables in an empty one
    lines = [f"there is no MLflow store at {uri} ({why} {path}): nothing was tracked or registered there yet"]
    found = next((p / STORE_FILE for p in path.parent.parents if (p / STORE_FILE).is_file()), None)
    if found is not None and cli:
        lines.append(f"a store exists at {found}: run from {found.parent} or set VAEFLOW_HOME={found.parent}")
    elif found is not None:
        lines.append(f"a store exists at {found}: set MLFLOW_TRACKING_URI=sqlite:///{found}")
    if cli:
        source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else (
            "VAEFLOW_HOME" if os.environ.get("VAEFLOW_HOME") else "the current folder")
        lines.append(f"the store is taken from {source}: run where `vaeflow run CONFIG` registered the model, set "
                     f"VAEFLOW_HOME to that folder, or set MLFLOW_TRACKING_URI to your tracking server")
    else:
        lines.append("point MLFLOW_TRACKING_URI (or mlflow.set_tracking_uri) at the store that registered the model: "
                     "sqlite:///PROJECT/mlflow.db, or your tracking server's http:// address")
    return "; ".join(lines)


def resolve_model_dir(source: str | Path) -> Path:
    """A local folder with config.yaml and model.safetensors: a run dir, or a registry model fetched by URI."""
    text = str(source)
    if not text.startswith(("models:/", "runs:/")):
        return Path(source)
    import mlflow

    why = missing_store(mlflow.get_tracking_uri(), cli=False)  # a lookup never creates a store (MLflow would, here)
    if why:
        raise CheckpointError(f"cannot fetch {text}: {why}")
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
    except Exception as exc:
        raise CheckpointError(f"cannot fetch {text} from the MLflow store at {mlflow.get_tracking_uri()}: "
                              f"{str(exc).splitlines()[0][:300]}. Check the name and alias (`vaeflow models list`) "
                              f"and MLFLOW_TRACKING_URI") from None
    inner = local / "artifacts" / "model_dir"
    if (inner / CONFIG_FILE).is_file() or (local / CONFIG_FILE).is_file():
        return inner if inner.is_dir() else local
    names = sorted(p.name for p in local.iterdir()) if local.is_dir() else [local.name]
    temp = Path(tempfile.gettempdir())
    copy = next((p for p in (local, *local.parents) if p.parent == temp and p.name.startswith("tmp")), None)
    if copy is not None:
        shutil.rmtree(copy, ignore_errors=True)  # MLflow's own temporary copy of what it fetched (mkdtemp's tmp*)
    what = ("one level's code prior of a VQ model: `vaeflow generate --model` of that model's models:/NAME@ALIAS "
            "finds its priors, or pass the prior's folder as --prior") if "prior.json" in names else (
        "the feature network of the sample-quality metrics (FID)") if "features.json" in names else (
        f"not a model made by vaeflow (it holds {', '.join(names[:6]) or 'nothing'})")
    raise CheckpointError(f"{text} is {what}; it has no {CONFIG_FILE}, so it is not a model this command can load. "
                          f"The models: `vaeflow models list`")


def load_model(source: str | Path, device: str | torch.device = "cpu"):
    """Rebuild a trained model from a run directory or a registry URI (models:/NAME@alias), through the plugin registry.

    `device` may be "auto": CUDA when present, else CPU.
    """
    from vaeflow.core.model import build_model  # local: model imports config, which this module also needs

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    run_dir = resolve_model_dir(source)
    check_plugins(run_dir)
    cfg = read_run_config(run_dir)
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        hint = " (training did not finish: `vaeflow train --resume RUN_DIR`)" if (run_dir / CHECKPOINT_FILE).exists() else ""
        raise CheckpointError(f"no {WEIGHTS_FILE} in {run_dir}{hint}")
    model = build_model(cfg)
    try:
        state = safetensors.torch.load_file(weights, device=str(device))
    except Exception as exc:
        raise CheckpointError(f"{weights} is corrupt ({type(exc).__name__}: {exc})") from None
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match its config: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not match its config: {exc}") from None
    return model.to(device).eval(), cfg


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-epoch metric records of a run; a line torn by a crash mid-append is skipped."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def weights_metadata(cfg: Config) -> dict[str, str]:
    """Metadata stored in model.safetensors: one key of sorted JSON, so the file bytes are deterministic
    (safetensors writes its metadata map in hash order)."""
    from vaeflow import __version__

    info = {"config_hash": config_hash(cfg), "vaeflow_version": __version__, "format": "vaeflow-vae-1"}
    return {"vaeflow": json.dumps(info, sort_keys=True)}


__all__ = ["VaeflowError", "atomic_write", "load_checkpoint", "load_model", "save_checkpoint", "save_weights"]
