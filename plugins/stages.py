"""Stages that the models with code grids (vqvae, vqvae2) add to the pipeline, after train:

    train -> extract_codes -> train_prior (one per level) -> sample

Each is keyed by its own config and its inputs' identities: a change under `prior.*` re-runs the priors and what
follows but never train; retraining stage 1 changes the weights hash, hence the codes hash, hence every prior key.
Each prior records the stage-1 weights and codebook hash it was trained on, and is refused next to any other
stage-1 model. The evaluate, render and register stages take the priors as their optional `train_prior` input.
"""

from __future__ import annotations

import json
from pathlib import Path

from vaeflow.core.config import config_hash
from vaeflow.core.errors import ConfigError
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Stage, StageContext

PRIOR_TRAIN_FIELDS_EXCLUDED = {"sample", "log_every"}  # not in a level's key (nor the other levels' specs)


class ExtractCodes(Stage):
    """The train and test code grids of the trained stage-1 model, with a manifest naming it and its codebooks."""

    name = "extract_codes"
    inputs = ("prepare_data", "train")
    code = ("model",)  # extraction has no options of its own
    folder = "codes"

    def run(self, ctx: StageContext, inputs: dict) -> dict:
        """Encode both splits to codes; log how many codes each level uses."""
        from vaeflow.core.checkpoint import load_model
        from vaeflow.core.interfaces import to_unit_float
        from vaeflow.core.manifest import load_prepared
        from vaeflow.core.priors import CODES_FILE, CODES_MANIFEST, write_codes

        data, trained = inputs["prepare_data"], inputs["train"]
        model, model_cfg = load_model(trained["run_dir"], device="auto")
        splits = {k: to_unit_float(v) for k, v in load_prepared(data["folder"]).items()}
        stage1 = {"weights_sha256": trained["weights_sha256"], "train_run_id": trained["run_id"],
                  "config_hash": config_hash(model_cfg), "run_dir": trained["run_dir"],
                  "data_manifest_hash": data["manifest_hash"]}
        manifest = write_codes(ctx.folder, model, splits, stage1)
        ctx.log_metrics({f"codes/{level}_{k}": v for level, info in manifest["levels"].items()
                         for k, v in info.items() if k.endswith("codes_used")})
        ctx.log_artifact(ctx.folder / CODES_MANIFEST)
        return {"folder": str(ctx.folder), "sha256": manifest["codes_sha256"], "codes_sha256": manifest["codes_sha256"],
                "codebook_sha256": manifest["codebook_sha256"], "levels": list(manifest["levels"]),
                "files": [str(ctx.folder / CODES_FILE), str(ctx.folder / CODES_MANIFEST)]}

    def summary(self, result: dict) -> dict:
        """The codes folder in the pipeline's result."""
        return {"codes": result["folder"]}


class TrainPrior(Stage):
    """One level's prior over its code grid (prior.<level>), trained on the extracted codes; one instance per level,
    in sampling order (a level conditioned on another reads that level's codes, not its prior)."""

    name = "train_prior"
    inputs = ("extract_codes",)
    reads = ("prior",)  # this level's spec and the training options, not prior.sample
    folder = "priors"
    retries = 1

    @classmethod
    def expand(cls, cfg) -> list[Stage]:
        """One per code level of the model, top first."""
        return [cls(level) for level in cfg.model.levels]

    @classmethod
    def check(cls, cfg, source: str) -> None:
        """A prior spec for every level of the model, and none for a level it lacks."""
        from vaeflow.core.config import code_levels
        from vaeflow.core.registry import get_registry

        missing = [level for level in cfg.model.levels if getattr(cfg.prior, level) is None]
        if missing:
            raise ConfigError([(f"prior.{level}", "a prior is required for this level, e.g. "
                                "{name: gated-pixelcnn, channels: 64, layers: 8}") for level in missing], source)
        extra = [level for level in type(cfg.prior).model_fields if level not in cfg.model.levels
                 and level in code_levels(get_registry()) and getattr(cfg.prior, level)]
        if extra:
            raise ConfigError([(f"prior.{level}", f"kind={cfg.model.kind} has no {level} level; remove it")
                               for level in extra], source)

    def key_parts(self, cfg, inputs: dict) -> list:
        """This level's prior spec, the prior training options, the prior's architecture and its plugin's code."""
        from vaeflow.core.checkpoint import architecture_signature
        from vaeflow.core.config import code_levels
        from vaeflow.core.priors import CODES_MANIFEST, build_prior
        from vaeflow.core.registry import get_registry

        level, registry = self.param, get_registry()
        spec = getattr(cfg.prior, level).model_dump(mode="json")
        options = cfg.prior.model_dump(mode="json", exclude=PRIOR_TRAIN_FIELDS_EXCLUDED | set(code_levels(registry)))
        levels = json.loads((Path(inputs["extract_codes"]["folder"]) / CODES_MANIFEST).read_text())["levels"]
        return [level, spec, options, architecture_signature(build_prior(spec, level, levels)),
                registry.get("prior", spec["name"]).code_sha256()]

    def run(self, ctx: StageContext, inputs: dict) -> dict:
        """Train (or resume) this level's prior and report its held-out bits per code."""
        from vaeflow.core.engine import resolve_device
        from vaeflow.core.priors import PRIOR_INFO, PRIOR_WEIGHTS, load_codes
        from vaeflow.core.priors import train_prior as fit_prior

        level, cfg, run_dir = self.param, ctx.cfg, ctx.folder
        manifest, tensors = load_codes(inputs["extract_codes"]["folder"])
        spec = getattr(cfg.prior, level).model_dump(mode="json")
        if (run_dir / PRIOR_INFO).exists():
            info = json.loads((run_dir / PRIOR_INFO).read_text())
        else:
            info = fit_prior(spec, level, manifest, tensors, cfg.prior, run_dir, resolve_device(cfg.train.device),
                             callbacks=ctx.callbacks(cfg.prior.epochs), progress=cfg.train.progress)
        ctx.log_metrics({f"prior_{level}/test_{k}": v for k, v in info["test"].items()})
        ctx.log.info("%s prior: %.4f bits per code on the test codes", level, info["test"]["nll_bits_per_code"])
        ctx.log_artifact(run_dir, f"prior-{level}")
        return {"level": level, "run_dir": str(run_dir), "sha256": info["weights_sha256"],
                "weights_sha256": info["weights_sha256"], "test": info["test"],
                "files": [str(run_dir / PRIOR_WEIGHTS), str(run_dir / PRIOR_INFO)]}

    def summary(self, result: dict) -> dict:
        """{"priors": {level: run dir}} in the pipeline's result."""
        return {"priors": {self.param: result["run_dir"]}}


class Sample(Stage):
    """Ancestral samples (each level's prior given the levels it is conditioned on), decoded."""

    name = "sample"
    inputs = ("train", "train_prior")
    reads = ("prior.sample",)
    code = ("model", "prior")
    heavy = False

    def key_parts(self, cfg, inputs: dict) -> list:
        """prior.sample: how many, the temperature, top-k and the seed."""
        return [cfg.prior.sample.model_dump(mode="json")]

    def run(self, ctx: StageContext, inputs: dict) -> dict:
        """prior.sample.n samples in a square grid, samples.png."""
        from vaeflow.core.checkpoint import load_model
        from vaeflow.core.codes import sample_images
        from vaeflow.core.images import save_grid, square_rows
        from vaeflow.core.priors import load_priors

        s = ctx.cfg.prior.sample
        model, _ = load_model(inputs["train"]["run_dir"], device="auto")
        images = sample_images(model, load_priors(model, inputs["train_prior"]), s.n, s.temperature, s.top_k,
                               s.seed)  # (n, C, H, W)
        path = save_grid(images, ctx.folder / "samples.png", nrow=square_rows(s.n))
        ctx.log_artifact(path, "images")
        return {"folder": str(ctx.folder), "files": [str(path)]}

    def summary(self, result: dict) -> dict:
        """The sample grid in the pipeline's result."""
        return {"samples": result["files"]}


@hookimpl
def register_stages(register) -> None:
    """extract_codes, train_prior and sample: the stages of the models with code grids."""
    for cls in (ExtractCodes, TrainPrior, Sample):
        register(cls)
