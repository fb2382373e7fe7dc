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
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Optional

from prefect import flow, get_run_logger, task
from prefect.states import State

from core.checkpoint import CHECKPOINT_FILE, METRICS_FILE, WEIGHTS_FILE, read_metrics, read_run_config
from core.config import Config, apply_sets, canonical_json, config_hash, hashed_dump, load_config, validate
from core.interfaces import file_sha256

STAGES = ("prepare_data", "train", "evaluate", "render", "register")


def _digest(*parts: object) -> str:
    """sha256 of the canonical JSON of the parts, shortened for folder names."""
    return hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()[:32]


def _cfg(config: str) -> Config:
    return validate(json.loads(config))


def code_identity(cfg: Config, *sections: str, renderers: bool = False) -> list[list]:
    """[family, name, package, version, code_sha256] of each plugin the config selects in `sections` (and of the
    configured renderers): in a stage key, an edited plugin (installed or editable) re-runs the stage."""
    from core.checkpoint import plugins_used
    from core.registry import get_registry

    found = [[i["family"], i["name"], i["package"], i["version"], i["code_sha256"]]
             for i in plugins_used(cfg, sections).values()]
    if renderers:
        registry = get_registry()
        for spec in cfg.render.renderers:
            e = registry.get("renderer", spec.name)
            found.append(["renderer", e.name, e.package, e.version, e.code_sha256()])
    return found


# --- stage keys: own section + parent hashes --------------------------------------------------
def prepare_key(config: str) -> str:
    """data section + the sha256 of every source file (a changed file invalidates the cache)."""
    from core.manifest import source_files

    cfg = _cfg(config)
    return "prepare_data-" + _digest(config_hash(cfg, "data"), [f["sha256"] for f in source_files(cfg)],
                                     code_identity(cfg, "data"))


# train options that change how a run is watched, never the weights it produces
NOT_IN_TRAIN_KEY = ("progress", "log_every", "checkpoint_every", "num_threads")


def train_key(config: str, data: dict) -> str:
    """model section (less the options its kind marks watch-only) + train section (less bookkeeping options) + the
    data manifest + the model's architecture signature + the code of its kind and components (an edited plugin
    never reuses weights trained with its old code)."""
    from core.checkpoint import architecture_signature
    from core.model import build_model, model_class

    cfg = _cfg(config)
    model_section = hashed_dump(cfg)["model"]
    for dotted in model_class(cfg).watch_only:  # e.g. a warning threshold: decides what is logged, not the weights
        *parents, last = dotted.split(".")
        node = model_section
        for key in parents:
            node = node.get(key) or {}
        node.pop(last, None)
    train_section = {k: v for k, v in hashed_dump(cfg)["train"].items() if k not in NOT_IN_TRAIN_KEY}
    return "train-" + _digest(model_section, train_section, data["manifest_hash"], architecture_signature(build_model(cfg)),
                              code_identity(cfg, "model", "train"))


QUALITY_SCORING = {"samples", "kid_subsets", "kid_subset_size"}  # quality options of evaluate only (seed: both)


def train_features_key(config: str, data: dict) -> str:
    """quality options of the feature network + the data manifest."""
    section = _cfg(config).quality.model_dump(mode="json", exclude=QUALITY_SCORING)
    return "train_features-" + _digest(section, data["manifest_hash"])


def evaluate_key(config: str, data: dict, trained: dict, features: dict) -> str:
    """eval and quality sections + the trained weights + the feature network + the data manifest + the model's code."""
    cfg = _cfg(config)
    return "evaluate-" + _digest(config_hash(cfg, "eval"), config_hash(cfg, "quality"), trained["weights_sha256"],
                                 features.get("weights_sha256"), data["manifest_hash"], code_identity(cfg, "model"))


def render_key(config: str, data: dict, trained: dict) -> str:
    """render section + the trained weights + the data manifest + the code of the model and the renderers."""
    cfg = _cfg(config)
    return "render-" + _digest(config_hash(cfg, "render"), trained["weights_sha256"], data["manifest_hash"],
                               code_identity(cfg, "model", renderers=True))


def register_key(config: str, data: dict, trained: dict, evaluated: dict) -> str:
    """tracking section + the weights + the metrics that decide promotion."""
    return "register-" + _digest(config_hash(_cfg(config), "tracking"), trained["weights_sha256"],
                                 evaluated["metrics_sha256"])


def _key_fn(fn):
    """A Prefect cache_key_fn: the stage key, scoped to this workspace and tracking store (never another's)."""
    from pipelines.workspace import scope

    def key(context, params) -> str:
        return f"{fn(**{k: v for k, v in params.items() if k != 'run'})}-{scope(_cfg(params['config']))}"

    return key


def run_logger():
    """The Prefect run logger (its lines show in the UI), or a plain logger outside a flow or task run."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger("vaeflow")


def _artifact_key(text: str) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in text.lower())


@contextmanager
def stage(config: str, run: dict, name: str, key: str, folder: str | None = None) -> Iterator[SimpleNamespace]:
    """One stage's context: its config and MLflow client, the workspace lock on its key (a second identical run
    waits, then reuses), its MLflow run (ended by how the block ends), and a Prefect link artifact to that run.

    Yields cfg, client, run_id, log (the Prefect run logger) and folder (workspace/<folder>/<key digest>)."""
    from prefect.artifacts import create_link_artifact

    from pipelines.tracking import get_client, run_url, stage_run
    from pipelines.workspace import stage_lock, workspace

    cfg, client, log = _cfg(config), get_client(), run_logger()
    digest = key.rsplit("-", 1)[1]
    out = workspace(cfg) / (folder or name) / digest
    with stage_lock(cfg, key, log), stage_run(client, run["experiment_id"], run["parent_id"], name, run["tags"]) as run_id:
        url = run_url(run["experiment_id"], run_id)
        create_link_artifact(link=url, link_text=f"MLflow run of {name}", key=f"mlflow-{_artifact_key(name)}",
                             description=f"The MLflow run of stage `{name}` (params, metrics, artifacts).")
        log.info("%s: MLflow run %s (%s)", name, run_id, url)
        yield SimpleNamespace(cfg=cfg, client=client, run_id=run_id, log=log, folder=out)


class EpochLog:
    """Engine callback: one Prefect log line per epoch (loss terms, img/s, ETA), and a line at most every
    `every` seconds between syncs (the priors report only those)."""

    def __init__(self, log, epochs: int, every: float = 30.0):
        self.log, self.epochs, self.every = log, epochs, every
        self.last, self.seconds = time.monotonic(), []

    def on_epoch(self, record: dict) -> None:
        """Epoch N/E: loss, reconstruction, KL, img/s, ETA."""
        self.seconds.append(record.get("seconds", 0.0))
        eta = (self.epochs - record["epoch"]) * sum(self.seconds) / len(self.seconds)
        terms = ", ".join(f"{k} {record[k]:.4g}" for k in ("loss", "reconstruction", "kl", "vq") if k in record)
        self.log.info("epoch %d/%d: %s, %.0f img/s, ETA %.0f s", record["epoch"], self.epochs, terms,
                      record.get("img_per_s", 0.0), eta)
        self.last = time.monotonic()

    def on_log(self, step: int, record: dict) -> None:
        """Step N: the record's numbers, throttled to one line per `every` seconds."""
        if time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            self.log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                          if isinstance(v, float)))


def watched(cfg: Config) -> Config:
    """The config a stage trains with: no progress bar when stderr is not a terminal (a worker), Prefect logs instead."""
    return cfg if sys.stderr.isatty() else apply_sets(cfg, ["train.progress=false"])


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
    from pipelines.tracking import log_params
    from pipelines.workspace import workspace

    with stage(config, run, "prepare_data", prepare_key(config)) as st:
        manifest, folder = prepare(st.cfg, workspace(st.cfg) / "data")
        log_params(st.client, st.run_id, {f"data.split.{k}.n": str(v["n"]) for k, v in manifest["splits"].items()})
        st.client.log_artifact(st.run_id, str(folder / MANIFEST_FILE))
        st.log.info("data %s: %s", manifest["manifest_hash"][:12],
                    ", ".join(f"{k} {v['n']}" for k, v in manifest["splits"].items()))
    return {"manifest_hash": manifest["manifest_hash"], "folder": str(folder), "run_id": st.run_id}


@task(name="train", cache_key_fn=_key_fn(train_key), persist_result=True, result_serializer="json", retries=1,
      retry_condition_fn=_transient)
def train(config: str, data: dict, run: dict) -> dict:
    """Train on the prepared split; a re-run or retry with the same key resumes from its checkpoint."""
    from core.engine import Trainer
    from core.manifest import load_prepared
    from pipelines.tracking import MetricsLogger, log_metrics

    with stage(config, run, "train", train_key(config, data)) as st:
        run_dir, client, run_id = st.folder, st.client, st.run_id
        if (run_dir / WEIGHTS_FILE).exists():
            st.log.info("weights already trained in %s (an earlier or concurrent run); reusing them", run_dir)
        else:
            resume = (run_dir / CHECKPOINT_FILE).exists()
            if resume:  # same key, so same weights-relevant config; bookkeeping options come from the run dir
                st.log.info("resuming %s from its last checkpoint", run_dir)
            cfg = watched(read_run_config(run_dir) if resume else st.cfg)
            if cfg.train.nproc > 1:
                from pipelines.ddp import train_ddp

                train_ddp(cfg, run_dir, data["folder"], resume, run_id, st.log)
            else:
                trainer = Trainer(cfg, run_dir, resume=resume, train_images=load_prepared(data["folder"])["train"],
                                  callbacks=[MetricsLogger(client, run_id, constant=constant_terms(cfg)),
                                             EpochLog(st.log, cfg.train.epochs)])
                trainer.fit()
        records = read_metrics(run_dir)
        if records:
            log_metrics(client, run_id, {f"final/{k}": v for k, v in records[-1].items()
                                         if k not in constant_terms(st.cfg)})
        _loss_curve(run_dir)
        for name in ("config.yaml", "plugins.json", WEIGHTS_FILE, METRICS_FILE, "loss_curve.png"):
            client.log_artifact(run_id, str(run_dir / name))
        client.log_artifact(run_id, str(run_dir / CHECKPOINT_FILE), "checkpoints")
    return {"run_dir": str(run_dir), "weights_sha256": file_sha256(run_dir / WEIGHTS_FILE), "run_id": run_id}


def constant_terms(cfg: Config) -> set[str]:
    """Engine record keys that stay constant in this run (already params): lr without a schedule, a constant beta."""
    from core.beta import schedule_class

    constant = set()
    if cfg.train.lr_schedule == "constant" and not cfg.train.warmup_steps:
        constant.add("lr")
    if schedule_class(cfg.train.beta).constant:
        constant.add("beta")
    return constant


@task(name="train_features", cache_key_fn=_key_fn(train_features_key), persist_result=True,
      result_serializer="json")
def train_features(config: str, data: dict, run: dict) -> dict:
    """The offline feature network for FID/KID: a small classifier trained on the data, registered with its accuracy."""
    from core.data import open_dataset
    from core.manifest import load_prepared
    from core.sample_quality import FEATURES_INFO, FEATURES_WEIGHTS, save_feature_net, train_feature_net
    from pipelines.registry import register_features
    from pipelines.tracking import log_metrics

    cfg = _cfg(config)
    q = cfg.quality
    dataset = open_dataset(cfg)
    if not q.enabled or dataset.labels("train") is None:
        reason = "quality.enabled is false" if not q.enabled else f"{cfg.data.dataset.name} has no class labels"
        return {"enabled": False, "reason": reason, "files": []}
    with stage(config, run, "train_features", train_features_key(config, data), "features") as st:
        folder, client, run_id = st.folder, st.client, st.run_id
        if not (folder / FEATURES_INFO).exists():
            splits = load_prepared(data["folder"])
            net, info = train_feature_net(splits["train"], dataset.labels("train"), splits["test"], dataset.labels("test"),
                                          epochs=q.feature_epochs, batch_size=q.feature_batch_size, lr=q.feature_lr,
                                          seed=q.seed, progress=cfg.train.progress)
            save_feature_net(folder, net, {**info, "data_manifest_hash": data["manifest_hash"]})
        info = json.loads((folder / FEATURES_INFO).read_text())
        log_metrics(client, run_id, {f"features/{k}": v for k, v in info.items()})
        st.log.info("feature network: test accuracy %.4f", info["accuracy"])
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

    with stage(config, run, "evaluate", evaluate_key(config, data, trained, features)) as st:
        cfg, out = st.cfg, st.folder / "eval.json"
        if out.exists():  # written last and atomically: a concurrent run of the same key finished it
            metrics = json.loads(out.read_text())
        else:
            model, _ = load_model(trained["run_dir"], device="auto")
            splits = load_prepared(data["folder"])
            test = to_unit_float(splits["test"])
            metrics = run_eval(model, test, cfg.eval, **known_factors(cfg))
            if features.get("enabled"):
                import torch

                n = min(cfg.quality.samples, len(test))
                fake = model.generate(n, torch.Generator().manual_seed(cfg.quality.seed)).cpu()  # (n, C, H, W)
                metrics.update(sample_quality(fake, test, cfg, features, splits["train"]))
            write_text(out, json.dumps(metrics, indent=2))
        publish_metrics(st, metrics)
    return {"path": str(out), "metrics_sha256": file_sha256(out), "run_id": st.run_id}


# evaluation outputs that are counts or settings, not measurements: MLflow params, not metrics
EVAL_CONSTANTS = ("examples", "dims", "latent_dim", "active_threshold", "iwae_k", "quality/samples",
                  "quality/feature_net")


def publish_metrics(st: SimpleNamespace, metrics: dict) -> None:
    """An evaluate stage's metrics: the measurements as MLflow metrics, the constants as params, eval.json as an
    artifact, and one Prefect log line per headline metric."""
    from pipelines.tracking import log_metrics, log_params, set_tags

    constants = {k: metrics[k] for k in EVAL_CONSTANTS if k in metrics}
    log_params(st.client, st.run_id, {f"eval/{k}": str(v) for k, v in constants.items()})
    if "quality/feature_net" in metrics:
        set_tags(st.client, st.run_id, {"quality.feature_net": metrics["quality/feature_net"]})
    log_metrics(st.client, st.run_id, {f"eval/{k}": v for k, v in metrics.items() if k not in constants})
    st.client.log_artifact(st.run_id, str(st.folder / "eval.json"))
    for key, value in headline(metrics).items():
        if key.count("/") < 2:  # per-factor breakdowns stay in MLflow
            st.log.info("%-28s %.6g", key, value)


def headline(metrics: dict) -> dict[str, float]:
    """The scalar measurements of an eval.json (no constants, no per-dimension lists)."""
    return {k: float(v) for k, v in metrics.items()
            if k not in EVAL_CONSTANTS and isinstance(v, (int, float)) and not isinstance(v, bool)}


@task(name="render", cache_key_fn=_key_fn(render_key), persist_result=True, result_serializer="json")
def render(config: str, data: dict, trained: dict, run: dict) -> dict:
    """Reconstruction, sample and interpolation grids, then the configured renderers (latent traversals, ...)."""
    from core.checkpoint import load_model
    from core.interfaces import to_unit_float
    from core.manifest import load_prepared
    from pipelines import render as grids

    with stage(config, run, "render", render_key(config, data, trained)) as st:
        cfg, client, run_id, folder = st.cfg, st.client, st.run_id, st.folder
        model, _ = load_model(trained["run_dir"], device="auto")
        test = to_unit_float(load_prepared(data["folder"])["test"])
        paths = [grids.reconstructions(model, test, 32, folder / "reconstructions.png"),
                 grids.samples(model, 64, cfg.eval.seed, folder / "samples.png"),
                 grids.interpolations(model, test, 8, 10, cfg.eval.seed, folder / "interpolations.png")]
        paths += grids.render_all(model, cfg, test, folder)  # traversals, phase diagram, ... (cfg.render)
        for path in paths:
            sub = path.parent.relative_to(folder).as_posix()
            client.log_artifact(run_id, str(path), "images" if sub == "." else f"images/{sub}")
        st.log.info("rendered %d images under %s", len(paths), folder)
    return {"folder": str(folder), "files": [str(p) for p in paths], "run_id": run_id}


@task(name="register", cache_key_fn=_key_fn(register_key), persist_result=True, result_serializer="json")
def register(config: str, data: dict, trained: dict, evaluated: dict, run: dict) -> dict:
    """Log the model (python_function flavor) and register it; promote on the configured metric."""
    from pipelines.registry import register as register_model

    metrics = json.loads(Path(evaluated["path"]).read_text())
    lineage = {"data_manifest_hash": data["manifest_hash"], "parent_model_version": "",
               "train_run_id": trained["run_id"], "weights_sha256": trained["weights_sha256"]}
    with stage(config, run, "register", register_key(config, data, trained, evaluated)) as st:
        info = register_model(st.client, st.run_id, Path(trained["run_dir"]), st.cfg, metrics, lineage)
        log_registered(st, info)
    return {**info, "run_id": st.run_id}


def log_registered(st: SimpleNamespace, info: dict) -> None:
    """A Prefect log line and link artifact for a registered version."""
    from prefect.artifacts import create_link_artifact

    from pipelines.tracking import model_version_url

    url = model_version_url(info["name"], info["version"])
    how = "reused" if info.get("reused") else "registered"
    st.log.info("%s %s version %d%s", how, info["name"], info["version"], " (champion)" if info.get("champion") else "")
    create_link_artifact(link=url, link_text=f"{info['name']} v{info['version']}", key="mlflow-model-version",
                         description="The registered model version in the MLflow registry.")


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


def _still_valid(stage_name: str, result: dict, client) -> bool:
    """Whether a cached stage's files are still on disk and the MLflow objects it names (its run, a registered
    version) still exist in this store; else the stage must run again."""
    from mlflow.exceptions import MlflowException

    paths = {"prepare_data": lambda: [Path(result["folder"]) / "manifest.json"],
             "train": lambda: [Path(result["run_dir"]) / WEIGHTS_FILE],
             "evaluate": lambda: [Path(result["path"])]}
    # the other stages list their files under "files"
    files = paths[stage_name]() if stage_name in paths else [Path(p) for p in result.get("files", [])]
    if not all(p.exists() for p in files):
        return False
    try:
        if result.get("run_id") and client.get_run(result["run_id"]).info.lifecycle_stage != "active":
            return False
        if result.get("name") and result.get("version"):  # a registered version (model, feature network)
            client.get_model_version(result["name"], str(result["version"]))
        for prior in (result.get("priors") or {}).values():
            client.get_model_version(prior["name"], str(prior["version"]))
    except MlflowException:
        return False
    return True


def resolve_config(config_path: str, overrides: list[str] | None, config: Config | dict | None = None) -> Config:
    """The run's config: `config` (the structured flow parameter, e.g. edited in the Prefect UI form) when given,
    else the YAML at config_path, read now; then the overrides."""
    if config is None:
        return load_config(config_path, overrides or [])
    raw = config.model_dump(mode="json") if isinstance(config, Config) else dict(config)
    return apply_sets(validate(raw, source="the config parameter"), overrides or [])


class Pipeline:
    """One pipeline run: its config, its MLflow parent run, and what each stage did (ran or cached, its run).

    Stages run through it so that their Prefect records live in this workspace, and a cached result whose files
    or MLflow objects are gone runs again."""

    def __init__(self, config_path: str, overrides: list[str] | None, name: str, config: Config | dict | None = None):
        """Resolve the config, end runs of dead processes, and start the MLflow parent run."""
        from core.engine import resolve_device
        from pipelines.tracking import (experiment_id, flatten, get_client, log_params, reap_dead_runs, run_tags,
                                        start_run)
        from pipelines.processes import end_with_parent
        from pipelines.workspace import result_storage

        end_with_parent()
        self.cfg = resolve_config(config_path, overrides, config)
        self.config = canonical_json(self.cfg)
        self.client = get_client()
        exp = experiment_id(self.client, self.cfg.tracking.experiment)
        self.log = run_logger()
        for run_id in reap_dead_runs(self.client, exp):
            self.log.warning("MLflow run %s belonged to a process that died; marked KILLED", run_id)
        tags = run_tags(self.cfg, str(resolve_device(self.cfg.train.device)))
        parent = start_run(self.client, exp, f"{name} {Path(config_path).stem}", tags=tags)
        log_params(self.client, parent, flatten(self.cfg.model_dump(mode="json")))
        self.run = {"experiment_id": exp, "parent_id": parent, "tags": tags}
        self.storage = result_storage(self.cfg)
        self.status: dict[str, str] = {}
        self.runs: dict[str, str] = {}

    def _task(self, task_):
        return task_.with_options(result_storage=self.storage)

    def submit(self, task_, *args):
        """Start a stage in the background (a Prefect future)."""
        return self._task(task_).submit(self.config, *args, self.run)

    def collect(self, name: str, task_, future, *args) -> dict:
        """The result of a submitted stage (see `stage`)."""
        future.wait()
        return self._finish(name, task_, future.state, args)

    def stage(self, name: str, task_, *args) -> dict:
        """Run a stage (config first, the run last) and return its result; a cached result that is no longer
        valid here runs again with refresh_cache."""
        return self._finish(name, task_, self._task(task_)(self.config, *args, self.run, return_state=True), args)

    def _finish(self, name: str, task_, state: State, args: tuple) -> dict:
        result = state.result()  # raises the stage's own error if it failed
        if state.name == "Cached" and not _still_valid(task_.name, result, self.client):
            self.log.info("%s: the cached result's files or MLflow objects are gone; running it again", name)
            state = self._task(task_).with_options(refresh_cache=True)(self.config, *args, self.run, return_state=True)
            result = state.result()
        self.status[name] = "cached" if state.name == "Cached" else "ran"
        self.runs[name] = result.get("run_id", "")
        return result

    def close(self, out: dict, error: BaseException | None = None) -> None:
        """Tag the parent run with each stage's status, copy the headline metrics onto it, publish the Prefect
        summary, and end it FINISHED, KILLED (interrupted) or FAILED."""
        from pipelines.tracking import end_failed, log_metrics, set_tags

        parent = self.run["parent_id"]
        tags = {f"stage.{k}": v for k, v in self.status.items()}
        tags["vaeflow.all_cached"] = str(bool(self.status) and all(v == "cached" for v in self.status.values())).lower()
        metrics = headline(json.loads(Path(out["eval"]).read_text())) if out.get("eval") else {}
        if "model" in out:
            tags["registered_model"] = f"{out['model']['name']}/{out['model']['version']}"
        set_tags(self.client, parent, tags)
        log_metrics(self.client, parent, metrics)
        if error is not None:
            end_failed(self.client, parent, error)
            return
        self.client.set_terminated(parent, "FINISHED")
        self.summary(out, metrics)

    def summary(self, out: dict, metrics: dict) -> None:
        """A markdown artifact on the flow run: each stage (ran or cached, its MLflow run), the key metrics and the
        registered version."""
        from prefect.artifacts import create_markdown_artifact
        from prefect.context import FlowRunContext

        from pipelines.tracking import model_version_url, run_url, tracking_uri

        if FlowRunContext.get() is None:  # run_pipeline called directly, not as a flow: no flow run to attach it to
            return
        exp = self.run["experiment_id"]
        lines = [f"MLflow store: `{tracking_uri()}`; pipeline run [{self.run['parent_id']}]"
                 f"({run_url(exp, self.run['parent_id'])})", "", "| stage | status | MLflow run |", "|---|---|---|"]
        lines += [f"| {name} | {how} | [{self.runs.get(name, '')[:12]}]({run_url(exp, self.runs[name])}) |"
                  if self.runs.get(name) else f"| {name} | {how} | - |" for name, how in self.status.items()]
        if metrics:
            lines += ["", "| metric | value |", "|---|---|"] + [f"| {k} | {v:.6g} |" for k, v in metrics.items()]
        if "model" in out:
            m = out["model"]
            lines += ["", f"Registered [**{m['name']}** version {m['version']}]({model_version_url(m['name'], m['version'])})"
                      + (" (champion)" if m.get("champion") else "") + f": `models:/{m['name']}/{m['version']}`"]
        create_markdown_artifact("\n".join(lines), key="vaeflow-pipeline-summary",
                                 description=f"vaeflow pipeline run of {self.cfg.tracking.model_name}")

    def outcome(self) -> dict:
        """The start of a pipeline's result: its MLflow run and each stage's status."""
        return {"mlflow_run_id": self.run["parent_id"], "stages": self.status}


def run_pipeline(config_path: str, overrides: list[str] | None = None, until: str = "register",
                 config: Config | dict | None = None) -> dict:
    """Run the stages up to and including `until`, as one MLflow parent run; cached stages are skipped."""
    if until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}, got {until!r}")
    stop = STAGES.index(until)
    p = Pipeline(config_path, overrides, "vae_pipeline" if until == "register" else f"{until}_flow", config)
    out = p.outcome()
    try:
        data = out["data"] = p.stage("prepare_data", prepare_data)
        if stop >= 1:
            trained = p.stage("train", train, data)
            out["run_dir"] = trained["run_dir"]
        if stop >= 2:
            features = p.stage("train_features", train_features, data)
            futures = {"evaluate": p.submit(evaluate, data, trained, features)}
            if stop >= 3:
                futures["render"] = p.submit(render, data, trained)
            evaluated = p.collect("evaluate", evaluate, futures["evaluate"], data, trained, features)
            out["eval"] = evaluated["path"]
            if stop >= 3:
                out["images"] = p.collect("render", render, futures["render"], data, trained)["files"]
        if stop >= 4:
            out["model"] = p.stage("register", register, data, trained, evaluated)
    except BaseException as exc:
        p.close(out, exc)
        raise
    p.close(out)
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
