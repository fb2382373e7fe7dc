"""The Prefect pipeline against a real temporary Prefect server and a real sqlite MLflow store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vaeflow.core import load_model
from vaeflow.core.errors import PluginError
from vaeflow.core.interfaces import file_sha256, to_unit_float
from vaeflow.core.manifest import load_prepared

from conftest import TINY, CrashAt

SETS = ["data.dataset.n_train=512", "data.dataset.n_test=64", "train.epochs=1", "eval.iwae_k=8",
        "train.progress=false", "train.log_every=2"]
NAME = "vae-shapes-tiny"


@pytest.fixture(scope="module")
def runs(home):
    """Four pipeline runs: first, unchanged, eval changed, train.lr changed."""
    from vaeflow.pipelines.pipeline import pipeline as vae_pipeline

    out = {}
    out["first"] = vae_pipeline(str(TINY), SETS)
    out["again"] = vae_pipeline(str(TINY), SETS + ["train.log_every=4"])  # bookkeeping only: still cached
    out["eval"] = vae_pipeline(str(TINY), SETS + ["eval.iwae_k=16"])
    out["lr"] = vae_pipeline(str(TINY), SETS + ["train.lr=2e-3"])
    return out


def prepared_folder(runs, version) -> Path:
    """The prepare_data output a model version was trained on, by its lineage tag."""
    return Path(runs["first"]["run_dir"]).parents[1] / "data" / version.tags["data_manifest_hash"]


def client():
    from vaeflow.pipelines.tracking import get_client

    return get_client()


def test_stages_rerun_only_where_their_inputs_changed(runs):
    assert set(runs["first"]["stages"].values()) == {"ran"}
    assert set(runs["again"]["stages"].values()) == {"cached"}, runs["again"]["stages"]
    assert runs["eval"]["stages"] == {"prepare_data": "cached", "train": "cached", "train_features": "cached",
                                      "evaluate": "ran", "render": "cached", "register": "ran"}
    assert runs["lr"]["stages"] == {"prepare_data": "cached", "train": "ran", "train_features": "cached",
                                    "evaluate": "ran", "render": "ran", "register": "ran"}
    assert runs["again"]["run_dir"] == runs["first"]["run_dir"] != runs["lr"]["run_dir"]


def test_mlflow_parent_and_nested_stage_runs(runs):
    c = client()
    parent = c.get_run(runs["first"]["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.lr"] == "0.001" and parent.data.params["model.encoder.name"] == "conv"
    for tag in ("git_commit", "vaeflow_version", "torch_version", "device", "config_hash", "plugin.encoder"):
        assert parent.data.tags[tag], tag
    assert parent.data.tags["stage.train"] == "ran"
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["stage"] for r in children) == ["evaluate", "prepare_data", "register", "render", "train",
                                                             "train_features"]
    assert all(r.info.status == "FINISHED" for r in children)
    train_run = next(r for r in children if r.data.tags["stage"] == "train")
    history = c.get_metric_history(train_run.info.run_id, "train/loss")
    assert len(history) == 512 // 64 // 2  # every log_every=2 steps of 8
    assert [m.step for m in history] == [2, 4, 6, 8]
    for name in ("train/kl", "train/reconstruction", "train/img_per_s", "epoch/loss"):
        assert c.get_metric_history(train_run.info.run_id, name), name
    # a constant lr and beta are params of the parent (train.lr, train.beta.value), not metric curves
    assert not {"train/lr", "train/beta", "epoch/lr", "epoch/beta"} & set(train_run.data.metrics)
    assert parent.data.params["train.beta.value"] == "1.0"
    artifacts = {a.path for a in c.list_artifacts(train_run.info.run_id)}
    assert {"config.yaml", "model.safetensors", "metrics.jsonl", "loss_curve.png", "checkpoints"} <= artifacts
    eval_run = next(r for r in children if r.data.tags["stage"] == "evaluate")
    metrics = json.loads(Path(runs["first"]["eval"]).read_text())
    assert eval_run.data.metrics["eval/iwae_nll_nats"] == pytest.approx(metrics["iwae_nll_nats"])
    assert {"eval/neg_elbo_bits_per_dim", "eval/mse", "eval/psnr", "eval/active_units"} <= set(eval_run.data.metrics)
    # settings and counts are params, measurements are metrics
    assert eval_run.data.params["eval/iwae_k"] == "8" and eval_run.data.params["eval/examples"] == "64"
    assert not {"eval/iwae_k", "eval/examples", "eval/dims", "eval/latent_dim"} & set(eval_run.data.metrics)
    # the parent carries the headline metrics, so the runs table ranks pipeline runs
    assert parent.data.metrics["iwae_nll_nats"] == pytest.approx(metrics["iwae_nll_nats"])
    assert parent.data.metrics["mse"] == pytest.approx(metrics["mse"]) and "iwae_k" not in parent.data.metrics
    render_run = next(r for r in children if r.data.tags["stage"] == "render")
    images = {a.path for a in c.list_artifacts(render_run.info.run_id, "images")}
    assert images == {"images/reconstructions.png", "images/samples.png", "images/interpolations.png",
                      "images/traversal", "images/phase", "images/interpolation"}
    traversal = {a.path for a in c.list_artifacts(render_run.info.run_id, "images/traversal")}
    assert {"images/traversal/traversal.png", "images/traversal/traversal.json"} <= traversal
    assert any(p.endswith(".gif") for p in traversal)  # one animation per active dimension
    assert {a.path for a in c.list_artifacts(render_run.info.run_id, "images/phase")} == {"images/phase/phase.png"}
    prep = next(r for r in children if r.data.tags["stage"] == "prepare_data")
    assert {a.path for a in c.list_artifacts(prep.info.run_id)} == {"manifest.json"}


def test_mlflow_layout_experiment_kind_cached_tag_and_process_tags(runs):
    import os

    c = client()
    first, again = (c.get_run(runs[k]["mlflow_run_id"]) for k in ("first", "again"))
    exp = c.get_experiment(first.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens the training view
    assert again.data.tags["vaeflow.all_cached"] == "true" and first.data.tags["vaeflow.all_cached"] == "false"
    assert again.data.metrics == first.data.metrics  # a cached re-run still ranks in the runs table
    for run in (first, *c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{first.info.run_id}'")):
        assert run.data.tags["vaeflow.pid"] == str(os.getpid()) and run.data.tags["vaeflow.host"]


def test_registry_versions_aliases_and_lineage(runs):
    c = client()
    versions = sorted(int(v.version) for v in c.search_model_versions(f"name='{NAME}'"))
    # the unchanged re-run registered nothing; the eval-only change has the same weights, so it reused version 1
    assert versions == [1, 2]
    assert runs["eval"]["model"]["version"] == 1 and runs["eval"]["model"]["reused"]
    assert int(c.get_model_version_by_alias(NAME, "candidate").version) == 2
    v1 = c.get_model_version(NAME, "1")
    assert v1.tags["config_hash"] and v1.tags["run_id"] and "parent_model_version" in v1.tags
    manifest = json.loads((prepared_folder(runs, v1) / "manifest.json").read_text())
    assert manifest["manifest_hash"] == v1.tags["data_manifest_hash"]
    assert v1.tags["weights_sha256"] == file_sha256(Path(runs["first"]["run_dir"]) / "model.safetensors")
    # champion = the best iwae_nll_nats among the versions
    scores = {int(v.version): float(v.tags["metric.iwae_nll_nats"]) for v in c.search_model_versions(f"name='{NAME}'")}
    assert int(c.get_model_version_by_alias(NAME, "champion").version) == min(scores, key=scores.get)


def test_pyfunc_and_core_load_model_from_the_registry(runs):
    uri = f"models:/{NAME}@candidate"
    model, cfg = load_model(uri)
    local, _ = load_model(runs["lr"]["run_dir"])
    for k, v in local.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    test = to_unit_float(load_prepared(prepared_folder(runs, client().get_model_version(NAME, "2")))["test"][:5])
    pyfunc = mlflow.pyfunc.load_model(uri)
    recon = pyfunc.predict(test.numpy())
    assert recon.shape == (5, 1, 32, 32)
    np.testing.assert_allclose(recon, local.reconstruct(test).numpy(), atol=1e-6)
    latents = pyfunc.predict(test.numpy(), params={"output": "latent"})
    assert latents.shape == (5, 8)
    np.testing.assert_allclose(latents, local.posterior(test).mode().detach().numpy(), atol=1e-6)


def test_cli_models_list_promote_and_generate(runs, tmp_path):
    from vaeflow.pipelines.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["models", "promote", NAME, "1"])
    assert res.exit_code == 0, res.output
    rows = json.loads(runner.invoke(app, ["models", "list", "--json"]).stdout)
    assert [r["aliases"] for r in rows if r["version"] == 1 and r["name"] == NAME] == [["champion"]]
    bad = runner.invoke(app, ["models", "promote", NAME, "99"])
    assert bad.exit_code == 2 and "no version 99" in bad.stderr
    res = runner.invoke(app, ["generate", "--model", f"models:/{NAME}@champion", "-n", "4", "--out", str(tmp_path / "g.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "g.png").stat().st_size > 0
    missing = runner.invoke(app, ["generate", "--model", "models:/no-such-model@champion", "--out", str(tmp_path / "x.png")])
    assert missing.exit_code == 2 and "no such registered model version" in missing.stderr


def test_missing_plugin_names_its_package(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["first"]["run_dir"], run)
    plugins = json.loads((run / "plugins.json").read_text())
    plugins["encoder"].update(name="residual-mlp", package="vaeflow-example")
    (run / "plugins.json").write_text(json.dumps(plugins))
    with pytest.raises(PluginError, match="'residual-mlp'.*'vaeflow-example'.*pip install vaeflow-example"):
        load_model(run)


BOOM = """
from vaeflow.core.hookspecs import hookimpl
from vaeflow.plugins.encoders import ConvEncoder

class Boom(ConvEncoder):
    name = "boom"
    def forward(self, x):
        if self.training:
            raise RuntimeError("encoder exploded on purpose")
        return super().forward(x)

@hookimpl
def register_encoders(register):
    register(Boom)
"""


def test_failing_stage_fails_the_flow_and_marks_mlflow_runs(runs, local_plugins):
    from prefect.states import State

    from vaeflow.pipelines.pipeline import pipeline as vae_pipeline

    local_plugins({"vf_boom": BOOM})
    sets = SETS + ["model.encoder={name: boom, channels: [16, 32], hidden: 128}"]
    state: State = vae_pipeline(str(TINY), sets, return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match="exploded on purpose"):
        state.result()
    c = client()
    exp = c.get_experiment_by_name("vaeflow")
    query = "tags.`plugin.encoder` LIKE 'boom%' and tags.`mlflow.runName` LIKE 'vaeflow_pipeline %'"
    (parent,) = c.search_runs([exp.experiment_id], query)
    assert parent.info.status == "FAILED" and "exploded on purpose" in parent.data.tags["error"]
    children = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    # prepare_data was a cache hit; train failed on both attempts (retries=1); nothing after it ran
    assert sorted(r.data.tags["stage"] for r in children) == ["train", "train"]
    for r in children:
        assert r.info.status == "FAILED" and "exploded on purpose" in r.data.tags["error"]
    assert parent.data.tags["stage.prepare_data"] == "cached"
    assert sorted(int(v.version) for v in c.search_model_versions(f"name='{NAME}'")) == [1, 2]


def test_rerun_resumes_train_from_the_checkpoint_of_the_same_key(home):
    from vaeflow.core.checkpoint import CHECKPOINT_FILE, WEIGHTS_FILE, load_checkpoint
    from vaeflow.core.config import load_config
    from vaeflow.core.engine import Trainer
    from vaeflow.pipelines.pipeline import run_pipeline, stage_key
    from vaeflow.pipelines.workspace import workspace

    sets = SETS + ["train.seed=7", "train.epochs=2", "train.checkpoint_every=3", "train.log_every=1",
                   "tracking.model_name=resumed"]
    data = run_pipeline(str(TINY), sets, until="prepare_data")["data"]
    cfg = load_config(TINY, sets)
    images = load_prepared(data["folder"])["train"]
    run_dir = workspace(cfg) / "train" / stage_key(cfg, "train", {"prepare_data": data}).removeprefix("train-")
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(cfg, run_dir, train_images=images, callbacks=[CrashAt(5)]).fit()
    assert load_checkpoint(run_dir / CHECKPOINT_FILE)["step"] == 3 and not (run_dir / WEIGHTS_FILE).exists()
    out = run_pipeline(str(TINY), sets, until="train")
    assert out["stages"]["train"] == "ran" and out["run_dir"] == str(run_dir)
    reference = Path(home) / "uninterrupted"
    Trainer(cfg, reference, train_images=images).fit()
    assert (run_dir / WEIGHTS_FILE).read_bytes() == (reference / WEIGHTS_FILE).read_bytes()


def test_get_client_follows_vaeflow_home_and_leaves_the_environment_alone(tmp_path, monkeypatch):
    """MLflow 3's set_tracking_uri exports MLFLOW_TRACKING_URI; left there, it would pin the process to the first store."""
    import os

    from vaeflow.pipelines.tracking import get_client

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uris = []
    for name in ("a", "b"):
        monkeypatch.setenv("VAEFLOW_HOME", str(tmp_path / name))
        uris.append(get_client()._tracking_client.tracking_uri)
        assert "MLFLOW_TRACKING_URI" not in os.environ
    assert uris == [f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}", f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"]


def test_samples_are_scored_in_the_registered_feature_networks_space(runs):
    c = client()
    metrics = json.loads(Path(runs["first"]["eval"]).read_text())
    fid, kid = metrics["quality/fid"], metrics["quality/kid"]
    assert fid > 0 and kid == kid and metrics["quality/samples"] == 64  # all 64 test images vs 64 samples
    assert metrics["quality/real_train_fid"] < fid  # real training images are closer to the test set than samples
    name, version = metrics["quality/feature_net"].split("/")
    mv = c.get_model_version(name, version)
    assert name == "features-shapes" and float(mv.tags["accuracy"]) == pytest.approx(metrics["quality/feature_net_accuracy"])
    parent = c.get_run(runs["first"]["mlflow_run_id"])
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    eval_run = next(r for r in children if r.data.tags["stage"] == "evaluate")
    assert eval_run.data.tags["quality.feature_net"] == metrics["quality/feature_net"]
    assert eval_run.data.metrics["eval/quality/fid"] == pytest.approx(fid)
    # one registered version per feature network: the cached re-runs did not add versions
    assert [int(v.version) for v in c.search_model_versions(f"name='{name}'")] == [1]


def test_train_key_changes_when_a_plugins_architecture_changes(monkeypatch):
    """Same config, new plugin code with other parameters: the cached weights could not load, so the key changes."""
    from vaeflow.core.config import load_config
    from vaeflow.pipelines.pipeline import stage_key
    from vaeflow.plugins.encoders import ConvEncoder

    cfg, inputs = load_config(TINY, SETS), {"prepare_data": {"sha256": "m" * 64}}
    before = stage_key(cfg, "train", inputs)
    assert stage_key(cfg, "train", inputs) == before  # deterministic
    original = ConvEncoder.__init__

    def wider(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.extra = torch.nn.Linear(1, 1)

    monkeypatch.setattr(ConvEncoder, "__init__", wider)
    assert stage_key(cfg, "train", inputs) != before


EDITABLE = """
from vaeflow.core.hookspecs import hookimpl
from vaeflow.plugins.encoders import ConvEncoder

class Scaled(ConvEncoder):
    name = "scaled"
    def forward(self, x):
        return SCALE * super().forward(x)

@hookimpl
def register_encoders(register):
    register(Scaled)
"""


def test_editing_a_plugins_source_reruns_train_and_what_follows(home, local_plugins, tmp_path):
    """Same config, same parameter shapes, new code in the plugin's forward: train runs again (the key carries a
    hash of the plugin's source), while prepare_data, which does not run it, stays cached."""
    from vaeflow.pipelines.pipeline import run_pipeline

    local_plugins({"vf_editable": EDITABLE.replace("SCALE", "1.0")})
    sets = SETS + ["model.encoder={name: scaled, channels: [16, 32], hidden: 128}", "tracking.model_name=edited"]
    first = run_pipeline(str(TINY), sets, until="train")
    again = run_pipeline(str(TINY), sets, until="train")
    (tmp_path / "vf_editable.py").write_text(EDITABLE.replace("SCALE", "0.5"))  # a user edits the plugin
    edited = run_pipeline(str(TINY), sets, until="train")
    assert first["stages"]["train"] == "ran"
    assert again["stages"] == {"prepare_data": "cached", "train": "cached"}
    assert edited["stages"] == {"prepare_data": "cached", "train": "ran"} and edited["run_dir"] != first["run_dir"]


def test_cached_stages_never_cross_workspaces_or_stores(home, tmp_path, monkeypatch):
    """One PREFECT_HOME (the harness's), two workspaces, two stores: a cache hit only ever comes from the same
    workspace and store, and a cached stage whose MLflow run is gone from the store runs again."""
    from mlflow.tracking import MlflowClient

    from vaeflow.pipelines.pipeline import run_pipeline

    sets = SETS + ["tracking.model_name=scoped"]
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("VAEFLOW_HOME", str(a))
    first = run_pipeline(str(TINY), sets, until="evaluate")
    assert set(first["stages"].values()) == {"ran"}
    assert set(run_pipeline(str(TINY), sets, until="evaluate")["stages"].values()) == {"cached"}

    monkeypatch.setenv("VAEFLOW_HOME", str(b))
    other = run_pipeline(str(TINY), sets, until="evaluate")
    assert set(other["stages"].values()) == {"ran"}  # nothing from workspace a
    assert Path(other["run_dir"]).is_relative_to(b) and Path(other["eval"]).is_relative_to(b)
    uri_b = f"sqlite:///{b / 'mlflow.db'}"
    store_b = MlflowClient(uri_b, registry_uri=uri_b)  # the registry too: MlflowClient's default is process-wide
    name, version = json.loads(Path(other["eval"]).read_text())["quality/feature_net"].split("/")
    assert store_b.get_model_version(name, version).tags["weights_sha256"]  # its own store's feature network

    monkeypatch.setenv("VAEFLOW_HOME", str(a))  # workspace a, but another tracking store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    elsewhere = run_pipeline(str(TINY), sets, until="evaluate")
    assert set(elsewhere["stages"].values()) == {"ran"}
    MlflowClient(f"sqlite:///{tmp_path / 'other.db'}").get_run(elsewhere["mlflow_run_id"])

    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # back to a's own store, where every stage is cached ...
    store_a = MlflowClient(f"sqlite:///{a / 'mlflow.db'}")
    train_run = next(r for r in store_a.search_runs([store_a.get_experiment_by_name("vaeflow").experiment_id],
                                                    "tags.stage = 'train'"))
    store_a.delete_run(train_run.info.run_id)  # ... except train, whose MLflow run is gone now
    again = run_pipeline(str(TINY), sets, until="evaluate")
    assert again["stages"] == {"prepare_data": "cached", "train": "ran", "train_features": "cached", "evaluate": "cached"}
    assert again["run_dir"] == first["run_dir"]  # the weights on disk were reused, under a new MLflow run


def test_prefect_shows_the_work_logs_links_and_summary(home):
    """The flow run in Prefect carries epoch log lines, a link artifact per stage to its MLflow run, and a summary."""
    from prefect.client.orchestration import get_client as prefect_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from vaeflow.pipelines.pipeline import pipeline as vae_pipeline
    from test_serve import wait_for

    sets = SETS + ["train.epochs=2", "tracking.model_name=shown"]
    state = vae_pipeline(str(TINY), sets, return_state=True)
    assert state.is_completed()
    out = state.result()
    flow_run_id = state.state_details.flow_run_id
    with prefect_client(sync_client=True) as pc:
        artifacts = pc.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

        def logs() -> list[str]:  # log lines reach the API in batches, a moment after the run
            found = [log.message for log in pc.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
            return found if any(m.startswith("iwae_nll_nats") for m in found) else []

        logs = wait_for(logs, 60, "the flow run's log lines")
    by_key = {a.key: a for a in artifacts}
    c = client()
    parent = c.get_run(out["mlflow_run_id"])
    children = {r.data.tags["stage"]: r.info.run_id
                for r in c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    for stage, run_id in children.items():  # each stage links to its own MLflow run
        link = by_key[f"mlflow-{stage.replace('_', '-')}"]
        assert link.type == "markdown" and run_id in link.data, (stage, link.data)
    summary = by_key["vaeflow-pipeline-summary"].data
    assert "| train | ran |" in summary and f"models:/shown/{out['model']['version']}" in summary
    assert f"#/models/shown/versions/{out['model']['version']})" in summary  # a link to the version in the MLflow UI
    assert f"| iwae_nll_nats | {parent.data.metrics['iwae_nll_nats']:.6g} |" in summary
    assert by_key["mlflow-model-version"].data.count("shown") >= 1
    epoch_lines = [m for m in logs if m.startswith("epoch ")]
    assert [m.split(":")[0] for m in epoch_lines] == ["epoch 1/2", "epoch 2/2"]
    assert all("loss" in m and "kl" in m and "img/s" in m and "ETA" in m for m in epoch_lines)
    assert any(m.startswith("iwae_nll_nats") for m in logs)  # evaluate's metrics


def test_force_reruns_a_stage_and_what_depends_on_it(runs):
    """--force evaluate: evaluate and register run again (register although its key is unchanged); the weights,
    the data and render stay cached; from the same weights evaluate writes the same numbers."""
    from vaeflow.pipelines.pipeline import run_pipeline

    before = Path(runs["first"]["eval"]).read_text()
    forced = run_pipeline(str(TINY), SETS, force=["evaluate"])
    assert forced["stages"] == {"prepare_data": "cached", "train": "cached", "train_features": "cached",
                                "evaluate": "ran", "render": "cached", "register": "ran"}
    assert forced["eval"] == runs["first"]["eval"] and Path(forced["eval"]).read_text() == before
    assert forced["model"]["reused"]  # the same weights: no second version
    parent = client().get_run(forced["mlflow_run_id"])
    assert parent.data.tags["vaeflow.force"] == "evaluate,register"


def test_a_forced_evaluate_under_until_writes_the_full_runs_numbers(runs):
    """--until evaluate leaves render out of the run, yet evaluate takes the thread count it has beside render in
    the full graph (the cache key does not hold the selection), so its metrics come out byte-identical."""
    from vaeflow.pipelines.pipeline import run_pipeline

    before = Path(runs["first"]["eval"]).read_text()
    forced = run_pipeline(str(TINY), SETS, until="evaluate", force=["evaluate"])
    assert forced["stages"]["evaluate"] == "ran" and "render" not in forced["stages"]
    assert Path(forced["eval"]).read_text() == before


def test_force_train_retrains_from_scratch_to_the_same_weights(home):
    """--force train removes the stage's folder (weights and checkpoint) and trains again: with the same seed the
    weights come out bit-identical, in the same folder."""
    from vaeflow.core.checkpoint import WEIGHTS_FILE
    from vaeflow.pipelines.pipeline import run_pipeline

    sets = SETS + ["train.seed=11", "tracking.model_name=forced"]  # its own train key: not the fixture's weights
    first = run_pipeline(str(TINY), sets, until="train")
    weights = Path(first["run_dir"]) / WEIGHTS_FILE
    original = weights.read_bytes()
    (Path(first["run_dir"]) / "marker").write_text("left by the first run")
    forced = run_pipeline(str(TINY), sets, until="train", force=["train"])
    assert forced["stages"] == {"prepare_data": "cached", "train": "ran"} and forced["run_dir"] == first["run_dir"]
    assert not (Path(first["run_dir"]) / "marker").exists()  # the folder was emptied, not reused
    assert weights.read_bytes() == original
