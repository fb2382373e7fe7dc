"""The VAE pipeline as a Prefect flow of cached stages, every run tracked in MLflow.

    prepare_data -> train -> (evaluate || render) -> register

Each stage is a task keyed by the hash of its own config section, the data manifest hash and
its parent artifact's hash, so an unchanged re-run is all cache hits, an `eval` change re-runs
only evaluate and register, and a `train` change leaves prepare_data cached. Tasks exchange
paths and hashes (JSON), never models. MLflow's active run is thread-local, so run ids are
passed explicitly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.states import State

from core.checkpoint import CHECKPOINT_FILE, METRICS_FILE, WEIGHTS_FILE, read_metrics, read_run_config
from core.config import Config, apply_sets, canonical_json, config_hash, hashed_dump, load_config, validate
from core.interfaces import file_sha256

for _var, _value in (("DO_NOT_TRACK", "true"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                     ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                     ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")):
    os.environ.setdefault(_var, _value)

STAGES = ("prepare_data", "train", "evaluate", "render", "register")


def _digest(*parts: object) -> str:
    """sha256 of the canonical JSON of the parts, shortened for folder names."""
    return hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()[:32]


def _cfg(config: str) -> Config:
    return validate(json.loads(config))


def _workspace(cfg: Config) -> Path:
    from pipelines.tracking import project_root

    ws = Path(cfg.tracking.workspace)
    return ws if ws.is_absolute() else project_root() / ws


# --- stage keys: own section + parent hashes --------------------------------------------------
def prepare_key(config: str) -> str:
    """data section + the sha256 of every source file (a changed file invalidates the cache)."""
    from core.manifest import source_files

    cfg = _cfg(config)
    return "prepare_data-" + _digest(config_hash(cfg, "data"), [f["sha256"] for f in source_files(cfg)])


# train options that change how a run is watched, never the weights it produces
NOT_IN_TRAIN_KEY = ("progress", "log_every", "checkpoint_every", "num_threads")


def train_key(config: str, data: dict) -> str:
    """model section (less its warning threshold) + train section (less bookkeeping options) + the data manifest
    + the model's architecture signature (a plugin whose code changed shape never reuses old weights)."""
    from core.checkpoint import architecture_signature
    from core.model import build_model

    cfg = _cfg(config)
    model_section = hashed_dump(cfg)["model"]
    model_section.get("vq", {}).pop("usage_warning", None)  # only decides when to warn
    train_section = cfg.train.model_dump(mode="json", exclude=set(NOT_IN_TRAIN_KEY))
    return "train-" + _digest(model_section, train_section, data["manifest_hash"], architecture_signature(build_model(cfg)))


QUALITY_SCORING = {"samples", "kid_subsets", "kid_subset_size"}  # quality options of evaluate only (seed: both)


def train_features_key(config: str, data: dict) -> str:
    """quality options of the feature network + the data manifest."""
    section = _cfg(config).quality.model_dump(mode="json", exclude=QUALITY_SCORING)
    return "train_features-" + _digest(section, data["manifest_hash"])


def evaluate_key(config: str, data: dict, trained: dict, features: dict) -> str:
    """eval and quality sections + the trained weights + the feature network + the data manifest."""
    cfg = _cfg(config)
    return "evaluate-" + _digest(config_hash(cfg, "eval"), config_hash(cfg, "quality"), trained["weights_sha256"],
                                 features.get("weights_sha256"), data["manifest_hash"])


def render_key(config: str, data: dict, trained: dict) -> str:
    """render section + the trained weights + the data manifest."""
    return "render-" + _digest(config_hash(_cfg(config), "render"), trained["weights_sha256"], data["manifest_hash"])


def register_key(config: str, data: dict, trained: dict, evaluated: dict) -> str:
    """tracking section + the weights + the metrics that decide promotion."""
    return "register-" + _digest(config_hash(_cfg(config), "tracking"), trained["weights_sha256"],
                                 evaluated["metrics_sha256"])


def _key_fn(fn):
    return lambda context, params: fn(**{k: v for k, v in params.items() if k != "run"})


# --- stages ----------------------------------------------------------------------------------
def _transient(task, task_run, state) -> bool:
    """Retry network-style failures, not user errors (missing files, bad config): those fail at once."""
    from core.errors import VaeflowError

    try:
        state.result()
    except VaeflowError:
        return False
    except Exception:
        return True
    return False


@task(name="prepare_data", cache_key_fn=_key_fn(prepare_key), persist_result=True, result_serializer="json",
      retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_transient)
def prepare_data(config: str, run: dict) -> dict:
    """Load, check and cache the splits; write the data manifest."""
    from core.manifest import MANIFEST_FILE, prepare
    from pipelines.tracking import get_client, log_params, stage_run

    cfg, client = _cfg(config), get_client()
    with stage_run(client, run["experiment_id"], run["parent_id"], "prepare_data", run["tags"]) as run_id:
        manifest, folder = prepare(cfg, _workspace(cfg) / "data")
        log_params(client, run_id, {f"data.split.{k}.n": str(v["n"]) for k, v in manifest["splits"].items()})
        client.log_artifact(run_id, str(folder / MANIFEST_FILE))
    return {"manifest_hash": manifest["manifest_hash"], "folder": str(folder), "run_id": run_id}


@task(name="train", cache_key_fn=_key_fn(train_key), persist_result=True, result_serializer="json", retries=1,
      retry_condition_fn=_transient)
def train(config: str, data: dict, run: dict) -> dict:
    """Train on the prepared split; a re-run or retry with the same key resumes from its checkpoint."""
    from core.engine import Trainer
    from core.manifest import load_prepared
    from pipelines.tracking import MetricsLogger, get_client, log_metrics, stage_run

    cfg, client = _cfg(config), get_client()
    run_dir = _workspace(cfg) / "train" / train_key(config, data).removeprefix("train-")
    with stage_run(client, run["experiment_id"], run["parent_id"], "train", run["tags"]) as run_id:
        if not (run_dir / WEIGHTS_FILE).exists():
            resume = (run_dir / CHECKPOINT_FILE).exists()
            if resume:  # same key, so same weights-relevant config; bookkeeping options come from the run dir
                get_run_logger().info("resuming %s from its last checkpoint", run_dir)
            trainer = Trainer(read_run_config(run_dir) if resume else cfg, run_dir, resume=resume,
                              train_images=load_prepared(data["folder"])["train"],
                              callbacks=[MetricsLogger(client, run_id)])
            trainer.fit()
        records = read_metrics(run_dir)
        if records:
            log_metrics(client, run_id, {f"final/{k}": v for k, v in records[-1].items()})
        _loss_curve(run_dir)
        for name in ("config.yaml", "plugins.json", WEIGHTS_FILE, METRICS_FILE, "loss_curve.png"):
            client.log_artifact(run_id, str(run_dir / name))
        client.log_artifact(run_id, str(run_dir / CHECKPOINT_FILE), "checkpoints")
    return {"run_dir": str(run_dir), "weights_sha256": file_sha256(run_dir / WEIGHTS_FILE), "run_id": run_id}


@task(name="train_features", cache_key_fn=_key_fn(train_features_key), persist_result=True,
      result_serializer="json")
def train_features(config: str, data: dict, run: dict) -> dict:
    """The offline feature network for FID/KID: a small classifier trained on the data, registered with its accuracy."""
    from core.data import open_dataset
    from core.manifest import load_prepared
    from core.sample_quality import FEATURES_INFO, FEATURES_WEIGHTS, save_feature_net, train_feature_net
    from pipelines.registry import register_features
    from pipelines.tracking import get_client, log_metrics, stage_run

    cfg, client = _cfg(config), get_client()
    q = cfg.quality
    dataset = open_dataset(cfg)
    if not q.enabled or dataset.labels("train") is None:
        reason = "quality.enabled is false" if not q.enabled else f"{cfg.data.dataset.name} has no class labels"
        return {"enabled": False, "reason": reason, "files": []}
    folder = _workspace(cfg) / "features" / train_features_key(config, data).removeprefix("train_features-")
    with stage_run(client, run["experiment_id"], run["parent_id"], "train_features", run["tags"]) as run_id:
        if not (folder / FEATURES_INFO).exists():
            splits = load_prepared(data["folder"])
            net, info = train_feature_net(splits["train"], dataset.labels("train"), splits["test"], dataset.labels("test"),
                                          epochs=q.feature_epochs, batch_size=q.feature_batch_size, lr=q.feature_lr,
                                          seed=q.seed, progress=cfg.train.progress)
            save_feature_net(folder, net, {**info, "data_manifest_hash": data["manifest_hash"]})
        info = json.loads((folder / FEATURES_INFO).read_text())
        log_metrics(client, run_id, {f"features/{k}": v for k, v in info.items()})
        registered = register_features(client, run_id, folder, f"features-{cfg.data.dataset.name}", info)
    return {"enabled": True, "folder": str(folder), "weights_sha256": file_sha256(folder / FEATURES_WEIGHTS),
            "accuracy": info["accuracy"], **registered, "files": [str(folder / FEATURES_WEIGHTS), str(folder / FEATURES_INFO)],
            "run_id": run_id}


@task(name="evaluate", cache_key_fn=_key_fn(evaluate_key), persist_result=True, result_serializer="json")
def evaluate(config: str, data: dict, trained: dict, features: dict, run: dict) -> dict:
    """Test-split metrics of the trained model, and FID/KID of its samples in the feature network's space."""
    from core.checkpoint import load_model, write_text
    from core.interfaces import to_unit_float
    from core.manifest import load_prepared
    from core.data import known_factors
    from core.metrics import evaluate as run_eval
    from pipelines.tracking import get_client, log_metrics, set_tags, stage_run

    cfg, client = _cfg(config), get_client()
    out = _workspace(cfg) / "evaluate" / evaluate_key(config, data, trained, features).removeprefix("evaluate-") / "eval.json"
    with stage_run(client, run["experiment_id"], run["parent_id"], "evaluate", run["tags"]) as run_id:
        model, _ = load_model(trained["run_dir"], device="auto")
        splits = load_prepared(data["folder"])
        test = to_unit_float(splits["test"])
        metrics = run_eval(model, test, cfg.eval, **known_factors(cfg))
        if features.get("enabled"):
            import torch

            n = min(cfg.quality.samples, len(test))
            fake = model.generate(n, torch.Generator().manual_seed(cfg.quality.seed)).cpu()  # (n, C, H, W)
            metrics.update(sample_quality(fake, test, cfg, features, splits["train"]))
            set_tags(client, run_id, {"quality.feature_net": metrics["quality/feature_net"]})
        write_text(out, json.dumps(metrics, indent=2))
        log_metrics(client, run_id, {f"eval/{k}": v for k, v in metrics.items()})
        client.log_artifact(run_id, str(out))
    return {"path": str(out), "metrics_sha256": file_sha256(out), "run_id": run_id}


@task(name="render", cache_key_fn=_key_fn(render_key), persist_result=True, result_serializer="json")
def render(config: str, data: dict, trained: dict, run: dict) -> dict:
    """Reconstruction, sample and interpolation grids, then the configured renderers (latent traversals, ...)."""
    from core.checkpoint import load_model
    from core.interfaces import to_unit_float
    from core.manifest import load_prepared
    from pipelines import render as grids
    from pipelines.tracking import get_client, stage_run

    cfg, client = _cfg(config), get_client()
    folder = _workspace(cfg) / "render" / render_key(config, data, trained).removeprefix("render-")
    with stage_run(client, run["experiment_id"], run["parent_id"], "render", run["tags"]) as run_id:
        model, _ = load_model(trained["run_dir"], device="auto")
        test = to_unit_float(load_prepared(data["folder"])["test"])
        paths = [grids.reconstructions(model, test, 32, folder / "reconstructions.png"),
                 grids.samples(model, 64, cfg.eval.seed, folder / "samples.png"),
                 grids.interpolations(model, test, 8, 10, cfg.eval.seed, folder / "interpolations.png")]
        paths += grids.render_all(model, cfg, test, folder)  # traversals, phase diagram, ... (cfg.render)
        for path in paths:
            sub = path.parent.relative_to(folder).as_posix()
            client.log_artifact(run_id, str(path), "images" if sub == "." else f"images/{sub}")
    return {"folder": str(folder), "files": [str(p) for p in paths], "run_id": run_id}


@task(name="register", cache_key_fn=_key_fn(register_key), persist_result=True, result_serializer="json")
def register(config: str, data: dict, trained: dict, evaluated: dict, run: dict) -> dict:
    """Log the model (python_function flavor) and register it; promote on the configured metric."""
    from pipelines.registry import register as register_model
    from pipelines.tracking import get_client, stage_run

    cfg, client = _cfg(config), get_client()
    metrics = json.loads(Path(evaluated["path"]).read_text())
    lineage = {"data_manifest_hash": data["manifest_hash"], "parent_model_version": "",
               "train_run_id": trained["run_id"], "weights_sha256": trained["weights_sha256"]}
    with stage_run(client, run["experiment_id"], run["parent_id"], "register", run["tags"]) as run_id:
        info = register_model(client, run_id, Path(trained["run_dir"]), cfg, metrics, lineage)
    return {**info, "run_id": run_id}


def sample_quality(fake, test, cfg: Config, features: dict, train=None) -> dict:
    """FID and KID of generated images (n, C, H, W) against as many test images, naming the feature network;
    plus the floor: as many real training images against the same test images."""
    from core.interfaces import to_unit_float
    from core.sample_quality import load_feature_net, quality_scores

    q = cfg.quality
    n = len(fake)
    net, _ = load_feature_net(features["folder"])
    kw = {"kid_subsets": q.kid_subsets, "kid_subset_size": q.kid_subset_size, "seed": q.seed}
    scores = quality_scores(net, test[:n], fake, **kw)
    floor = quality_scores(net, test[:n], to_unit_float(train[:n]), **kw) if train is not None else {}
    return {**{f"quality/{k}": v for k, v in scores.items()}, "quality/samples": n,
            **{f"quality/real_train_{k}": v for k, v in floor.items()},
            "quality/feature_net": f"{features['name']}/{features['version']}",
            "quality/feature_net_accuracy": features["accuracy"]}


def _loss_curve(run_dir: Path) -> None:
    """loss_curve.png: per-epoch loss, reconstruction and KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core.checkpoint import atomic_write

    records = read_metrics(run_dir)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "reconstruction", "kl"):
        ax.plot([r["epoch"] for r in records], [r.get(key) for r in records], marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.legend()
    fig.tight_layout()
    atomic_write(run_dir / "loss_curve.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _outputs_exist(stage: str, result: dict) -> bool:
    """Whether a cached stage's files are still on disk (else it must run again)."""
    paths = {"prepare_data": lambda: [Path(result["folder"]) / "manifest.json"],
             "train": lambda: [Path(result["run_dir"]) / WEIGHTS_FILE],
             "evaluate": lambda: [Path(result["path"])],
             "render": lambda: [Path(p) for p in result["files"]],
             "register": lambda: []}
    # other stages (the VQ pipeline's) list their files under "files"
    files = paths[stage]() if stage in paths else [Path(p) for p in result.get("files", [])]
    return all(p.exists() for p in files)


def finish(stage: str, state: State, resubmit) -> tuple[dict, str]:
    """(result, 'ran' | 'cached'); a cached result whose files are gone runs again with refresh_cache."""
    result = state.result()  # raises the stage's own error if it failed
    if state.name == "Cached" and not _outputs_exist(stage, result):
        state = resubmit()
        result = state.result()
    return result, "cached" if state.name == "Cached" else "ran"


# --- the pipeline ----------------------------------------------------------------------------
def resolve_config(config_path: str, overrides: list[str] | None, config: Config | dict | None = None) -> Config:
    """The run's config: `config` (the structured flow parameter, e.g. edited in the Prefect UI form) when given,
    else the YAML at config_path; then the overrides."""
    if config is None:
        return load_config(config_path, overrides or [])
    raw = config.model_dump(mode="json") if isinstance(config, Config) else dict(config)
    return apply_sets(validate(raw, source="the config parameter"), overrides or [])


def open_pipeline_run(config_path: str, overrides: list[str] | None, name: str,
                      config: Config | dict | None = None) -> tuple[Config, str, object, dict]:
    """Resolve the config and start the MLflow parent run: (cfg, canonical config JSON, client, run)."""
    from core.engine import resolve_device
    from pipelines.tracking import experiment_id, flatten, get_client, log_params, run_tags, start_run

    cfg = resolve_config(config_path, overrides, config)
    client = get_client()
    exp = experiment_id(client, cfg.tracking.experiment)
    tags = run_tags(cfg, str(resolve_device(cfg.train.device)))
    parent = start_run(client, exp, f"{name} {Path(config_path).stem}", tags=tags)
    log_params(client, parent, flatten(cfg.model_dump(mode="json")))
    return cfg, canonical_json(cfg), client, {"experiment_id": exp, "parent_id": parent, "tags": tags}


def close_pipeline_run(client, run: dict, status: dict[str, str], extra: dict[str, str],
                       error: BaseException | None = None) -> None:
    """Tag the parent run with each stage's status (and the error), and end it FINISHED or FAILED."""
    from pipelines.tracking import set_tags

    tags = {f"stage.{k}": v for k, v in status.items()} | extra
    if error is not None:
        tags["error"] = f"{type(error).__name__}: {error}"
    set_tags(client, run["parent_id"], tags)
    client.set_terminated(run["parent_id"], "FAILED" if error is not None else "FINISHED")


def fresh(task_, run: dict, *args):
    """A re-submission of a cached stage with refresh_cache (its outputs were deleted)."""
    return lambda: task_.with_options(refresh_cache=True)(*args, run, return_state=True)


def run_pipeline(config_path: str, overrides: list[str] | None = None, until: str = "register",
                 config: Config | dict | None = None) -> dict:
    """Run the stages up to and including `until`, as one MLflow parent run; cached stages are skipped."""
    if until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}, got {until!r}")
    stop = STAGES.index(until)
    name = "vae_pipeline" if until == "register" else f"{until}_flow"
    cfg, config, client, run = open_pipeline_run(config_path, overrides, name, config)
    status: dict[str, str] = {}
    out: dict = {"mlflow_run_id": run["parent_id"], "stages": status}
    try:
        data, status["prepare_data"] = finish("prepare_data", prepare_data(config, run, return_state=True),
                                               fresh(prepare_data, run, config))
        out["data"] = data
        if stop >= 1:
            trained, status["train"] = finish("train", train(config, data, run, return_state=True),
                                               fresh(train, run, config, data))
            out["run_dir"] = trained["run_dir"]
        if stop >= 2:
            features, status["train_features"] = finish("train_features", train_features(config, data, run, return_state=True),
                                                        fresh(train_features, run, config, data))
            futures = {"evaluate": evaluate.submit(config, data, trained, features, run)}
            if stop >= 3:
                futures["render"] = render.submit(config, data, trained, run)
            for future in futures.values():
                future.wait()
            evaluated, status["evaluate"] = finish("evaluate", futures["evaluate"].state,
                                                    fresh(evaluate, run, config, data, trained, features))
            out["eval"] = evaluated["path"]
            if stop >= 3:
                rendered, status["render"] = finish("render", futures["render"].state,
                                                     fresh(render, run, config, data, trained))
                out["images"] = rendered["files"]
        if stop >= 4:
            out["model"], status["register"] = finish(
                "register", register(config, data, trained, evaluated, run, return_state=True),
                fresh(register, run, config, data, trained, evaluated))
    except BaseException as exc:
        close_pipeline_run(client, run, status, {}, exc)
        raise
    extra = {"registered_model": f"{out['model']['name']}/{out['model']['version']}"} if "model" in out else {}
    close_pipeline_run(client, run, status, extra)
    return out


@flow(name="vae_pipeline", log_prints=True)
def vae_pipeline(config_path: str, overrides: list[str] | None = None, config: Optional[Config] = None) -> dict:
    """prepare_data -> train -> (evaluate || render) -> register, tracked as one MLflow parent run.

    `config`, when given, is the whole run config (the form the Prefect UI shows); config_path then only names
    the run. Without it, the YAML at config_path is read."""
    return run_pipeline(config_path, overrides, config=config)


# One flow per stage, for deployments: each runs the pipeline up to its stage, so the stages
# before it are cache hits when their inputs are unchanged. Module-level so Prefect can load them.
@flow(name="prepare_data_flow", log_prints=True)
def prepare_data_flow(config_path: str, overrides: list[str] | None = None, config: Optional[Config] = None) -> dict:
    """Prepare and cache the data, with its manifest."""
    return run_pipeline(config_path, overrides, until="prepare_data", config=config)


@flow(name="train_flow", log_prints=True)
def train_flow(config_path: str, overrides: list[str] | None = None, config: Optional[Config] = None) -> dict:
    """Prepare (cached) and train."""
    return run_pipeline(config_path, overrides, until="train", config=config)


@flow(name="evaluate_flow", log_prints=True)
def evaluate_flow(config_path: str, overrides: list[str] | None = None, config: Optional[Config] = None) -> dict:
    """Up to evaluation of the trained model."""
    return run_pipeline(config_path, overrides, until="evaluate", config=config)


@flow(name="render_flow", log_prints=True)
def render_flow(config_path: str, overrides: list[str] | None = None, config: Optional[Config] = None) -> dict:
    """Up to evaluation and rendering."""
    return run_pipeline(config_path, overrides, until="render", config=config)


@flow(name="register_flow", log_prints=True)
def register_flow(config_path: str, overrides: list[str] | None = None, config: Optional[Config] = None) -> dict:
    """The whole pipeline (the same stages as vae_pipeline)."""
    return run_pipeline(config_path, overrides, until="register", config=config)


STAGE_FLOWS = {"prepare_data": prepare_data_flow, "train": train_flow, "evaluate": evaluate_flow,
               "render": render_flow, "register": register_flow}
