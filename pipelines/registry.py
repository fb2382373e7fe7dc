"""The MLflow model registry: register a trained run, aliases, promotion, listing."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vaeflow import __version__
from vaeflow.core.checkpoint import CONFIG_FILE, PLUGINS_FILE, WEIGHTS_FILE, read_run_config
from vaeflow.core.config import Config, config_hash
from vaeflow.core.errors import VaeflowError
from vaeflow.core.interfaces import file_sha256
from vaeflow.pipelines.processes import failpoint

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
CANDIDATE, CHAMPION = "candidate", "champion"
MODEL_DIR = "model_dir"  # artifacts/model_dir/ inside a registered model holds weights, config, plugins


def export_model_dir(run_dir: Path, dest: Path) -> Path:
    """The files a registered model carries: weights, resolved config, the plugins it needs."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_FILE, CONFIG_FILE, PLUGINS_FILE):
        shutil.copy2(run_dir / name, dest / name)
    return dest


def signature(cfg: Config):
    """Input: float32 images (N, C, H, W) in [0, 1]; param `output`: "reconstruction" (default) or "latent"."""
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    from vaeflow.core.model import data_shape

    images = Schema([TensorSpec(np.dtype(np.float32), (-1, *data_shape(cfg)))])
    return ModelSignature(inputs=images, params=ParamSchema([ParamSpec("output", "string", "reconstruction")]))


def requirements(cfg: Config) -> list[str]:
    """The registered model's pip requirements: vaeflow, and each plugin distribution the model needs at its installed
    version, so that an MLflow environment restore (or `mlflow models serve`) installs them. A VAEFLOW_PLUGINS module
    has no distribution to pin; loading the model names it when it is missing."""
    from vaeflow.core.checkpoint import plugins_used

    pins = {"vaeflow": __version__}
    for info in plugins_used(cfg).values():
        if info.get("version") and info["package"] != "vaeflow":
            pins[info["package"]] = info["version"]
    return [f"{package}=={version}" for package, version in pins.items()]


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name, description="vaeflow model; see the version tags for lineage")
    except MlflowException as exc:
        if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise


def _version_with(client: MlflowClient, name: str, **tags: str):
    """The newest READY version of `name` whose tags include all of `tags`, or None (search by tag, then check)."""
    query = " and ".join([f"name='{name}'", *(f"tags.{k}='{v}'" for k, v in tags.items())])
    ready = [mv for mv in client.search_model_versions(query) if mv.status == "READY"]
    return max(ready, key=lambda mv: int(mv.version), default=None)


def _await_ready(client: MlflowClient, version) -> None:
    """Raise unless a new version finished registering (aliases may only point at READY versions)."""
    if version.status != "READY":
        version = client.get_model_version(version.name, version.version)
    if version.status != "READY":
        raise VaeflowError(f"model {version.name} version {version.version} did not become READY "
                           f"(status {version.status}: {version.status_message or 'no message'})")


ALIAS_ATTEMPTS = 3


def _alias_race(exc: Exception) -> bool:
    """Whether an alias write lost a race: two runs created the same new alias at once, and the tracking server's
    database refused the second insert (PostgreSQL: a unique violation; sqlite: a UNIQUE constraint)."""
    text = str(exc)
    return any(s in text for s in ("UniqueViolation", "UNIQUE constraint", "duplicate key", "already exists"))


def set_alias(client: MlflowClient, name: str, alias: str, version) -> None:
    """Point an alias at a version; when another run created the alias at the same moment, set it again (now an
    update, which the server serialises)."""
    for attempt in range(ALIAS_ATTEMPTS):
        try:
            client.set_registered_model_alias(name, alias, str(version))
            return
        except MlflowException as exc:
            if not _alias_race(exc) or attempt == ALIAS_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def register(client: MlflowClient, run_id: str, run_dir: Path, cfg: Config, metrics: dict,
             lineage: dict[str, str], companions=None) -> dict:
    """Log the model (python_function flavor) in run_id, register a version, alias it candidate,
    and promote it to champion when its metric beats the current champion's.

    Idempotent: a version whose weights_sha256 tag matches is reused, not registered again (a re-run after a
    crash between registering and aliasing completes the aliases). Aliases are set only on a READY version,
    and all of it happens while run_id is still open, so the run ends after its version and aliases exist.
    `companions(version) -> dict` registers what the version needs (a VQ model's priors) before any
    promotion, so an alias never points at a version whose companions failed to register."""
    name = cfg.tracking.model_name
    metric, lower = cfg.tracking.promote_metric, cfg.tracking.promote_lower_is_better
    _ensure_registered_model(client, name)
    sha = file_sha256(Path(run_dir) / WEIGHTS_FILE)  # the identity of what is registered
    tags = {**lineage, "weights_sha256": sha, "run_id": run_id, "config_hash": config_hash(cfg)}
    if metric in metrics:
        tags[f"metric.{metric}"] = repr(float(metrics[metric]))
    with mlflow.start_run(run_id=run_id):  # fluent API, this task's own thread; ends the run after the aliases
        version = _version_with(client, name, weights_sha256=sha)
        reused = version is not None
        if not reused:
            with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
                model_dir = export_model_dir(Path(run_dir), Path(tmp) / MODEL_DIR)  # the artifact folder keeps this name
                # the signature is explicit (below), so MLflow's hints about type hints and input examples do not apply
                warnings.filterwarnings("ignore", message=".*(type hints|input example).*")
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=str(PYFUNC_CODE), artifacts={"model_dir": str(model_dir)},
                    signature=signature(cfg),
                    pip_requirements=requirements(read_run_config(run_dir)),  # the plugins of the weights' own config
                    metadata={"vaeflow_version": __version__, "config_hash": config_hash(cfg)},
                )
            # model_id names the logged model: an `mlflow server` refuses a models:/m-... source without it
            version = client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags,
                                                  model_id=info.model_id)
            _await_ready(client, version)
        failpoint("register.after_version")
        extra = {} if companions is None else {"priors": companions(int(version.version))}
        set_alias(client, name, CANDIDATE, version.version)
        promoted = False
        for attempt in range(ALIAS_ATTEMPTS if metric in metrics else 0):  # compare, then set; again on a race
            champion = _alias_version(client, name, CHAMPION)
            best = None if champion is None else champion.tags.get(f"metric.{metric}")
            new = float(metrics[metric])
            if champion is not None and str(champion.version) == str(version.version):
                promoted = True
            elif best is None or (new < float(best) if lower else new > float(best)):
                try:
                    client.set_registered_model_alias(name, CHAMPION, version.version)
                except MlflowException as exc:
                    if not _alias_race(exc) or attempt == ALIAS_ATTEMPTS - 1:
                        raise
                    continue  # another run set the first champion meanwhile: compare with it
                promoted = True
            break
    return {"name": name, "version": int(version.version), "model_uri": f"models:/{name}/{version.version}",
            "champion": promoted, "metric": metric, "value": metrics.get(metric), "reused": reused, **extra}


def register_features(client: MlflowClient, run_id: str, folder: Path, name: str, info: dict) -> dict:
    """Register the offline feature network once per weights file (a cached re-run reuses its version)."""
    from vaeflow.core.sample_quality import FEATURES_WEIGHTS

    sha = file_sha256(folder / FEATURES_WEIGHTS)
    _ensure_registered_model(client, name)
    existing = _version_with(client, name, weights_sha256=sha)
    if existing is not None:
        return {"name": name, "version": int(existing.version)}
    client.log_artifacts(run_id, str(folder), "features")
    tags = {"weights_sha256": sha, "accuracy": repr(float(info["accuracy"])),
            "data_manifest_hash": info.get("data_manifest_hash", ""), "run_id": run_id}
    version = client.create_model_version(name, source=f"runs:/{run_id}/features", run_id=run_id, tags=tags)
    _await_ready(client, version)
    return {"name": name, "version": int(version.version)}


def prior_model_name(name: str, level: str) -> str:
    """Registry name of a model's prior for one level, e.g. vqvae2-fashion-mnist-prior-top."""
    return f"{name}-prior-{level}"


def register_prior(client: MlflowClient, run_id: str, prior_dir: Path, stage1_name: str, stage1_version: int,
                   level: str) -> dict:
    """Register a trained prior with lineage tags naming the exact stage-1 version and codebook hash."""
    from vaeflow.core.priors import PRIOR_INFO

    info = json.loads((prior_dir / PRIOR_INFO).read_text())
    name = prior_model_name(stage1_name, level)
    _ensure_registered_model(client, name)
    existing = _version_with(client, name, weights_sha256=info["weights_sha256"], stage1_version=str(stage1_version))
    if existing is not None:  # a re-run after a crash: this prior is registered for this stage-1 version already
        set_alias(client, name, CANDIDATE, existing.version)
        return {"name": name, "version": int(existing.version), "model_uri": f"models:/{name}/{existing.version}"}
    artifact = f"prior-{level}"
    if not client.list_artifacts(run_id, artifact):
        client.log_artifacts(run_id, str(prior_dir), artifact)
    tags = {**info["lineage"], "stage1_model": stage1_name, "stage1_version": str(stage1_version), "level": level,
            "weights_sha256": info["weights_sha256"], "run_id": run_id,
            "metric.nll_bits_per_code": repr(float(info["test"]["nll_bits_per_code"]))}
    version = client.create_model_version(name, source=f"runs:/{run_id}/{artifact}", run_id=run_id, tags=tags)
    _await_ready(client, version)
    set_alias(client, name, CANDIDATE, version.version)
    return {"name": name, "version": int(version.version), "model_uri": f"models:/{name}/{version.version}"}


def resolve_version(client: MlflowClient, uri: str) -> tuple[str, str]:
    """(name, version) of models:/NAME@alias or models:/NAME/VERSION."""
    body = uri.removeprefix("models:/")
    if "@" not in body and "/" not in body:
        raise VaeflowError(f"{uri} names no version: add an alias or a version number, e.g. models:/{body or 'NAME'}"
                           f"@champion or models:/{body or 'NAME'}/1")
    name = body.split("@", 1)[0] if "@" in body else body.rsplit("/", 1)[0]
    try:
        if "@" in body:
            return name, str(client.get_model_version_by_alias(name, body.split("@", 1)[1]).version)
        version = body.rsplit("/", 1)[1]
        if version == "latest":
            return name, str(max(int(v.version) for v in client.search_model_versions(f"name='{name}'")))
        return name, str(client.get_model_version(name, version).version)
    except (MlflowException, ValueError):
        raise VaeflowError(f"{uri}: no such registered model version; {_what_is_registered(client, name)}") from None


def _what_is_registered(client: MlflowClient, name: str) -> str:
    """What a models:/ URI of `name` could name: its versions and aliases, or the registered names."""
    import difflib

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = [m.name for m in client.search_registered_models(max_results=1000)]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (f"no model is registered as {name!r}{hint}; registered: {', '.join(sorted(names)[:20]) or 'none'} "
                f"(`vaeflow models list`)")
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    aliases = ", ".join(f"@{a} -> {v}" for a, v in sorted(model.aliases.items())) or "none"
    return (f"{name!r} has versions {', '.join(map(str, versions)) or 'none'} and aliases {aliases} "
            f"(`vaeflow models list`)")


def find_priors(client: MlflowClient, uri: str, levels: tuple[str, ...]) -> dict[str, Path]:
    """{level: local prior folder} of the newest priors registered for exactly this stage-1 version.

    A level without a registered prior is an error: a VQ model never falls back to a Gaussian prior.
    """
    import mlflow

    name, version = resolve_version(client, uri)
    found = {}
    for level in levels:
        prior_name = prior_model_name(name, level)
        try:
            versions = client.search_model_versions(f"name='{prior_name}' and tags.stage1_version='{version}'")
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in str(exc) and "not found" not in str(exc).lower():
                raise VaeflowError(f"cannot search the registry for {prior_name}: {str(exc).splitlines()[0][:300]}") from None
            versions = []
        if not versions:
            raise VaeflowError(f"{uri} (version {version} of {name}) has no registered {level} prior "
                               f"({prior_name} with tag stage1_version={version}); run the VQ pipeline "
                               f"(`vaeflow run CONFIG`) to train and register its priors")
        newest = max(versions, key=lambda v: int(v.version))
        found[level] = Path(mlflow.artifacts.download_artifacts(artifact_uri=newest.source))
    return found


def load_generator(source: str, priors: list[str] | None = None, device: str = "auto"):
    """(model, cfg, {level: prior}) of a VQ model: priors from the registry's lineage tags for a models:/ URI,
    else from the given prior folders (top first); each prior is checked against the model.

    A models:/NAME@alias URI is resolved to one version first, so the model and its priors always match."""
    from vaeflow.core.checkpoint import load_model
    from vaeflow.core.priors import load_prior

    source = str(source)
    client = None
    if source.startswith(("models:/", "runs:/")):
        from vaeflow.pipelines.tracking import get_client

        client = get_client(create=False)  # points MLflow at vaeflow's store before anything is fetched; a lookup
        if source.startswith("models:/") and not priors:
            name, version = resolve_version(client, source)
            source = f"models:/{name}/{version}"
    model, cfg = load_model(source, device=device)
    if not model.capabilities.discrete:
        raise VaeflowError(f"{source} is a {cfg.model.kind}, which has no code grids; it samples from its own prior "
                           f"without code priors")
    levels = model.levels
    if priors:
        if len(priors) != len(levels):
            raise VaeflowError(f"{source} has levels {', '.join(levels)}, so pass {len(levels)} --prior folder(s) "
                               f"in that order, got {len(priors)}")
        folders = dict(zip(levels, map(Path, priors)))
    elif source.startswith("models:/"):
        folders = find_priors(client, source, levels)
    else:
        raise VaeflowError(f"{source} is a {cfg.model.kind}: sampling needs its code priors. Pass --prior for each "
                           f"level ({', '.join(levels)}), or use the registered model, models:/NAME@champion, whose "
                           f"priors are found through their lineage tags")
    loaded = {level: load_prior(folder, model, model.device, level) for level, folder in folders.items()}
    for level, prior in loaded.items():
        if prior.grid != tuple(model.grids[level]):
            raise VaeflowError(f"the prior passed for the {level} level models a {prior.grid} grid, "
                               f"but the model's {level} grid is {tuple(model.grids[level])}")
    return model, cfg, loaded


def _alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


# MLflow's own rules (mlflow.utils.validation: _validate_model_alias_name and _validate_model_alias_name_reserved)
ALIAS_MAX_LENGTH = 255
ALIAS_RULE = ("an alias is 1 to 255 letters, digits, underscores (_) and dashes (-), and MLflow reserves 'latest' "
              "(any case) and v<number> (v3, V12: version 3, 12), e.g. champion, staging, prod-2024")


def alias_problem(alias: str) -> str | None:
    """What breaks MLflow's rules for a registered model alias, or None when it is a valid alias."""
    if not alias:
        return "is empty"
    if not re.fullmatch(r"[\w\-]+", alias):
        bad = "".join(dict.fromkeys(c for c in alias if not re.fullmatch(r"[\w\-]", c)))
        return f"has characters MLflow does not allow in an alias ({bad!r})"
    if len(alias) > ALIAS_MAX_LENGTH:
        return f"is {len(alias)} characters long (at most {ALIAS_MAX_LENGTH})"
    if alias.lower() == "latest":
        return "is reserved by MLflow (models:/NAME/latest means the newest version)"
    if re.fullmatch(r"[vV]\d+", alias):
        return f"is reserved by MLflow (models:/NAME@{alias} means version {alias[1:]})"
    return None


def check_alias(alias: str, option: str = "--alias") -> str:
    """The alias, or a VaeflowError naming it (as `option`), what is wrong and MLflow's rule."""
    problem = alias_problem(alias)
    if problem is not None:
        raise VaeflowError(f"{option} {alias!r} {problem}: {ALIAS_RULE}")
    return alias


def promote(client: MlflowClient, name: str, version: int, alias: str = CHAMPION) -> None:
    """Point `alias` at a version, checking the alias against MLflow's rules and that the version exists."""
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

    check_alias(alias)
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise VaeflowError(f"model {name!r} has no version {version}; see `vaeflow models list`") from None
    try:
        client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(INVALID_PARAMETER_VALUE):
            raise
        raise VaeflowError(f"MLflow refused alias {alias!r} for model {name!r} version {version}: "
                           f"{str(exc).splitlines()[0][:300]}; {ALIAS_RULE}") from None


def list_models(client: MlflowClient) -> list[dict]:
    """Every registered model's versions with aliases and key metrics."""
    rows = []
    for rm in client.search_registered_models():
        aliases: dict[str, list[str]] = {}
        for alias, version in (rm.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            metrics = {k.removeprefix("metric."): v for k, v in mv.tags.items() if k.startswith("metric.")}
            rows.append({"name": rm.name, "version": int(mv.version), "aliases": sorted(aliases.get(str(mv.version), [])),
                         "run_id": mv.run_id, "metrics": metrics, "config_hash": mv.tags.get("config_hash", "")})
    return sorted(rows, key=lambda r: (r["name"], r["version"]))
