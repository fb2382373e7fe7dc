"""The VQ-VAE / VQ-VAE-2 pipeline as a Prefect flow of cached stages, every run tracked in MLflow.

    prepare_data -> train -> extract_codes -> train_prior[top] -> train_prior[bottom] -> sample
                 -> evaluate -> register

prepare_data and train are the VAE pipeline's own tasks (the engine trains any model kind).
Each later stage is keyed by its own config and its parents' hashes: a change under `prior.*`
re-runs the priors and what follows but never train; retraining stage 1 changes the weights
hash, hence the codes hash, hence every prior key. Each prior records the stage-1 weights and
codebook hash it was trained on, and is refused next to any other stage-1 model.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, task

from typing import Optional

from core.config import Config, config_hash
from core.interfaces import file_sha256
from pipelines.flows import (
    EpochLog, Pipeline, _cfg, _digest, _key_fn, _transient, code_identity, log_registered, prepare_data,
    publish_metrics, resolve_config, sample_quality, stage, train, train_features, watched,
)

VQ_STAGES = ("prepare_data", "train", "extract_codes", "train_prior", "sample", "render", "evaluate", "register")
PRIOR_TRAIN_FIELDS_EXCLUDED = {"sample", "log_every"}  # not in a level's key (nor the other levels' specs)


# --- stage keys --------------------------------------------------------------------------------
def extract_codes_key(config: str, data: dict, trained: dict) -> str:
    """the stage-1 weights + the data manifest + the model's code (extraction has no options of its own)."""
    return "extract_codes-" + _digest(trained["weights_sha256"], data["manifest_hash"],
                                      code_identity(_cfg(config), "model"))


def train_prior_key(config: str, level: str, codes: dict) -> str:
    """this level's prior spec + the prior training options + the codes' sha256 + the prior's architecture."""
    from core.checkpoint import architecture_signature
    from core.priors import CODES_MANIFEST, build_prior

    from core.config import code_levels
    from core.registry import get_registry

    cfg = _cfg(config)
    spec = getattr(cfg.prior, level).model_dump(mode="json")
    registry = get_registry()
    options = cfg.prior.model_dump(mode="json", exclude=PRIOR_TRAIN_FIELDS_EXCLUDED | set(code_levels(registry)))
    levels = json.loads((Path(codes["folder"]) / CODES_MANIFEST).read_text())["levels"]
    code = registry.get("prior", spec["name"]).code_sha256()
    return f"train_prior_{level}-" + _digest(level, spec, options, codes["codes_sha256"],
                                             architecture_signature(build_prior(spec, level, levels)), code)


def sample_key(config: str, trained: dict, priors: dict) -> str:
    """prior.sample + the stage-1 weights + every prior's weights + the code of the model and the priors."""
    cfg = _cfg(config)
    return "sample-" + _digest(cfg.prior.sample.model_dump(mode="json"), trained["weights_sha256"],
                               sorted(p["weights_sha256"] for p in priors.values()),
                               code_identity(cfg, "model", "prior"))


def vq_render_key(config: str, data: dict, trained: dict, priors: dict) -> str:
    """render section + the stage-1 weights + every prior's weights + the data manifest + the code it runs."""
    cfg = _cfg(config)
    return "render-" + _digest(config_hash(cfg, "render"), trained["weights_sha256"],
                               sorted(p["weights_sha256"] for p in priors.values()), data["manifest_hash"],
                               code_identity(cfg, "model", "prior", renderers=True))


def vq_evaluate_key(config: str, data: dict, trained: dict, priors: dict, features: dict) -> str:
    """eval, quality and prior.sample sections + the stage-1 and prior weights + the feature network + the data."""
    cfg = _cfg(config)
    return "evaluate-" + _digest(config_hash(cfg, "eval"), config_hash(cfg, "quality"),
                                 cfg.prior.sample.model_dump(mode="json"), trained["weights_sha256"],
                                 data["manifest_hash"], sorted(p["weights_sha256"] for p in priors.values()),
                                 features.get("weights_sha256"), code_identity(cfg, "model", "prior"))


def vq_register_key(config: str, trained: dict, codes: dict, priors: dict, evaluated: dict, data: dict) -> str:
    """tracking section + the stage-1 weights + the priors + the metrics that decide promotion + the data."""
    return "register-" + _digest(config_hash(_cfg(config), "tracking"), trained["weights_sha256"],
                                 sorted(p["weights_sha256"] for p in priors.values()), evaluated["metrics_sha256"],
                                 data["manifest_hash"])


# --- stages ----------------------------------------------------------------------------------
@task(name="extract_codes", cache_key_fn=_key_fn(extract_codes_key), persist_result=True, result_serializer="json")
def extract_codes(config: str, data: dict, trained: dict, run: dict) -> dict:
    """The train and test code grids of the trained stage-1 model, with a manifest naming it and its codebooks."""
    from core.checkpoint import load_model
    from core.interfaces import to_unit_float
    from core.manifest import load_prepared
    from core.priors import CODES_FILE, CODES_MANIFEST, write_codes
    from pipelines.tracking import log_metrics

    with stage(config, run, "extract_codes", extract_codes_key(config, data, trained), "codes") as st:
        folder, client, run_id = st.folder, st.client, st.run_id
        model, model_cfg = load_model(trained["run_dir"], device="auto")
        splits = {k: to_unit_float(v) for k, v in load_prepared(data["folder"]).items()}
        stage1 = {"weights_sha256": trained["weights_sha256"], "train_run_id": trained["run_id"],
                  "config_hash": config_hash(model_cfg), "run_dir": trained["run_dir"],
                  "data_manifest_hash": data["manifest_hash"]}
        manifest = write_codes(folder, model, splits, stage1)
        log_metrics(client, run_id, {f"codes/{level}_{k}": v for level, info in manifest["levels"].items()
                                     for k, v in info.items() if k.endswith("codes_used")})
        client.log_artifact(run_id, str(folder / CODES_MANIFEST))
    return {"folder": str(folder), "codes_sha256": manifest["codes_sha256"],
            "codebook_sha256": manifest["codebook_sha256"], "levels": list(manifest["levels"]),
            "files": [str(folder / CODES_FILE), str(folder / CODES_MANIFEST)], "run_id": run_id}


@task(name="train_prior", cache_key_fn=_key_fn(train_prior_key), persist_result=True, result_serializer="json",
      retries=1, retry_condition_fn=_transient, task_run_name="train_prior-{level}")
def train_prior(config: str, level: str, codes: dict, run: dict) -> dict:
    """Train one level's PixelCNN prior on the extracted codes; resumes from its checkpoint on a re-run."""
    from core.engine import resolve_device
    from core.priors import PRIOR_INFO, PRIOR_WEIGHTS, load_codes
    from core.priors import train_prior as fit_prior
    from pipelines.tracking import MetricsLogger, log_metrics

    with stage(config, run, f"train_prior_{level}", train_prior_key(config, level, codes), "priors") as st:
        cfg, client, run_id, run_dir = watched(st.cfg), st.client, st.run_id, st.folder
        manifest, tensors = load_codes(codes["folder"])
        spec = getattr(cfg.prior, level).model_dump(mode="json")
        if (run_dir / PRIOR_INFO).exists():
            info = json.loads((run_dir / PRIOR_INFO).read_text())
        else:
            info = fit_prior(spec, level, manifest, tensors, cfg.prior, run_dir, resolve_device(cfg.train.device),
                             callbacks=[MetricsLogger(client, run_id), EpochLog(st.log, cfg.prior.epochs)],
                             progress=cfg.train.progress)
        log_metrics(client, run_id, {f"prior_{level}/test_{k}": v for k, v in info["test"].items()})
        st.log.info("%s prior: %.4f bits per code on the test codes", level, info["test"]["nll_bits_per_code"])
        client.log_artifacts(run_id, str(run_dir), f"prior-{level}")
    return {"level": level, "run_dir": str(run_dir), "weights_sha256": info["weights_sha256"], "test": info["test"],
            "files": [str(run_dir / PRIOR_WEIGHTS), str(run_dir / PRIOR_INFO)], "run_id": run_id}


@task(name="sample", cache_key_fn=_key_fn(sample_key), persist_result=True, result_serializer="json")
def sample(config: str, trained: dict, priors: dict, run: dict) -> dict:
    """Ancestral samples (top prior, then bottom prior given the top codes), decoded; plus reconstructions."""
    from core.checkpoint import load_model
    from core.priors import load_prior
    from core.codes import sample_images
    from pipelines.render import save_grid, square_rows
    with stage(config, run, "sample", sample_key(config, trained, priors)) as st:
        s, client, run_id, folder = st.cfg.prior.sample, st.client, st.run_id, st.folder
        model, _ = load_model(trained["run_dir"], device="auto")
        loaded = {level: load_prior(p["run_dir"], model, model.device, level) for level, p in priors.items()}
        images = sample_images(model, loaded, s.n, s.temperature, s.top_k, s.seed)  # (n, C, H, W)
        path = save_grid(images, folder / "samples.png", nrow=square_rows(s.n))
        client.log_artifact(run_id, str(path), "images")
    return {"folder": str(folder), "files": [str(path)], "run_id": run_id}


@task(name="render", cache_key_fn=_key_fn(vq_render_key), persist_result=True, result_serializer="json")
def render(config: str, data: dict, trained: dict, priors: dict, run: dict) -> dict:
    """Discrete traversals (codes resampled by the priors, code swaps, temperature sweeps) and code-space
    interpolations, from the configured renderers."""
    from core.checkpoint import load_model
    from core.interfaces import to_unit_float
    from core.manifest import load_prepared
    from core.priors import load_prior
    from pipelines.render import render_all

    with stage(config, run, "render", vq_render_key(config, data, trained, priors)) as st:
        cfg, client, run_id, folder = st.cfg, st.client, st.run_id, st.folder
        model, _ = load_model(trained["run_dir"], device="auto")
        loaded = {level: load_prior(p["run_dir"], model, model.device, level) for level, p in priors.items()}
        test = to_unit_float(load_prepared(data["folder"])["test"])
        paths = render_all(model, cfg, test, folder, loaded)
        for path in paths:
            client.log_artifact(run_id, str(path), f"images/{path.parent.relative_to(folder).as_posix()}")
    return {"folder": str(folder), "files": [str(p) for p in paths], "run_id": run_id}


@task(name="evaluate", cache_key_fn=_key_fn(vq_evaluate_key), persist_result=True, result_serializer="json")
def evaluate(config: str, data: dict, trained: dict, priors: dict, features: dict, run: dict) -> dict:
    """Test reconstruction and codebook health of stage 1, the priors' held-out NLL, a reconstruction grid, and
    FID/KID of prior samples (prior.sample's temperature and top_k) in the feature network's space."""
    from core.checkpoint import load_model, write_text
    from core.interfaces import to_unit_float
    from core.manifest import load_prepared
    from core.metrics import evaluate as run_eval
    from core.priors import load_prior
    from core.codes import sample_images
    from pipelines.render import reconstructions
    with stage(config, run, "evaluate", vq_evaluate_key(config, data, trained, priors, features)) as st:
        cfg, client, run_id, folder = st.cfg, st.client, st.run_id, st.folder
        model, _ = load_model(trained["run_dir"], device="auto")
        splits = load_prepared(data["folder"])
        test = to_unit_float(splits["test"])
        metrics = run_eval(model, test, cfg.eval)
        for level, p in priors.items():
            metrics.update({f"prior_{level}_{k}": v for k, v in p["test"].items()})
        if features.get("enabled"):
            s = cfg.prior.sample
            loaded = {level: load_prior(p["run_dir"], model, model.device, level) for level, p in priors.items()}
            n = min(cfg.quality.samples, len(test))
            fake = sample_images(model, loaded, n, s.temperature, s.top_k, cfg.quality.seed).cpu()  # (n, C, H, W)
            metrics.update(sample_quality(fake, test, cfg, features, splits["train"]))
        write_text(folder / "eval.json", json.dumps(metrics, indent=2))
        grid = reconstructions(model, test, 32, folder / "reconstructions.png")
        publish_metrics(st, metrics)
        client.log_artifact(run_id, str(grid), "images")
    return {"path": str(folder / "eval.json"), "metrics_sha256": file_sha256(folder / "eval.json"),
            "files": [str(folder / "eval.json"), str(grid)], "run_id": run_id}


@task(name="register", cache_key_fn=_key_fn(vq_register_key), persist_result=True, result_serializer="json")
def register(config: str, trained: dict, codes: dict, priors: dict, evaluated: dict, data: dict, run: dict) -> dict:
    """Register the stage-1 model, then each prior with lineage tags naming that exact version and codebook hash."""
    from pipelines.registry import register as register_model
    from pipelines.registry import register_prior

    metrics = json.loads(Path(evaluated["path"]).read_text())
    lineage = {"data_manifest_hash": data["manifest_hash"], "parent_model_version": "",
               "train_run_id": trained["run_id"], "weights_sha256": trained["weights_sha256"],
               "codebook_sha256": codes["codebook_sha256"]}
    with stage(config, run, "register", vq_register_key(config, trained, codes, priors, evaluated, data)) as st:
        cfg, client, run_id = st.cfg, st.client, st.run_id
        info = register_model(client, run_id, Path(trained["run_dir"]), cfg, metrics, lineage, companions=lambda v: {
            level: register_prior(client, run_id, Path(p["run_dir"]), cfg.tracking.model_name, v, level)
            for level, p in priors.items()})
        log_registered(st, info)
    return {**info, "run_id": run_id}


# --- the pipeline ------------------------------------------------------------------------------
def check_vq_config(cfg, until: str = "register", source: str = "config") -> None:
    """ConfigError unless the config is a VQ model with a prior per level (when `until` trains priors)."""
    from core.config import code_levels
    from core.errors import ConfigError
    from core.registry import get_registry

    if not cfg.model.capabilities.discrete:
        raise ConfigError([("model.kind", f"the VQ pipeline needs a model with code grids, got {cfg.model.kind}; "
                            "use vae_pipeline for it")], source)
    missing = [level for level in cfg.model.levels if getattr(cfg.prior, level) is None]
    if VQ_STAGES.index(until) >= VQ_STAGES.index("train_prior") and missing:
        raise ConfigError([(f"prior.{level}", "a prior is required for this level, e.g. "
                            "{name: gated-pixelcnn, channels: 64, layers: 8}") for level in missing], source)
    extra = [level for level in type(cfg.prior).model_fields if level not in cfg.model.levels
             and level in code_levels(get_registry()) and getattr(cfg.prior, level)]
    if extra:
        raise ConfigError([(f"prior.{level}", f"kind={cfg.model.kind} has no {level} level; remove it")
                           for level in extra], source)


def run_vq_pipeline(config_path: str, overrides: list[str] | None = None, until: str = "register",
                    config: Config | dict | None = None) -> dict:
    """Run the VQ stages up to and including `until` as one MLflow parent run; cached stages are skipped."""
    if until not in VQ_STAGES:
        raise ValueError(f"until must be one of {VQ_STAGES}, got {until!r}")
    stop = VQ_STAGES.index(until)
    check_vq_config(resolve_config(config_path, overrides, config), until, config_path)  # before any MLflow run
    p = Pipeline(config_path, overrides, "vqvae2_pipeline", config)
    out = p.outcome()

    def reached(name: str) -> bool:
        return stop >= VQ_STAGES.index(name)

    try:
        data = p.stage("prepare_data", prepare_data)
        if reached("train"):
            trained = p.stage("train", train, data)
            out["run_dir"] = trained["run_dir"]
        if reached("extract_codes"):
            codes = p.stage("extract_codes", extract_codes, data, trained)
            out["codes"] = codes["folder"]
        if reached("train_prior"):
            # top first: the bottom prior's codes are conditioned on the top codes
            priors = {level: p.stage(f"train_prior_{level}", train_prior, level, codes) for level in p.cfg.model.levels}
            out["priors"] = {level: prior["run_dir"] for level, prior in priors.items()}
        if reached("sample"):
            out["images"] = p.stage("sample", sample, trained, priors)["files"]
        if reached("render"):
            out["rendered"] = p.stage("render", render, data, trained, priors)["files"]
        if reached("evaluate"):
            features = p.stage("train_features", train_features, data)
            evaluated = p.stage("evaluate", evaluate, data, trained, priors, features)
            out["eval"] = evaluated["path"]
        if reached("register"):
            out["model"] = p.stage("register", register, trained, codes, priors, evaluated, data)
    except BaseException as exc:
        p.close(out, exc)
        raise
    p.close(out)
    return out


@flow(name="vqvae2_pipeline", log_prints=True)
def vqvae2_pipeline(config_path: str, overrides: list[str] | None = None, until: str = "register",
                    config: Optional[Config] = None) -> dict:
    """prepare_data -> train -> extract_codes -> train_prior (top, bottom) -> sample -> evaluate -> register.

    `config`, when given, is the whole run config (the Prefect UI form); else the YAML at config_path is read."""
    return run_vq_pipeline(config_path, overrides, until, config)
