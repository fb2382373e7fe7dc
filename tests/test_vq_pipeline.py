"""The VQ-VAE-2 pipeline against a real temporary Prefect server and a real sqlite MLflow store."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vaeflow.core import load_model
from vaeflow.core.errors import CheckpointError
from vaeflow.core.priors import PRIOR_INFO, load_codes, load_prior

from conftest import ROOT, VAEFLOW

VQ_TINY = ROOT / "configs" / "vqvae2-shapes-tiny.yaml"
SETS = ["data.dataset.n_train=256", "data.dataset.n_test=32", "train.epochs=1", "train.progress=false"]
NAME = "vqvae2-shapes-tiny"


@pytest.fixture(scope="module")
def runs(home):
    """Three runs: first, a top-prior change, a stage-1 (train.lr) change."""
    from vaeflow.pipelines.pipeline import pipeline as vqvae2_pipeline

    return {
        "first": vqvae2_pipeline(str(VQ_TINY), SETS),
        "prior": vqvae2_pipeline(str(VQ_TINY), SETS + ["prior.top.channels=8"]),
        "lr": vqvae2_pipeline(str(VQ_TINY), SETS + ["train.lr=1e-3"]),
    }


def client():
    from vaeflow.pipelines.tracking import get_client

    return get_client()


def test_prior_change_reruns_priors_not_stage1_and_stage1_change_invalidates_codes_and_priors(runs):
    assert set(runs["first"]["stages"].values()) == {"ran"}
    assert runs["prior"]["stages"] == {
        "prepare_data": "cached", "train": "cached", "extract_codes": "cached", "train_prior_top": "ran",
        "train_prior_bottom": "cached", "sample": "ran", "render": "ran", "train_features": "cached", "evaluate": "ran",
        "register": "ran"}
    assert runs["lr"]["stages"] == {"prepare_data": "cached", "train_features": "cached"} | {
        k: "ran" for k in ("train", "extract_codes", "train_prior_top", "train_prior_bottom", "sample", "render",
                           "evaluate", "register")}
    assert runs["prior"]["codes"] == runs["first"]["codes"] != runs["lr"]["codes"]
    assert runs["prior"]["priors"]["bottom"] == runs["first"]["priors"]["bottom"]
    assert runs["prior"]["priors"]["top"] != runs["first"]["priors"]["top"]


def test_codes_manifest_names_stage1_and_matches_the_model(runs):
    manifest, codes = load_codes(runs["first"]["codes"])
    model, _ = load_model(runs["first"]["run_dir"])
    trained_weights = Path(runs["first"]["run_dir"]) / "model.safetensors"
    from vaeflow.core.interfaces import file_sha256

    assert manifest["stage1"]["weights_sha256"] == file_sha256(trained_weights)
    assert manifest["codebook_sha256"] == model.codebook_hash()
    assert manifest["levels"]["top"]["grid"] == [4, 4] and manifest["levels"]["bottom"]["grid"] == [8, 8]
    assert codes["train/top"].shape == (256, 4, 4) and codes["test/bottom"].shape == (32, 8, 8)
    # the stored codes are the model's codes of the prepared test images
    from vaeflow.core.interfaces import to_unit_float
    from vaeflow.core.manifest import load_prepared

    data = Path(runs["first"]["run_dir"]).parents[1] / "data" / manifest["stage1"]["data_manifest_hash"]
    test = to_unit_float(load_prepared(data)["test"])
    again = model.encode_codes(test)
    assert torch.equal(again["top"], codes["test/top"]) and torch.equal(again["bottom"], codes["test/bottom"])


def test_registered_priors_carry_lineage_of_the_exact_stage1_version(runs):
    c = client()
    for key in ("first", "lr"):
        model = runs[key]["model"]
        stage1 = c.get_model_version(NAME, str(model["version"]))
        for level, info in model["priors"].items():
            mv = c.get_model_version(info["name"], str(info["version"]))
            assert mv.tags["stage1_model"] == NAME and mv.tags["stage1_version"] == str(model["version"])
            assert mv.tags["codebook_sha256"] == stage1.tags["codebook_sha256"]
            assert mv.tags["stage1_weights_sha256"] == stage1.tags["weights_sha256"]
            assert mv.tags["level"] == level


def test_parent_run_and_codebook_health_metrics_in_mlflow(runs):
    c = client()
    parent = c.get_run(runs["first"]["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {r.data.tags["stage"]: r for r in children}
    assert set(by_stage) == {"prepare_data", "train", "extract_codes", "train_prior_top", "train_prior_bottom",
                             "sample", "render", "train_features", "evaluate", "register"}
    train = by_stage["train"].data.metrics
    for level in ("top", "bottom"):
        for stat in ("perplexity", "usage", "usage_ema", "dead_codes"):
            assert f"train/{level}/{stat}" in train
        assert 1.0 <= train[f"train/{level}/perplexity"] <= 16.0  # at most K for K = 16
    evaluated = by_stage["evaluate"].data.metrics
    assert 0 < evaluated["eval/top_usage"] <= 1 and "eval/prior_top_nll_bits_per_code" in evaluated
    # prior samples scored in the registered feature network's space, against real training images as the floor
    assert by_stage["evaluate"].data.params["eval/quality/samples"] == "32" and evaluated["eval/quality/fid"] > 0
    assert by_stage["evaluate"].data.tags["quality.feature_net"].startswith("features-shapes/")
    history = c.get_metric_history(by_stage["train_prior_bottom"].info.run_id, "train/prior_bottom/nll_bits_per_code")
    assert history


def test_generate_from_the_registry_finds_priors_and_is_reproducible(runs, tmp_path):
    from vaeflow.core.codes import sample_images
    from vaeflow.pipelines.registry import load_generator

    uri = f"models:/{NAME}@champion"
    model, cfg, priors = load_generator(uri)
    assert set(priors) == {"top", "bottom"}
    a = sample_images(model, priors, 6, seed=3)
    b = sample_images(model, priors, 6, seed=3)
    c = sample_images(model, priors, 6, seed=4)
    assert a.shape == (6, 1, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    result = CliRunner().invoke(_app(), ["generate", "--model", uri, "-n", "9", "--out", str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size == (3 * 34 + 2, 3 * 34 + 2)  # 3x3 grid of 32px with 2px padding


def test_prior_of_another_stage1_model_is_refused(runs):
    other, _ = load_model(runs["lr"]["run_dir"])
    with pytest.raises(CheckpointError, match="another stage-1 model"):
        load_prior(runs["first"]["priors"]["top"], other)
    load_prior(runs["lr"]["priors"]["top"], other)  # its own prior loads
    result = CliRunner().invoke(_app(), ["generate", "--model", runs["lr"]["run_dir"], "--prior",
                                         runs["first"]["priors"]["top"], "--prior", runs["first"]["priors"]["bottom"]])
    assert result.exit_code == 2 and "another stage-1 model" in result.output


def test_prior_of_another_version_with_the_same_codebooks_is_refused(runs):
    model, _ = load_model(runs["first"]["run_dir"])
    with torch.no_grad():
        model.decoder.net[0].weight.add_(0.01)  # same codebooks, other decoder: another stage-1 version
    with pytest.raises(CheckpointError, match="another version of this stage-1 model"):
        load_prior(runs["first"]["priors"]["top"], model)


def test_vq_model_never_falls_back_to_a_gaussian_prior(runs, home):
    # a run dir without --prior: a clear error, no samples
    result = CliRunner().invoke(_app(), ["generate", "--model", runs["first"]["run_dir"], "--out", str(home / "x.png")])
    assert result.exit_code == 2 and "--prior" in result.output and not (home / "x.png").exists()
    # a registered stage-1 model whose priors are not registered
    from vaeflow.pipelines.registry import register

    cfg_path = Path(runs["first"]["run_dir"]) / "config.yaml"
    from vaeflow.core.checkpoint import read_run_config
    from vaeflow.pipelines.tracking import experiment_id, start_run

    cfg = read_run_config(cfg_path.parent).model_copy(deep=True)
    cfg.tracking.model_name = "vq-without-priors"
    c = client()
    run_id = start_run(c, experiment_id(c, "vaeflow"), "no priors")
    register(c, run_id, Path(runs["first"]["run_dir"]), cfg, {"mse": 0.1}, {})
    result = CliRunner().invoke(_app(), ["generate", "--model", "models:/vq-without-priors@champion"])
    assert result.exit_code == 2 and "has no registered top prior" in result.output


def test_cached_stage_with_deleted_outputs_runs_again(runs):
    from vaeflow.pipelines.pipeline import pipeline as vqvae2_pipeline

    prior_dir = Path(runs["first"]["priors"]["top"])
    shutil.rmtree(prior_dir)
    again = vqvae2_pipeline(str(VQ_TINY), SETS)
    assert again["stages"]["train_prior_top"] == "ran" and again["stages"]["train"] == "cached"
    assert (prior_dir / PRIOR_INFO).exists()
    # retrained from the same seed, the prior is bit-identical, so everything downstream is a cache hit
    assert {k: again["stages"][k] for k in ("sample", "render", "evaluate", "register")} == dict.fromkeys(
        ("sample", "render", "evaluate", "register"), "cached")


def _app():
    from vaeflow.pipelines.cli import app

    return app


@pytest.mark.parametrize("sets, where, what", [
    (["model.quantizer.codebook_size=0"], "model.quantizer.codebook_size", "greater than 0"),
    (["data.dataset.image_size=28"], "model.vq.strides", "data.pad_to: 32"),
    (["model.vq.strides=[4]"], "model", "2 level"),
    (["model.encoder={name: conv}"], "model.encoder", "kind=vqvae2 needs a feature-map encoder; choose one of: vqvae-conv"),
    (["model.vq.strides=[0, 2]"], "model.vq.strides.0", "greater than 0"),
    (["model.latent_dim=16"], "model.latent_dim", "'latent_dim' applies to kind ae or beta-tcvae or dae or factor-vae or info-vae or iwae or vae or wae-mmd"),
])
def test_bad_vq_configs_exit_2_with_the_field_and_a_fix(sets, where, what):
    args = [VAEFLOW, "config", "validate", str(VQ_TINY)] + [f"--set={s}" for s in sets]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert where in proc.stderr and what in proc.stderr and "Traceback" not in proc.stderr


def test_missing_prior_config_exits_2_before_any_mlflow_run(runs):
    c = client()
    exp = c.get_experiment_by_name("vaeflow").experiment_id
    before = len(c.search_runs([exp], max_results=1000))
    result = CliRunner().invoke(_app(), ["run", str(VQ_TINY), *[f"--set={s}" for s in SETS], "--set=prior.bottom=null"])
    assert result.exit_code == 2 and "prior.bottom" in result.output and "gated-pixelcnn" in result.output
    assert len(c.search_runs([exp], max_results=1000)) == before


def test_registered_vq_model_serves_reconstructions_and_codes_through_pyfunc(runs):
    import mlflow
    import numpy as np

    model, _ = load_model(runs["first"]["run_dir"])
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    x = torch.rand(3, 1, 32, 32)
    recon = pyfunc.predict(x.numpy())
    assert np.allclose(recon, model.reconstruct(x).numpy(), atol=1e-5)
    codes = pyfunc.predict(x.numpy(), params={"output": "latent"})
    want = model.encode_codes(x)
    assert codes.shape == (3, 16 + 64)
    assert np.array_equal(codes[:, :16], want["top"].flatten(1).numpy())
    assert np.array_equal(codes[:, 16:], want["bottom"].flatten(1).numpy())


def test_serve_deploys_the_vq_pipeline_for_a_vq_config():
    from vaeflow.pipelines.deployments import build_deployments

    deployments = build_deployments(VQ_TINY, SETS, [], "tiny")
    assert {d.flow_name for d in deployments} == {"vaeflow_pipeline"}
    assert [d.name for d in deployments] == ["tiny", "tiny-prepare_data", "tiny-train", "tiny-extract_codes",
                                             "tiny-train_prior", "tiny-sample", "tiny-train_features",
                                             "tiny-evaluate", "tiny-render"]
    assert deployments[4].parameters["until"] == "train_prior"
    params = deployments[0].parameters  # by default the YAML is read when each run starts
    assert params == {"config_path": str(VQ_TINY), "overrides": SETS, "config": None}
    pinned = build_deployments(VQ_TINY, SETS, [], "tiny", pin=True)[0]
    params = pinned.parameters
    assert params["config_path"] == str(VQ_TINY) and params["overrides"] == []
    assert params["config"]["model"]["kind"] == "vqvae2" and params["config"]["train"]["epochs"] == 1


def test_the_structured_config_parameter_runs_instead_of_the_yaml(runs, tmp_path):
    """What the UI form sends: a whole config; the YAML path only names the run."""
    from vaeflow.core.config import load_config
    from vaeflow.pipelines.pipeline import pipeline as vqvae2_pipeline

    config = load_config(VQ_TINY, SETS).model_dump(mode="json")
    again = vqvae2_pipeline(str(tmp_path / "not-read.yaml"), [], "train", config)
    assert again["stages"] == {"prepare_data": "cached", "train": "cached"}
    assert again["run_dir"] == runs["first"]["run_dir"]


def test_prior_keys_cover_their_own_level_only(runs):
    """A change to one level's prior spec moves that level's key alone; new codes move both."""
    from vaeflow.core.config import apply_sets, load_config
    from vaeflow.pipelines.pipeline import stage_graph

    cfg = load_config(VQ_TINY, SETS)
    graph = stage_graph(cfg)
    codes = {"extract_codes": {"sha256": "c" * 64, "folder": runs["first"]["codes"]}}
    top, bottom = graph.by_id["train_prior_top"], graph.by_id["train_prior_bottom"]
    base = (graph.key(top, cfg, codes), graph.key(bottom, cfg, codes))
    wider = apply_sets(cfg, ["prior.top.channels=8"])
    assert graph.key(top, wider, codes) != base[0] and graph.key(bottom, wider, codes) == base[1]
    other = {"extract_codes": {**codes["extract_codes"], "sha256": "d" * 64}}
    assert graph.key(top, cfg, other) != base[0] and graph.key(bottom, cfg, other) != base[1]
    assert graph.key(top, apply_sets(cfg, ["prior.sample.n=4"]), codes) == base[0]  # sampling is not training


def test_pipeline_renders_discrete_traversals_and_render_works_on_the_registered_model(runs, tmp_path):
    c = client()
    parent = c.get_run(runs["first"]["mlflow_run_id"])
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    render_run = next(r for r in children if r.data.tags["stage"] == "render")
    logged = {a.path for a in c.list_artifacts(render_run.info.run_id, "images/discrete")}
    assert {"images/discrete/discrete_resample.png", "images/discrete/discrete_swaps.png",
            "images/discrete/discrete_temperature.png"} <= logged
    result = CliRunner().invoke(_app(), ["render", "--model", f"models:/{NAME}@champion", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "discrete" / "discrete_resample.png").exists()
    assert (tmp_path / "interpolation" / "interpolation.png").exists()
    assert not (tmp_path / "traversal").exists()  # Gaussian traversals do not apply to a VQ model
