"""A second round of user mistakes, found by trying the CLI as a new user: a trained model's own files damaged, options
that cannot apply to a trained model, sizes past the machine, and values that validated but could not work. Each is
exit 2 with a message naming what is wrong and what would be right, no traceback, and nothing left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vaeflow.core.checkpoint import CHECKPOINT_FILE, PLUGINS_FILE, WEIGHTS_FILE
from vaeflow.core.config import load_config
from vaeflow.core.errors import CheckpointError, ConfigError, DataError, VaeflowError
from conftest import TINY
from test_bad_input import SMALL, trained, user_error, vaeflow  # noqa: F401 (trained: the tiny run, a fixture)


def copy_run(trained: Path, to: Path) -> Path:
    """A copy of the trained run a test may damage."""
    shutil.copytree(trained, to)
    return to


# --- a run directory's own files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, where", [
    ("{bad", "Invalid JSON"), ("", "Invalid JSON"), ("[1, 2]", "Input should be an object"),
    ("null", "Input should be an object"), ('{"kind": {"name": "vae"}}', "kind.family: Field required"),
    ('{"kind": "vae"}', "kind: Input should be an object"),
])
def test_a_corrupt_plugins_json_names_the_file_and_the_place(trained, tmp_path, content, where):
    run = copy_run(trained, tmp_path / "run")
    (run / PLUGINS_FILE).write_text(content)
    user_error(vaeflow("generate", "--model", run, "-n", 4, "--out", tmp_path / "s.png"),
               f"{run / PLUGINS_FILE} is corrupt", where, "delete it")
    assert not (tmp_path / "s.png").exists()


def test_the_advice_for_a_corrupt_plugins_json_works_and_every_loader_says_it(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    (run / PLUGINS_FILE).write_text("{bad")
    for args in (["evaluate", "--model", run, "--out", tmp_path / "e.json"], ["train", "--resume", run],
                 ["render", "--model", run, "--out", tmp_path / "r"],
                 ["interpolate", "--model", run, "--out", tmp_path / "i.png"]):
        user_error(vaeflow(*args), f"{run / PLUGINS_FILE} is corrupt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (run / PLUGINS_FILE).unlink()  # what the message advises: the model loads with the plugins its config names
    proc = vaeflow("generate", "--model", run, "-n", 4, "--out", tmp_path / "s.png")
    assert proc.returncode == 0 and (tmp_path / "s.png").is_file(), proc.stderr[-2000:]


def test_an_unknown_plugin_of_an_installed_package_is_not_told_to_pip_install_it(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    plugins = json.loads((run / PLUGINS_FILE).read_text())
    plugins["kind"]["name"] = "vea"
    (run / PLUGINS_FILE).write_text(json.dumps(plugins))
    err = user_error(vaeflow("generate", "--model", run, "-n", 4, "--out", tmp_path / "s.png"),
                     "the model 'vea'", "'vaeflow' installed here", "did you mean 'vae'?")
    assert "pip install" not in err


def test_a_file_given_as_the_model_says_it_is_a_file(trained, tmp_path):
    user_error(vaeflow("generate", "--model", trained / WEIGHTS_FILE, "--out", tmp_path / "s.png"),
               f"{trained / WEIGHTS_FILE} is a file, not a run directory", f"pass its folder, {trained}")
    other = tmp_path / "notes.txt"
    other.write_text("x")
    err = user_error(vaeflow("evaluate", "--model", other, "--out", tmp_path / "e.json"), f"{other} is a file")
    assert "does not exist" not in err and not (tmp_path / "e.json").exists()


def test_a_corrupt_prior_json_names_the_file_and_the_missing_key(tmp_path):
    from vaeflow.core.priors import PRIOR_INFO, load_prior

    for content, where in (("{bad", "Invalid JSON"), ("{}", "level: Field required"),
                           ('{"level": "top", "levels": {}, "spec": {}, "lineage": {}}', "spec.name: Field required")):
        (tmp_path / PRIOR_INFO).write_text(content)
        with pytest.raises(CheckpointError, match=f"is corrupt .*{where}.*train_prior"):
            load_prior(tmp_path)
    with pytest.raises(CheckpointError, match="prior folder .*nope does not exist"):
        load_prior(tmp_path / "nope")


def test_a_registry_entry_that_is_not_a_model_says_what_it_is_and_leaves_no_copy(tmp_path, monkeypatch):
    """A models:/ or runs:/ URI of the feature network or of a code prior (both registered by the pipeline) is named
    as such, and MLflow's temporary copy of what it fetched is removed."""
    import tempfile

    import mlflow

    from vaeflow.core.checkpoint import resolve_model_dir
    from vaeflow.pipelines.tracking import get_client

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR: MLflow's copies land in tmp_path/tmp
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("VAEFLOW_HOME", str(tmp_path))
    get_client()  # points MLflow at tmp_path/mlflow.db without exporting it (mlflow.set_tracking_uri would)
    for name, files in (("features", ["features.json", "features.safetensors"]),
                        ("prior-top", ["prior.json", "prior.safetensors"])):
        folder = tmp_path / name
        folder.mkdir()
        for f in files:
            (folder / f).write_text("{}")
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(folder), name)
        what = "the feature network" if name == "features" else "one level's code prior"
        with pytest.raises(CheckpointError, match=f"runs:/{run.info.run_id}/{name} is {what}.*vaeflow models list"):
            resolve_model_dir(f"runs:/{run.info.run_id}/{name}")
    assert list((tmp_path / "tmp").iterdir()) == []


def test_an_empty_store_file_is_no_store_and_a_lookup_leaves_it_empty(tmp_path):
    (tmp_path / "mlflow.db").touch()
    user_error(vaeflow("models", "list", cwd=tmp_path), "an empty file", "no MLflow store")
    assert (tmp_path / "mlflow.db").stat().st_size == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


# --- options that cannot apply to a trained model -------------------------------------------------------------------
def test_a_set_that_the_weights_fix_is_refused_not_ignored(trained, tmp_path):
    for args, words in ((["generate", "--out", tmp_path / "s.png", "--set", "model.latent_dim=16"],
                         ["--set model.latent_dim", "fixed by its weights"]),
                        (["evaluate", "--out", tmp_path / "e.json", "--set", "model.likelihood.name=gaussian"],
                         ["--set model.likelihood.name", "fixed by its weights"]),
                        (["render", "--out", tmp_path / "r", "--set", "data.dataset.image_size=64"],
                         ["--set data.dataset.image_size", "trained on 1x32x32 images", "1x64x64"])):
        user_error(vaeflow(args[0], "--model", trained, *args[1:]), *words)
    assert list(tmp_path.iterdir()) == []


def test_a_render_that_fails_part_way_leaves_no_renderer_files(trained, tmp_path):
    """render.max_examples=3 leaves the traversal its images, but the interpolation renderer needs 8: the traversal
    it already drew is not left behind, and the message names the renderer and its option."""
    out = tmp_path / "new" / "render"
    user_error(vaeflow("render", "--model", trained, "--out", out, "--set", "render.max_examples=3"),
               "renderer 'interpolation'", "needs 8 held-out images (its option pairs", "only 3")
    assert list(tmp_path.iterdir()) == []
    proc = vaeflow("render", "--model", trained, "--out", out, "--kind", "traversal", "--kind", "phase",
                   "--set", "render.max_examples=3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["phase", "traversal"]  # no staging folder


# --- sizes past the machine, and values that cannot work ------------------------------------------------------------
def test_grids_that_cannot_fit_in_memory_are_refused_before_any_work(trained, tmp_path):
    user_error(vaeflow("generate", "--model", trained, "-n", 10**8, "--out", tmp_path / "s.png"),
               "-n: a grid of 100,000,000 images of 1x32x32", "ask for at most")
    user_error(vaeflow("interpolate", "--model", trained, "--steps", 10**8, "--out", tmp_path / "i.png"),
               "--steps 100000000: at most 1024")
    user_error(vaeflow("generate", "--model", trained, "--temperature", "inf", "--out", tmp_path / "s.png"),
               "--temperature inf", "finite")
    assert list(tmp_path.iterdir()) == []


def test_check_grid_memory_by_hand(monkeypatch):
    from vaeflow.core import images

    monkeypatch.setattr(images, "available_memory", lambda: 2 * 9 * 3 * 10 * 10 * 100)  # room for 100 images
    images.check_grid_memory(100, (3, 10, 10), "-n")  # 100 x 300 values x 9 bytes = half of what is available
    with pytest.raises(VaeflowError, match="-n: a grid of 101 images of 3x10x10 .* ask for at most 100 images"):
        images.check_grid_memory(101, (3, 10, 10), "-n")
    monkeypatch.setattr(images, "available_memory", lambda: None)
    images.check_grid_memory(10**12, (3, 10, 10), "-n")  # unknown memory: no guess


@pytest.mark.parametrize("sets, where, words", [
    (["train.lr=inf"], "train.lr", "finite"),
    (["train.lr=-inf"], "train.lr", "finite"),
    (["model.kind=null"], "model.kind", "null is not a model kind; choose one of: ae"),
    (["model=null"], "model", "give a mapping with a kind"),
    (["tracking.model_name=bad/name"], "tracking.model_name", "'bad/name' is not a registry name"),
    (["tracking.model_name=a@b"], "tracking.model_name", "models:/NAME@ALIAS"),
])
def test_values_that_validated_but_could_not_work_are_config_errors(sets, where, words):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, sets)
    assert [(path, words in msg) for path, msg in info.value.problems] == [(where, True)], info.value.problems


def test_fid_with_fewer_than_two_images_is_a_data_error_naming_the_fix():
    from vaeflow.core.sample_quality import quality_scores

    net = torch.nn.Flatten()
    with pytest.raises(DataError, match="at least 2 real .* got 1 and 5.*data.dataset.n_test.*quality.enabled: false"):
        quality_scores(net, torch.rand(1, 1, 4, 4), torch.rand(5, 1, 4, 4))


def test_train_into_a_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    user_error(vaeflow("train", TINY, "--out", "", "--set", "train.epochs=1", *SMALL, cwd=tmp_path),
               "is a folder with other files (notes.txt)", "a run gets a folder of its own")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resume_of_a_finished_run_says_so_and_shows_its_last_epoch(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    before = (run / WEIGHTS_FILE).read_bytes()
    proc = vaeflow("train", "--resume", run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already trained to its last epoch" in proc.stdout
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"loss {last['loss']:.4g}" in proc.stdout and f"{last['img_per_s']:,.0f} img/s in the last" in proc.stdout
    assert (run / WEIGHTS_FILE).read_bytes() == before and (run / CHECKPOINT_FILE).is_file()



def test_a_models_uri_without_a_version_or_with_a_wrong_one_says_what_is_registered(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)  # else the registry is MLflow's process-wide one
    (tmp_path / "model").mkdir()
    client.create_registered_model("shapes-vae")
    for _ in range(2):
        client.create_model_version("shapes-vae", source=str(tmp_path / "model"))
    client.set_registered_model_alias("shapes-vae", "champion", "2")
    cases = [("models:/shapes-vae", ["names no version", "models:/shapes-vae@champion or models:/shapes-vae/1"]),
             ("models:/shapes-vae@nope", ["has versions 1, 2 and aliases @champion -> 2"]),
             ("models:/shapes-vae/7", ["has versions 1, 2"]),
             ("models:/shape-vae@champion", ["no model is registered as 'shape-vae' (did you mean 'shapes-vae'?)"])]
    for uri, words in cases:
        user_error(vaeflow("generate", "--model", uri, "--out", tmp_path / "s.png", cwd=tmp_path), uri, *words)
    assert not (tmp_path / "s.png").exists()
