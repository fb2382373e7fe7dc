"""The pipelines against a real `mlflow server` (PostgreSQL backend store, proxied artifacts), as a team runs them:
`vaeflow run` with MLFLOW_TRACKING_URI=http://..., then the registry, pyfunc and `vaeflow generate` from fresh processes.
The same checks pass against the sqlite store in test_pipeline.py and test_vq_pipeline.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vaeflow.core.interfaces import file_sha256
from conftest import ROOT, TINY, VAEFLOW, run_result, run_stages

VQ_TINY = ROOT / "configs" / "vqvae2-shapes-tiny.yaml"
VAE_SETS = ["data.dataset.n_train=512", "data.dataset.n_test=64", "train.epochs=1", "eval.iwae_k=4",
            "train.progress=false", "tracking.experiment=team", "tracking.model_name=team-vae", "quality.samples=64"]
VQ_SETS = ["data.dataset.n_train=256", "data.dataset.n_test=32", "train.epochs=1", "train.progress=false",
           "tracking.experiment=team", "tracking.model_name=team-vq", "quality.enabled=false"]
FLOW = "vaeflow_pipeline"  # the one pipeline flow; its MLflow parent run is `vaeflow_pipeline <config stem>`
VAE_STAGES = ["prepare_data", "train", "train_features", "evaluate", "render", "register"]
VQ_STAGES = ["prepare_data", "train", "extract_codes", "train_prior_top", "train_prior_bottom", "sample",
             "train_features", "evaluate", "render", "register"]  # stage ids: train_prior once per code level


def team_env(server, project: Path) -> dict:
    """A team member's environment: the tracking server, a local workspace, Prefect's temporary server."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "VAEFLOW_HOME": str(project),
           "PREFECT_HOME": str(project / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    return env


def vaeflow(env: dict, *args: str, cwd: Path) -> str:
    proc = subprocess.run([VAEFLOW, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def result_of(stdout: str) -> dict:
    return run_result(stdout)


def sets(values: list[str]) -> list[str]:
    return [a for s in values for a in ("--set", s)]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return tmp_path_factory.mktemp("team-project")


@pytest.fixture(scope="module")
def vae_run(mlflow_server, project):
    """The VAE pipeline run twice against the server: once for real, once all cached."""
    env = team_env(mlflow_server, project)
    first = result_of(vaeflow(env, "run", str(TINY), "--json", *sets(VAE_SETS), cwd=project))
    again = vaeflow(env, "run", str(TINY), *sets(VAE_SETS), cwd=project)  # the human summary
    return env, first, again


def test_vae_run_registers_on_the_server(mlflow_server, project, vae_run):
    env, first, again = vae_run
    c = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    assert first["stages"] == {stage: "ran" for stage in VAE_STAGES}
    assert run_stages(again) == {stage: "cached" for stage in VAE_STAGES}
    assert {"mlflow_run_id", "stages", "data", "run_dir", "eval", "images", "model"} <= set(first)
    assert f"open {mlflow_server.uri}" in again  # the closing hint names the store actually used
    versions = c.search_model_versions("name='team-vae'")
    assert [int(v.version) for v in versions] == [1]  # the cached re-run registered nothing
    # the server answers alias versions as strings where sqlite gives ints
    assert {k: int(v) for k, v in c.get_registered_model("team-vae").aliases.items()} == {"candidate": 1, "champion": 1}
    version = versions[0]
    assert version.status == "READY" and version.source.startswith("models:/m-")
    lineage = version.tags
    assert lineage["weights_sha256"] == file_sha256(Path(first["run_dir"]) / "model.safetensors")
    assert lineage["train_run_id"] == c.get_run(lineage["train_run_id"]).info.run_id
    # artifacts went through the server into its artifact folder, none into the workspace
    assert list(mlflow_server.artifacts.rglob("model.safetensors"))
    assert not (project / "mlartifacts").exists() and not (project / "mlflow.db").exists()
    # the parent run is FINISHED with the headline metrics, and no run is left RUNNING
    parent = c.get_run(first["mlflow_run_id"])
    metrics = json.loads(Path(first["eval"]).read_text())
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mlflow.runName"] == f"{FLOW} {TINY.stem}"  # the whole pipeline: no [stage]
    assert parent.data.tags["vaeflow.until"] == "" and parent.data.tags["vaeflow.force"] == ""
    exp_id = parent.info.experiment_id  # one child run per stage that ran, named by its stage id
    children = c.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == sorted(VAE_STAGES)
    assert parent.data.metrics["iwae_nll_nats"] == pytest.approx(metrics["iwae_nll_nats"])
    exp = c.get_experiment_by_name("team")
    assert not c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    # the feature network scoring the samples is registered in this store
    name, number = metrics["quality/feature_net"].split("/")
    assert c.get_model_version(name, number).status == "READY"


def test_pyfunc_predicts_from_a_fresh_process(mlflow_server, project, vae_run):
    env, first, _ = vae_run
    code = ("import mlflow, numpy as np, torch, json\n"
            "from vaeflow.core import load_model\n"
            "m = mlflow.pyfunc.load_model('models:/team-vae@champion')\n"
            "x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))\n"
            "y = m.predict(x.numpy())\n"
            f"local, _ = load_model({first['run_dir']!r})\n"
            "print(json.dumps([list(y.shape), float(np.abs(y - local.reconstruct(x).numpy()).max())]))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=project, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shape, diff = json.loads(proc.stdout.strip().splitlines()[-1])
    assert shape == [3, 1, 32, 32] and diff < 1e-5


def test_generate_from_the_registry(mlflow_server, project, vae_run):
    env, _, _ = vae_run
    out = project / "samples.png"
    vaeflow(env, "generate", "--model", "models:/team-vae@champion", "-n", "4", "--out", str(out), cwd=project)
    from PIL import Image

    assert Image.open(out).size[0] > 32  # a grid of 4 images


def test_vq_pipeline_registers_priors_with_lineage_and_generates(mlflow_server, project):
    env = team_env(mlflow_server, project)
    result = result_of(vaeflow(env, "run", str(VQ_TINY), "--json", *sets(VQ_SETS), cwd=project))
    c = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    # the VQ stage graph, the feature network skipped (quality.enabled false)
    assert result["stages"] == {**{stage: "ran" for stage in VQ_STAGES}, "train_features": "skipped"}
    assert set(result["priors"]) == {"top", "bottom"} and result["codes"] and result["samples"]
    parent = c.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["mlflow.runName"] == f"{FLOW} {VQ_TINY.stem}"
    stage1 = c.get_model_version_by_alias("team-vq", "champion")
    for level in ("top", "bottom"):
        (prior,) = c.search_model_versions(f"name='team-vq-prior-{level}'")
        assert prior.tags["stage1_version"] == stage1.version and prior.tags["level"] == level
        assert prior.tags["codebook_sha256"] == stage1.tags["codebook_sha256"]
    assert result["model"]["priors"]["top"]["version"] == 1
    out = project / "vq-samples.png"
    vaeflow(env, "generate", "--model", "models:/team-vq@champion", "-n", "4", "--out", str(out), cwd=project)
    assert out.stat().st_size > 0
