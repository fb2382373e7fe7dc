"""The pipeline: one graph of cached stages, run as a Prefect flow, every stage tracked as an MLflow run.

    prepare_data -> train -> [the model kind's stages] -> train_features -> (evaluate || render) -> register

The common stages are defined here, once. A model kind names the stage plugins it adds (Model.stages; the models
with code grids add extract_codes, train_prior per level and sample, plugins/stages.py), inserted after train.
Each stage is one Prefect task whose cache key covers its own config sections, its inputs' identities (the data
manifest, the weights, the codes, ...) and the code of the plugins it runs, scoped to this workspace and tracking
store: an unchanged re-run is all cache hits, an `eval` change re-runs only evaluate and register, a `train`
change leaves prepare_data cached. `until` runs a stage and what it needs; `force` re-runs stages and what depends
on them. Stages exchange paths and hashes (JSON), never models. MLflow's active run is thread-local, so run ids
are passed explicitly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from prefect import flow, get_run_logger, task
from prefect.states import State

from vaeflow.core.checkpoint import CHECKPOINT_FILE, METRICS_FILE, WEIGHTS_FILE, read_metrics, read_run_config
from vaeflow.core.config import Config, apply_sets, canonical_json, config_hash, hashed_dump, load_config, validate
from vaeflow.core.cpu import cpu_share
from vaeflow.core.errors import ConfigError, VaeflowError
from vaeflow.core.interfaces import Stage, StageContext, file_sha256
from vaeflow.pipelines.processes import failpoint

FLOW_NAME = "vaeflow_pipeline"
MODEL_INPUT = "train"  # the input naming the trained model: train's result, or a later stage's that refines it


def _digest(*parts: object) -> str:
    """sha256 of the canonical JSON of the parts, shortened for folder names."""
    return hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()[:32]


def _cfg(config: str) -> Config:
    return validate(json.loads(config))


def code_identity(cfg: Config, *sections: str, renderers: bool = False) -> list[list]:
    """[family, name, package, version, code_sha256] of each plugin the config selects in `sections` (and of the
    configured renderers): in a stage key, an edited plugin (installed or editable) re-runs the stage."""
    from vaeflow.core.checkpoint import plugins_used
    from vaeflow.core.registry import get_registry

    found = [[i["family"], i["name"], i["package"], i["version"], i["code_sha256"]]
             for i in plugins_used(cfg, sections).values()]
    if renderers:
        registry = get_registry()
        for spec in cfg.render.renderers:
            e = registry.get("renderer", spec.name)
            found.append(["renderer", e.name, e.package, e.version, e.code_sha256()])
    return found


def run_logger():
    """The Prefect run logger (its lines show in the UI), or a plain logger outside a flow or task run."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger("vaeflow")


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
        failpoint("train.epoch")  # after the checkpoint and the epoch's metrics are committed

    def on_log(self, step: int, record: dict) -> None:
        """Step N: the record's numbers, throttled to one line per `every` seconds."""
        if time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            self.log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                          if isinstance(v, float)))


def watched(cfg: Config) -> Config:
    """The config a stage trains with: no progress bar when stderr is not a terminal (a worker), Prefect logs instead."""
    return cfg if sys.stderr.isatty() else apply_sets(cfg, ["train.progress=false"])


def constant_terms(cfg: Config) -> set[str]:
    """Engine record keys that stay constant in this run (already params): lr without a schedule, a constant beta."""
    from vaeflow.core.beta import schedule_class

    constant = set()
    if cfg.train.lr_schedule == "constant" and not cfg.train.warmup_steps:
        constant.add("lr")
    if schedule_class(cfg.train.beta).constant:
        constant.add("beta")
    return constant


# --- the common stages --------------------------------------------------------------------------
class PrepareData(Stage):
    """Load, check and cache the splits; write the data manifest."""

    name = "prepare_data"
    sections = ("data",)
    code = ("data",)
    folder = "data"
    retries = 3  # a download may fail for a while

    def key_parts(self, cfg: Config, inputs: dict) -> list:
        """The sha256 of every source file (of the splits, for a dataset that names no files): a change invalidates
        the cache."""
        from vaeflow.core.manifest import content_identity

        return content_identity(cfg)

    def run(self, ctx: StageContext, inputs: dict) -> dict:
        """Prepare the splits into the workspace's data folder (keyed by the manifest hash, shared by every key)."""
        from vaeflow.core.manifest import MANIFEST_FILE, prepare
        from vaeflow.pipelines.workspace import workspace

        manifest, folder = prepare(ctx.cfg, workspace(ctx.cfg) / "data")
        ctx.log_params({f"data.split.{k}.n": str(v["n"]) for k, v in manifest["splits"].items()})
        ctx.log_artifact(folder / MANIFEST_FILE)
        ctx.log.info("data %s: %s", manifest["manifest_hash"][:12],
                     ", ".join(f"{k} {v['n']}" for k, v in manifest["splits"].items()))
        return {"manifest_hash": manifest["manifest_hash"], "sha256": manifest["manifest_hash"], "folder": str(folder),
                "files": [str(folder / MANIFEST_FILE)]}

    def summary(self, result: dict) -> dict:
        """The prepared data (folder and manifest hash)."""
        return {"data": result}


# train options that change how a run is watched, never the weights it produces
NOT_IN_TRAIN_KEY = ("progress", "log_every", "checkpoint_every", "num_threads")


class Train(Stage):
    """Train on the prepared split; a re-run or retry with the same key resumes from its checkpoint."""

    name = "train"
    provides = "model"
    inputs = ("prepare_data",)
    reads = ("model", "train")  # less watch-only and bookkeeping options
    code = ("model", "train")
    retries = 1

    def key_parts(self, cfg: Config, inputs: dict) -> list:
        """The model section (less the options its kind marks watch-only), the train section (less bookkeeping
        options) and the model's architecture signature."""
        from vaeflow.core.checkpoint import architecture_signature
        from vaeflow.core.model import build_model, model_class

        model_section = hashed_dump(cfg)["model"]
        for dotted in model_class(cfg).watch_only:  # e.g. a warning threshold: decides what is logged, not the weights
            *parents, last = dotted.split(".")
            node = model_section
            for key in parents:
                node = node.get(key) or {}
            node.pop(last, None)
        train_section = {k: v for k, v in hashed_dump(cfg)["train"].items() if k not in NOT_IN_TRAIN_KEY}
        return [model_section, train_section, architecture_signature(build_model(cfg))]

    def run(self, ctx: StageContext, inputs: dict) -> dict:
        """Fit (or resume, or reuse finished weights), then log the final record, the curve and the weights."""
        from vaeflow.core.engine import Trainer
        from vaeflow.core.manifest import load_prepared

        data, run_dir = inputs["prepare_data"], ctx.folder
        if (run_dir / WEIGHTS_FILE).exists():
            ctx.log.info("weights already trained in %s (an earlier or concurrent run); reusing them", run_dir)
        else:
            resume = (run_dir / CHECKPOINT_FILE).exists()
            if resume:  # same key, so same weights-relevant config; bookkeeping options come from the run dir
                ctx.log.info("resuming %s from its last checkpoint", run_dir)
            cfg = watched(read_run_config(run_dir) if resume else ctx.cfg)
            if cfg.train.nproc > 1:
                from vaeflow.pipelines.ddp import train_ddp

                train_ddp(cfg, run_dir, data["folder"], resume, ctx.run_id, ctx.log)
            else:
                Trainer(cfg, run_dir, resume=resume, train_images=load_prepared(data["folder"])["train"],
                        callbacks=ctx.callbacks(cfg.train.epochs, constant_terms(cfg))).fit()
        records = read_metrics(run_dir)
        if records:
            ctx.log_metrics({f"final/{k}": v for k, v in records[-1].items() if k not in constant_terms(ctx.cfg)})
        _loss_curve(run_dir)
        for name in ("config.yaml", "plugins.json", WEIGHTS_FILE, METRICS_FILE, "loss_curve.png"):
            ctx.log_artifact(run_dir / name)
        ctx.log_artifact(run_dir / CHECKPOINT_FILE, "checkpoints")
        weights = file_sha256(run_dir / WEIGHTS_FILE)
        return {"run_dir": str(run_dir), "weights_sha256": weights, "sha256": weights,
                "files": [str(run_dir / WEIGHTS_FILE)]}

    def summary(self, result: dict) -> dict:
        """The trained run directory."""
        return {"run_dir": result["run_dir"]}


QUALITY_SCORING = {"samples", "kid_subsets", "kid_subset_size"}  # quality options of evaluate only (seed: both)


class TrainFeatures(Stage):
    """The offline feature network for FID/KID: a small classifier trained on the data, registered with its
    accuracy. Without labels, or with quality.enabled false, it records why and does nothing."""

    name = "train_features"
    inputs = ("prepare_data",)
    reads = ("quality",)  # the feature network's options
    folder = "features"

    def key_parts(self, cfg: Config, inputs: dict) -> list:
        """The quality options of the feature network (not those that only score samples)."""
        return [cfg.quality.model_dump(mode="json", exclude=QUALITY_SCORING)]

    def run(self, ctx: StageContext, inputs: dict) -> dict:
        """Train the classifier (unless trained), log its accuracy and register it as features-<dataset>."""
        from vaeflow.core.data import open_dataset
        from vaeflow.core.manifest import load_prepared
        from vaeflow.core.sample_quality import FEATURES_INFO, FEATURES_WEIGHTS, save_feature_net, train_feature_net
        from vaeflow.pipelines.registry import register_features

        cfg, data, folder = ctx.cfg, inputs["prepare_data"], ctx.folder
        q, dataset = cfg.quality, open_dataset(cfg)
        if not (folder / FEATURES_INFO).exists():
            splits = load_prepared(data["folder"])
            net, info = train_feature_net(splits["train"], dataset.labels("train"), splits["test"], dataset.labels("test"),
                                          epochs=q.feature_epochs, batch_size=q.feature_batch_size, lr=q.feature_lr,
                                          seed=q.seed, progress=cfg.train.progress)
            save_feature_net(folder, net, {**info, "data_manifest_hash": data["manifest_hash"]})
        info = json.loads((folder / FEATURES_INFO).read_text())
        ctx.log_metrics({f"features/{k}": v for k, v in info.items()})
        ctx.log.info("feature network: test accuracy %.4f", info["accuracy"])
        registered = register_features(ctx.client, ctx.run_id, folder, f"features-{cfg.data.dataset.name}", info)
        weights = file_sha256(folder / FEATURES_WEIGHTS)
        return {"enabled": True, "folder": str(folder), "weights_sha256": weights, "sha256": weights,
                "accuracy": info["accuracy"], **registered,
                "files": [str(folder / FEATURES_WEIGHTS), str(folder / FEATURES_INFO)]}

    @classmethod
    def skipped(cls, cfg: Config) -> str | None:
        """Why the feature network is not trained for this config (None: it is)."""
        from vaeflow.core.data import open_dataset

        if not cfg.quality.enabled:
            return "quality.enabled is false"
        if open_dataset(cfg).labels("train") is None:
            return f"{cfg.data.dataset.name} has no class labels"
        return None


def code_priors(model, inputs: dict) -> dict:
    """{level: trained code prior} from the optional train_prior input (empty without one)."""
    from vaeflow.core.priors import load_priors

    return load_priors(model, inputs.get("train_prior") or {})


def draw_samples(model, priors: dict, n: int, cfg: Config, seed: int):
    """n new images (n, C, H, W): from the code priors (prior.sample's temperature and top-k) for a model with code
    grids, else from the model's own prior."""
    import torch

    if priors:
        from vaeflow.core.codes import sample_images

        return sample_images(model, priors, n, cfg.prior.sample.temperature, cfg.prior.sample.top_k, seed).cpu()
    return model.generate(n, torch.Generator().manual_seed(seed)).cpu()


class Evaluate(Stage):
    """Test-split metrics of the trained model (and its code priors' held-out NLL), and FID/KID of its samples in
    the feature network's space."""

    name = "evaluate"
    inputs = ("prepare_data", "train", "train_features")
    optional = ("train_prior",)
    sections = ("eval", "quality")
    reads = ("prior.sample",)
    code = ("model", "prior")
    heavy = False

    def key_parts(self, cfg: Config, inputs: dict) -> list:
        """prior.sample (how samples are drawn) when the model has code grids, and the code of every metric plugin
        that applies to the model (an edited or a newly installed metric re-runs evaluate)."""
        from vaeflow.core.metrics import applicable_metrics

        metrics = [[e.name, e.package, e.version, e.code_sha256()] for e in applicable_metrics(cfg.model.capabilities)]
        return [cfg.prior.sample.model_dump(mode="json") if cfg.model.capabilities.discrete else None, metrics]

    def run(self, ctx: StageContext, inputs: dict) -> dict:
        """eval.json (written last and atomically), its metrics on MLflow; with code priors a reconstruction grid."""
        from vaeflow.core.checkpoint import load_model, write_text
        from vaeflow.core.data import known_factors
        from vaeflow.core.interfaces import to_unit_float
        from vaeflow.core.manifest import load_prepared
        from vaeflow.core.metrics import evaluate as run_eval
        from vaeflow.pipelines.render import reconstructions

        cfg, out, features = ctx.cfg, ctx.folder / "eval.json", inputs["train_features"]
        files = [out]
        model, _ = load_model(inputs["train"]["run_dir"], device="auto")
        splits = load_prepared(inputs["prepare_data"]["folder"])
        test = to_unit_float(splits["test"])
        if out.exists():  # written last and atomically: a concurrent run of the same key finished it
            metrics = json.loads(out.read_text())
        else:
            metrics = run_eval(model, test, cfg.eval, **known_factors(cfg))
            for level, p in (inputs.get("train_prior") or {}).items():
                metrics.update({f"prior_{level}_{k}": v for k, v in p["test"].items()})
            if features.get("enabled"):
                n = min(cfg.quality.samples, len(test))
                fake = draw_samples(model, code_priors(model, inputs), n, cfg, cfg.quality.seed)  # (n, C, H, W)
                metrics.update(sample_quality(fake, test, cfg, features, splits["train"]))
            write_text(out, json.dumps(metrics, indent=2))
        publish_metrics(ctx, metrics)
        if inputs.get("train_prior"):  # the VAE's render stage draws its reconstructions
            files.append(reconstructions(model, test, 32, ctx.folder / "reconstructions.png"))
            ctx.log_artifact(files[-1], "images")
        metrics_sha256 = file_sha256(out)
        return {"path": str(out), "metrics_sha256": metrics_sha256, "sha256": metrics_sha256,
                "files": [str(f) for f in files]}

    def summary(self, result: dict) -> dict:
        """The eval.json path."""
        return {"eval": result["path"]}


QUALITY_CONSTANTS = ("quality/samples", "quality/feature_net")  # sample quality settings, not measurements


def eval_constants() -> set[str]:
    """Evaluation outputs that are counts or settings, not measurements (MLflow params, not metrics): what the
    metric plugins declare as params, and the sample-quality settings."""
    from vaeflow.core.metrics import param_keys

    return param_keys() | set(QUALITY_CONSTANTS)


def publish_metrics(ctx: StageContext, metrics: dict) -> None:
    """An evaluate stage's metrics: the measurements as MLflow metrics, the constants as params, eval.json as an
    artifact, and one Prefect log line per headline metric (those the model's metrics declare, and FID/KID)."""
    from vaeflow.core.metrics import headline_keys
    from vaeflow.pipelines.tracking import set_tags

    constants = {k: metrics[k] for k in eval_constants() if k in metrics}
    ctx.log_params({f"eval/{k}": str(v) for k, v in constants.items()})
    if "quality/feature_net" in metrics:
        set_tags(ctx.client, ctx.run_id, {"quality.feature_net": metrics["quality/feature_net"]})
    ctx.log_metrics({f"eval/{k}": v for k, v in metrics.items() if k not in constants})
    ctx.log_artifact(ctx.folder / "eval.json")
    scalars = headline(metrics)
    shown = [k for k in headline_keys(ctx.cfg.model.capabilities) if k in scalars]
    for key in shown + [k for k in scalars if k.startswith("quality/") and k.count("/") == 1]:
        ctx.log.info("%-28s %.6g", key, scalars[key])


def headline(metrics: dict) -> dict[str, float]:
    """The scalar measurements of an eval.json (no constants, no per-dimension lists)."""
    constants = eval_constants()
    return {k: float(v) for k, v in metrics.items()
            if k not in constants and isinstance(v, (int, float)) and not isinstance(v, bool)}


def sample_quality(fake, test, cfg: Config, features: dict, train=None) -> dict:
    """FID and KID of generated images (n, C, H, W) against as many test images, naming the feature network;
    plus the floor: as many real training images against the same test images."""
    from vaeflow.core.interfaces import to_unit_float
    from vaeflow.core.sample_quality import load_feature_net, quality_scores

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


class Render(Stage):
    """Reconstruction, sample and interpolation grids of a model with latent vectors, then the configured renderers
    (latent traversals, phase diagrams; for code grids: codes resampled by the priors, code swaps, temperature
    sweeps, code-space interpolations)."""

    name = "render"
    inputs = ("prepare_data", "train")
    optional = ("train_prior",)
    sections = ("render",)
    code = ("model", "prior")
    heavy = False

    def key_parts(self, cfg: Config, inputs: dict) -> list:
        """The configured renderers' code."""
        return code_identity(cfg, renderers=True)  # no sections: only the renderers

    def run(self, ctx: StageContext, inputs: dict) -> dict:
        """Every image under the stage folder, logged under images/ on its MLflow run."""
        from vaeflow.core.checkpoint import load_model
        from vaeflow.core.interfaces import to_unit_float
        from vaeflow.core.manifest import load_prepared
        from vaeflow.pipelines import render as grids

        cfg, folder = ctx.cfg, ctx.folder
        model, _ = load_model(inputs["train"]["run_dir"], device="auto")
        test = to_unit_float(load_prepared(inputs["prepare_data"]["folder"])["test"])
        priors = code_priors(model, inputs)
        paths = []
        if model.capabilities.continuous:
            paths += [grids.reconstructions(model, test, 32, folder / "reconstructions.png"),
                      grids.samples(model, 64, cfg.eval.seed, folder / "samples.png"),
                      grids.interpolations(model, test, 8, 10, cfg.eval.seed, folder / "interpolations.png")]
        paths += grids.render_all(model, cfg, test, folder, priors)  # traversals, phase diagram, ... (cfg.render)
        for path in paths:
            sub = path.parent.relative_to(folder).as_posix()
            ctx.log_artifact(path, "images" if sub == "." else f"images/{sub}")
        ctx.log.info("rendered %d images under %s", len(paths), folder)
        return {"folder": str(folder), "files": [str(p) for p in paths]}

    def summary(self, result: dict) -> dict:
        """The rendered image files."""
        return {"images": result["files"]}


class Register(Stage):
    """Log the model (python_function flavor) and register it, promoting it on the configured metric; with code
    priors, register each prior too, with lineage tags naming that exact version and codebook hash."""

    name = "register"
    inputs = ("prepare_data", "train", "evaluate")
    optional = ("extract_codes", "train_prior")
    sections = ("tracking",)

    def run(self, ctx: StageContext, inputs: dict) -> dict:
        """The registered (or reused) version, with its aliases set last."""
        from vaeflow.pipelines.registry import register as register_model
        from vaeflow.pipelines.registry import register_prior

        cfg, data, trained = ctx.cfg, inputs["prepare_data"], inputs["train"]
        metrics = json.loads(Path(inputs["evaluate"]["path"]).read_text())
        lineage = {"data_manifest_hash": data["manifest_hash"], "parent_model_version": "",
                   "train_run_id": trained["run_id"], "weights_sha256": trained["weights_sha256"]}
        if "extract_codes" in inputs:
            lineage["codebook_sha256"] = inputs["extract_codes"]["codebook_sha256"]
        priors = inputs.get("train_prior") or {}
        companions = (lambda v: {level: register_prior(ctx.client, ctx.run_id, Path(p["run_dir"]),
                                                       cfg.tracking.model_name, v, level)
                                 for level, p in priors.items()}) if priors else None
        info = register_model(ctx.client, ctx.run_id, Path(trained["run_dir"]), cfg, metrics, lineage,
                              companions=companions)
        log_registered(ctx, info)
        return info

    def summary(self, result: dict) -> dict:
        """The registered version."""
        return {"model": result}


COMMON_HEAD: tuple[type[Stage], ...] = (PrepareData, Train)
COMMON_TAIL: tuple[type[Stage], ...] = (TrainFeatures, Evaluate, Render, Register)


def log_registered(ctx: StageContext, info: dict) -> None:
    """A Prefect log line and link artifact for a registered version."""
    from prefect.artifacts import create_link_artifact

    from vaeflow.pipelines.tracking import model_version_url

    url = model_version_url(info["name"], info["version"])
    how = "reused" if info.get("reused") else "registered"
    ctx.log.info("%s %s version %d%s", how, info["name"], info["version"], " (champion)" if info.get("champion") else "")
    create_link_artifact(link=url, link_text=f"{info['name']} v{info['version']}", key="mlflow-model-version",
                         description="The registered model version in the MLflow registry.")


def _loss_curve(run_dir: Path) -> None:
    """loss_curve.png: per-epoch loss, reconstruction and KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vaeflow.core.checkpoint import atomic_write

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


# --- the graph ----------------------------------------------------------------------------------
class Graph:
    """The stages of one config, in run order: the common head, the model kind's stages, the common tail."""

    def __init__(self, cfg: Config):
        """Expand every stage class for this config and resolve each one's inputs to stage ids."""
        from vaeflow.core.model import model_class
        from vaeflow.core.registry import get_registry

        registry = get_registry()
        kind = model_class(cfg)
        extra = [registry.get("stage", name).cls for name in kind.stages]
        self.plugin = {cls.name: registry.get("stage", cls.name) for cls in extra}
        self.stages: list[Stage] = [s for cls in (*COMMON_HEAD, *extra, *COMMON_TAIL) for s in cls.expand(cfg)]
        self.by_id = {s.id: s for s in self.stages}
        self.groups: dict[str, list[str]] = {}
        for s in self.stages:
            self.groups.setdefault(s.name, []).append(s.id)
        self.expanded = {s.name for s in self.stages if s.param is not None}  # inputs of {param: result}
        self.sources: dict[str, dict[str, list[str]]] = {}  # stage id -> {input name: the stage ids it reads}
        self.needs: dict[str, list[str]] = {}
        model = None  # the latest stage so far whose result is the trained model (train, or a stage refining it)
        for s in self.stages:
            missing = [name for name in s.inputs if name not in self.groups]
            if missing:
                raise ConfigError([("model.kind", f"stage {s.id} needs the stage(s) {', '.join(missing)}, which "
                                    f"kind={cfg.model.kind} does not add (its stages: {', '.join(self.by_id)})")])
            self.sources[s.id] = {name: ([model] if name == MODEL_INPUT and model else self.groups[name])
                                  for name in (*s.inputs, *s.optional) if name in self.groups}
            self.needs[s.id] = [i for ids in self.sources[s.id].values() for i in ids]
            if s.provides == "model":
                model = s.id
        order = [s.id for s in self.stages]
        for s in self.stages:  # declared order must already be a topological order
            late = [d for d in self.needs[s.id] if order.index(d) > order.index(s.id)]
            if late:
                raise ConfigError([("model.kind", f"stage {s.id} needs {', '.join(late)}, which runs after it")])

    def names(self) -> list[str]:
        """Every stage id and every expanded stage's name (e.g. train_prior for train_prior_top, train_prior_bottom)."""
        return [*self.by_id, *sorted(self.expanded)]

    def resolve(self, name: str, what: str) -> list[str]:
        """The stage ids a name means (a stage, or every instance of an expanded one); a VaeflowError otherwise."""
        if name in self.by_id:
            return [name]
        if name in self.groups:
            return self.groups[name]
        raise VaeflowError(f"{what} {name!r}: this pipeline has the stages {', '.join(self.names())}")

    def upstream(self, ids: list[str]) -> list[str]:
        """The ids and everything they need, in run order."""
        todo, found = list(ids), set()
        while todo:
            i = todo.pop()
            if i not in found:
                found.add(i)
                todo += self.needs[i]
        return [s.id for s in self.stages if s.id in found]

    def downstream(self, ids: list[str]) -> list[str]:
        """The ids and everything that depends on them, in run order."""
        found = set(ids)
        for s in self.stages:
            if any(d in found for d in self.needs[s.id]):
                found.add(s.id)
        return [s.id for s in self.stages if s.id in found]

    def inputs_of(self, stage: Stage, results: dict) -> dict:
        """{input name: result}, or {param: result} for an expanded input, from the finished stages' results (the
        input `train` is the latest model: train's result, or that of a later stage that refines the model)."""
        return {name: ({self.by_id[i].param: results[i] for i in ids} if name in self.expanded else results[ids[0]])
                for name, ids in self.sources[stage.id].items()}

    def key(self, stage: Stage, cfg: Config, inputs: dict) -> str:
        """The stage's cache key: `<id>-<digest>` of its sections, key parts, inputs' identities and code (the
        code of the plugins its `code` sections select, and its own when it is a stage plugin)."""
        sources = self.sources[stage.id]
        identities = {name: ({p: self.by_id[f"{name}_{p}"].identity(r) for p, r in value.items()}
                             if name in self.expanded else [sources[name][0], self.by_id[sources[name][0]].identity(value)])
                      for name, value in inputs.items()}
        plugin = self.plugin.get(stage.name)
        own = [plugin.package, plugin.version, plugin.code_sha256()] if plugin else None
        return f"{stage.id}-" + _digest({s: config_hash(cfg, s) for s in stage.sections}, stage.key_parts(cfg, inputs),
                                        identities, code_identity(cfg, *stage.code) if stage.code else [], own)

    def check(self, cfg: Config, ids: list[str], source: str) -> None:
        """Each selected stage's own config check (e.g. a prior for every code level), before any run starts."""
        for cls in dict.fromkeys(type(self.by_id[i]) for i in ids):
            cls.check(cfg, source)


def stage_graph(cfg: Config) -> Graph:
    """The pipeline's stage graph for a config."""
    return Graph(cfg)


def stage_key(cfg: Config, stage_id: str, inputs: dict) -> str:
    """One stage's cache key (without the workspace scope) given its inputs' results, e.g. where train writes."""
    graph = stage_graph(cfg)
    return graph.key(graph.by_id[stage_id], cfg, inputs)


SECTIONS = ("data", "model", "train", "prior", "eval", "quality", "render", "tracking")  # in README order


def what_runs_again(graph: Graph, cfg: Config) -> list[tuple[str, list[str]]]:
    """[(a config change, the stages whose key it may change: those that read it and everything downstream)],
    from the stages' declared `sections` and `reads`; the code of a plugin counts as its section. Sections the
    config's model ignores (the code priors of a model without code grids) are left out."""
    declared = {s.id: set(s.sections) | set(s.reads) | set(s.code) for s in graph.stages}
    dotted = sorted({r for reads in declared.values() for r in reads if "." in r})
    rows, used = [], hashed_dump(cfg)
    for section in (s for s in SECTIONS if s in used):
        subs = [d for d in dotted if d.startswith(section + ".")]
        direct = [i for i, reads in declared.items() if section in reads]
        if direct:
            rows.append((f"`{section}`" + (f" (not {', '.join(f'`{d}`' for d in subs)})" if subs else ""),
                         graph.downstream(direct)))
        for sub in subs:
            rows.append((f"`{sub}`", graph.downstream([i for i, reads in declared.items() if sub in reads])))
    return rows


def describe(cfg: Config) -> str:
    """The stage graph of a config as markdown: a mermaid diagram and the "what runs again" table."""
    graph = stage_graph(cfg)
    lines = ["```mermaid", "flowchart LR"]
    for s in graph.stages:
        lines += [f"    {d} --> {s.id}" for d in graph.needs[s.id]]
    lines += ["```", "", "| change | runs again (the rest stays cached) |", "|---|---|"]
    lines += [f"| {change} | {', '.join(ids)} |" for change, ids in what_runs_again(graph, cfg)]
    return "\n".join(lines) + "\n"


# --- one Prefect task runs any stage --------------------------------------------------------------
def _stage_key(context, params) -> str:
    """Prefect's cache_key_fn: the stage key, scoped to this workspace and tracking store (never another's)."""
    from vaeflow.pipelines.workspace import scope

    cfg = _cfg(params["config"])
    graph = stage_graph(cfg)
    return f"{graph.key(graph.by_id[params['stage']], cfg, params['inputs'])}-{scope(cfg)}"


def _transient(task, task_run, state) -> bool:
    """Retry network-style failures, not user errors (missing files, bad config): those fail at once."""
    try:
        state.result()
    except VaeflowError:
        return False
    except Exception:
        return True
    return False


RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")  # where Prefect logs a run's failure (and its stack)


def _user_error_names() -> set[str]:
    """The class names of VaeflowError and every subclass loaded."""
    names, todo = set(), [VaeflowError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return names


class UserErrorLogs(logging.Filter):
    """Keeps a user error (a VaeflowError raised in a stage) to its message, without Prefect's stack traces.

    Prefect logs a failed run's exception with its stack (the task's "Task run failed with exception", the flow's
    "Encountered exception during execution": about a hundred lines). A user error's message says all there is to
    say, so those records lose their stack. With `echoed` (the CLI prints the message itself, last) they are dropped
    and the "Finished in state Failed(...)" lines name the error's kind instead of repeating its message, so the
    message is printed once."""

    def __init__(self):
        super().__init__("vaeflow-user-errors")
        self.echoed = False

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop or shorten the records of a user error; pass every other record as it is."""
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, VaeflowError):
            if self.echoed:
                return False
            record.msg, record.args = f"{type(exc).__name__}: {exc}", ()
            record.exc_info, record.exc_text = None, None
            return True
        if self.echoed and isinstance(record.msg, str) and record.msg.startswith("Finished in state Failed"):
            kind = next((m for m in re.findall(r"\b([A-Za-z_]\w*)(?::|\()", record.getMessage())
                         if m in _user_error_names()), None)
            if kind:
                record.msg, record.args = f"Finished in state Failed: {kind} (the error is printed below)", ()
        return True


USER_ERROR_LOGS = UserErrorLogs()


def quiet_user_errors(echoed: bool = False) -> None:
    """Install UserErrorLogs on Prefect's run loggers (once); `echoed`: the caller prints a user error's message."""
    USER_ERROR_LOGS.echoed = USER_ERROR_LOGS.echoed or echoed
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if USER_ERROR_LOGS not in logger.filters:
            logger.addFilter(USER_ERROR_LOGS)


def _artifact_key(text: str) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in text.lower())


@contextmanager
def stage_context(cfg: Config, run: dict, stage: Stage, key: str, fresh: bool) -> Iterator[StageContext]:
    """One stage's context: the workspace lock on its key (a second identical run waits, then reuses), its MLflow
    run (ended by how the block ends), a Prefect link artifact to that run, and its folder (emptied when fresh)."""
    from prefect.artifacts import create_link_artifact

    from vaeflow.pipelines.tracking import MetricsLogger, get_client, log_metrics, log_params, run_url, stage_run
    from vaeflow.pipelines.workspace import stage_lock, workspace

    client, log = get_client(), run_logger()
    folder = workspace(cfg) / (stage.folder or stage.name) / key.rsplit("-", 1)[1]
    with stage_lock(cfg, key, log), stage_run(client, run["experiment_id"], run["parent_id"], stage.id, run["tags"]) as run_id:
        url = run_url(run["experiment_id"], run_id)
        create_link_artifact(link=url, link_text=f"MLflow run of {stage.id}", key=f"mlflow-{_artifact_key(stage.id)}",
                             description=f"The MLflow run of stage `{stage.id}` (params, metrics, artifacts).")
        log.info("%s: MLflow run %s (%s)", stage.id, run_id, url)
        if fresh and folder.exists():
            log.info("%s: --force: removing %s and computing it again", stage.id, folder)
            shutil.rmtree(folder)

        def artifact(path, artifact_path=None):
            path = Path(path)
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path)
            else:
                client.log_artifact(run_id, str(path), artifact_path)

        yield StageContext(
            cfg=cfg, folder=folder, log=log, run_id=run_id, client=client,
            log_metrics=lambda metrics, step=0: log_metrics(client, run_id, metrics, step),
            log_params=lambda params: log_params(client, run_id, params), log_artifact=artifact,
            callbacks=lambda epochs, constant=frozenset(): [MetricsLogger(client, run_id, constant=set(constant)),
                                                            EpochLog(log, epochs)],
            fresh=fresh)


@task(name="stage", cache_key_fn=_stage_key, persist_result=True, result_serializer="json",
      retry_delay_seconds=[2, 10, 30], retry_condition_fn=_transient)
def run_stage(config: str, stage: str, inputs: dict, run: dict, fresh: bool = False, beside: int = 1) -> dict:
    """Run one stage of the graph (by id) with its inputs' results, as one of `beside` stages the pipeline runs at
    once; its result carries its MLflow run id."""
    from prefect.runtime import task_run

    cfg = _cfg(config)
    graph = stage_graph(cfg)
    s = graph.by_id[stage]
    fresh = fresh and task_run.run_count <= 1  # a retry of a forced stage resumes what its first attempt wrote
    with stage_context(watched(cfg), run, s, graph.key(s, cfg, inputs), fresh) as ctx, \
            cpu_share(stage, cfg.train.num_threads, beside, report=ctx.log.log):  # evaluate beside render
        result = s.run(ctx, inputs)
    return {**result, "run_id": ctx.run_id}


def _still_valid(result: dict, client) -> bool:
    """Whether a cached stage's files are still on disk and the MLflow objects it names (its run, a registered
    version and its companions) still exist in this store; else the stage must run again."""
    from mlflow.exceptions import MlflowException

    if not all(Path(p).exists() for p in result.get("files", [])):
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


def plan(cfg: Config, until: str | None = None, force: list[str] | tuple = (), source: str = "config") -> tuple[list[str], set[str]]:
    """(the stage ids to run, in order; those to run again whatever the cache holds), checked before any run starts.

    `until` selects a stage (or an expanded one's every instance) and what it needs; `force` names stages to re-run
    with what depends on them ("all": every selected stage)."""
    graph = stage_graph(cfg)
    ids = graph.upstream(graph.resolve(until, "--until")) if until else [s.id for s in graph.stages]
    forced: set[str] = set()
    for name in force:
        forced |= set(ids) if name == "all" else set(graph.downstream(graph.resolve(name, "--force")))
    graph.check(cfg, ids, source)
    return ids, forced & set(ids)


class Pipeline:
    """One pipeline run: its config, its MLflow parent run, and what each stage did (ran or cached, its run).

    Stages run through it so that their Prefect records live in this workspace, and a cached result whose files
    or MLflow objects are gone runs again."""

    def __init__(self, config_path: str, overrides: list[str] | None, until: str | None = None,
                 config: Config | dict | None = None, force: list[str] | tuple = ()):
        """Resolve the config and the stages, end runs of dead processes, and start the MLflow parent run."""
        from vaeflow.core.engine import resolve_device
        from vaeflow.pipelines.processes import end_with_parent
        from vaeflow.pipelines.tracking import (experiment_id, flatten, get_client, log_params, reap_dead_runs, run_tags,
                                        start_run)
        from vaeflow.pipelines.workspace import result_storage

        end_with_parent()
        self.cfg = resolve_config(config_path, overrides, config)
        self.graph = stage_graph(self.cfg)
        self.ids, self.forced = plan(self.cfg, until, force, config_path)  # config errors before any MLflow run
        self.config = canonical_json(self.cfg)
        self.client = get_client()
        exp = experiment_id(self.client, self.cfg.tracking.experiment)
        self.log = run_logger()
        for run_id in reap_dead_runs(self.client, exp):
            self.log.warning("MLflow run %s belonged to a process that died; marked KILLED", run_id)
        tags = {**run_tags(self.cfg, str(resolve_device(self.cfg.train.device))), "vaeflow.until": until or "",
                "vaeflow.force": ",".join(sorted(self.forced))}
        name = FLOW_NAME if not until else f"{FLOW_NAME}[{until}]"
        parent = start_run(self.client, exp, f"{name} {Path(config_path).stem}", tags=tags)
        log_params(self.client, parent, flatten(self.cfg.model_dump(mode="json")))
        self.run = {"experiment_id": exp, "parent_id": parent, "tags": tags}
        self.storage = result_storage(self.cfg)
        self.status: dict[str, str] = {}
        self.runs: dict[str, str] = {}
        self.results: dict[str, dict] = {}
        self.beside: dict[str, int] = {}  # background stage id -> the stages planned to run at once with it

    def _task(self, stage: Stage, refresh: bool):
        return run_stage.with_options(name=stage.name, task_run_name=stage.id, retries=stage.retries,
                                      result_storage=self.storage, refresh_cache=refresh or None)

    def _call(self, stage: Stage, inputs: dict, refresh: bool, background: bool):
        args = (self.config, stage.id, inputs, self.run, refresh, self.beside.get(stage.id, 1))
        task_ = self._task(stage, refresh)
        return task_.submit(*args) if background else task_(*args, return_state=True)

    def _finish(self, stage: Stage, inputs: dict, state: State, refresh: bool) -> None:
        result = state.result()  # raises the stage's own error if it failed
        if state.name == "Cached" and not _still_valid(result, self.client):
            self.log.info("%s: the cached result's files or MLflow objects are gone; running it again", stage.id)
            state = self._call(stage, inputs, True, False)
            result = state.result()
        self.status[stage.id] = "cached" if state.name == "Cached" else "ran"
        self.runs[stage.id] = result.get("run_id", "")
        self.results[stage.id] = result

    def execute(self) -> dict:
        """Run the selected stages in order; a stage that is not heavy runs in the background until a later stage
        needs its result (evaluate beside render). Returns the pipeline's result."""
        from prefect.context import FlowRunContext

        background = FlowRunContext.get() is not None  # futures need a flow's task runner (run_pipeline may be called bare)
        self.beside = self.planned_beside()  # also when run bare, in order: the same counts, the same numbers
        pending: dict[str, tuple] = {}
        out = self.outcome()
        try:
            for i in self.ids:
                stage = self.graph.by_id[i]
                for dep in self.graph.needs[i]:
                    if dep in pending:
                        self._collect(pending.pop(dep))
                if stage.heavy:
                    for other in list(pending):  # a training stage runs alone on the cores
                        self._collect(pending.pop(other))
                inputs = self.graph.inputs_of(stage, self.results)
                refresh = i in self.forced
                skip = stage.skipped(self.cfg)
                if skip:
                    self.results[i], self.status[i] = {"enabled": False, "reason": skip, "files": []}, "skipped"
                elif stage.heavy or not background:
                    self._finish(stage, inputs, self._call(stage, inputs, refresh, False), refresh)
                else:
                    pending[i] = (stage, inputs, self._call(stage, inputs, refresh, True), refresh)
            for key in list(pending):
                self._collect(pending.pop(key))
            for i in self.ids:
                _merge(out, self.graph.by_id[i].summary(self.results[i]) if self.status[i] != "skipped" else {})
        except BaseException as exc:
            for stage, _, future, _ in pending.values():
                future.wait()
            self.close(out, exc)
            raise
        self.close(out)
        return out

    def planned_beside(self) -> dict[str, int]:
        """For each stage that is not heavy, the most stages execute() runs at once with it (itself included) in a
        flow over the whole graph when none is cached: evaluate beside render is 2 in a forced re-evaluation, under
        --until evaluate, and when the pipeline runs bare (one stage at a time) too, so its thread count, and with
        it the float rounding of its metrics, depends neither on what was cached, nor on what was selected, nor on
        how the pipeline was called (the cache key holds none of these)."""
        pending: list[str] = []
        most: dict[str, int] = {}
        for i in [s.id for s in self.graph.stages]:  # execute()'s order of collecting, without the work
            stage = self.graph.by_id[i]
            pending = [p for p in pending if p not in self.graph.needs[i]]
            if stage.heavy:
                pending = []
            if stage.skipped(self.cfg) or stage.heavy:
                continue
            pending.append(i)
            for p in pending:
                most[p] = max(most.get(p, 1), len(pending))
        return most

    def _collect(self, item: tuple) -> None:
        stage, inputs, future, refresh = item
        future.wait()
        self._finish(stage, inputs, future.state, refresh)

    def close(self, out: dict, error: BaseException | None = None) -> None:
        """Tag the parent run with each stage's status, copy the headline metrics onto it, publish the Prefect
        summary, and end it FINISHED, KILLED (interrupted) or FAILED."""
        from vaeflow.pipelines.tracking import end_failed, log_metrics, set_tags

        parent = self.run["parent_id"]
        tags = {f"stage.{k}": v for k, v in self.status.items()}
        ran = [v for v in self.status.values() if v != "skipped"]
        tags["vaeflow.all_cached"] = str(bool(ran) and all(v == "cached" for v in ran)).lower()
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

        from vaeflow.pipelines.tracking import model_version_url, run_url, tracking_uri

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


def _merge(out: dict, part: dict) -> None:
    """Merge a stage's summary into the pipeline's result; dicts (one entry per expanded instance) merge."""
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value


def run_pipeline(config_path: str, overrides: list[str] | None = None, until: str | None = None,
                 config: Config | dict | None = None, force: list[str] | tuple = ()) -> dict:
    """Run the stages `until` needs (all without it) as one MLflow parent run; cached stages are skipped unless
    forced, and forcing a stage re-runs what depends on it."""
    return Pipeline(config_path, overrides, until, config, force).execute()


@flow(name=FLOW_NAME, log_prints=True)
def pipeline(config_path: str, overrides: Optional[list[str]] = None, until: Optional[str] = None,
             config: Optional[Config] = None, force: Optional[list[str]] = None) -> dict:
    """The vaeflow pipeline: prepare_data -> train -> [the model kind's stages] -> evaluate || render -> register,
    tracked as one MLflow parent run.

    Args:
        config_path: the YAML config, read when the run starts (it names the run when `config` is given)
        overrides: overrides applied on top of the config, as with `vaeflow run --set`, e.g. train.epochs=3
        until: run only this stage and the stages it needs (empty: every stage)
        config: the whole run config (the form the Prefect UI shows); config_path then only names the run
        force: stages to run again whatever the cache holds, with everything that depends on them ("all": every stage)
    """
    quiet_user_errors()  # a stage's user error: its message, not Prefect's stack traces
    return run_pipeline(config_path, overrides, until, config, force or ())
