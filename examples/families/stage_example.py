"""A pipeline stage and the model kind that adds it: after train, the mean and the variance over the test split
of each posterior mean E_q[z_j] (a unit whose variance is near 0 is inactive; Burda et al. 2016, sec. 5.2)."""
import json

import torch

from vaeflow.core.checkpoint import load_model, write_text
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Stage, file_sha256, to_unit_float
from vaeflow.core.manifest import load_prepared
from vaeflow.plugins.models import VAE


class PosteriorStats(Stage):
    """posterior_stats.json: {"mean": [J floats], "variance": [J floats]}."""

    name = "posterior_stats"
    inputs = ("prepare_data", "train")  # the prepared test split, the trained weights
    code = ("model",)  # the model's code computes the posterior
    heavy = False  # one encoder pass: runs beside the next stages

    @torch.no_grad()
    def run(self, ctx, inputs):
        model, _ = load_model(inputs["train"]["run_dir"])
        test = to_unit_float(load_prepared(inputs["prepare_data"]["folder"])["test"])  # (N, C, H, W)
        means = torch.cat([model.posterior(x).mode() for x in test.split(256)]).double()  # (N, J)
        path = ctx.folder / "posterior_stats.json"
        write_text(path, json.dumps({"mean": means.mean(0).tolist(), "variance": means.var(0).tolist()}))
        ctx.log_artifact(path)
        return {"path": str(path), "sha256": file_sha256(path), "files": [str(path)]}


class StatsVAE(VAE):
    """The built-in VAE, with the posterior_stats stage after train."""

    name = "vae-stats"
    stages = ("posterior_stats",)


@hookimpl
def register_stages(register):
    register(PosteriorStats)


@hookimpl
def register_models(register):
    register(StatsVAE)
