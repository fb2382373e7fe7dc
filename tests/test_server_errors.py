"""A store or server the user named wrongly, and values MLflow or Prefect would refuse, are user errors: exit 2 with a
message naming the value and what would be right, no traceback, nothing left behind, and no minutes of retries.

Every test runs the real `vaeflow` command in a subprocess, offline: nothing listens on 127.0.0.1:1."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from conftest import TINY, VAEFLOW
from test_bad_input import user_error

NOTHING_LISTENS = "127.0.0.1:1"  # port 1 (tcpmux): closed on any test machine, so a connection is refused at once
MODEL = "server-errors-model"


def vaeflow(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The console script as a user runs it in `cwd`, with no store or Prefect server configured but what `env` sets."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "VAEFLOW_HOME")}
    return subprocess.run([VAEFLOW, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**base, **(env or {})}, timeout=timeout)


def listing(folder: Path) -> list[str]:
    """Every path under folder, relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- 1. aliases MLflow refuses -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    """A project folder whose embedded store (mlflow.db) holds version 1 of MODEL, registered directly (no training)."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("registry")
    (folder / "model").mkdir()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)  # else the registry is MLflow's process-wide one
    client.create_registered_model(MODEL)
    client.create_model_version(MODEL, source=str(folder / "model"))
    return folder


@pytest.mark.parametrize("alias, problem", [("", "is empty"), ("bad alias!", "characters"),
                                            ("v3", "reserved"), ("latest", "reserved"), ("Latest", "reserved")])
def test_promote_to_an_alias_mlflow_refuses_names_the_alias_and_the_rule(registry, alias, problem):
    before = hashlib.sha256((registry / "mlflow.db").read_bytes()).hexdigest()
    err = user_error(vaeflow("models", "promote", MODEL, "1", "--alias", alias, cwd=registry),
                     f"--alias {alias!r}", problem, "letters, digits, underscores (_) and dashes (-)", "champion")
    assert "MlflowException" not in err
    assert hashlib.sha256((registry / "mlflow.db").read_bytes()).hexdigest() == before  # nothing was written


def test_promote_to_a_valid_alias_still_works(registry):
    proc = vaeflow("models", "promote", MODEL, "1", "--alias", "staging-2", cwd=registry)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{MODEL}@staging-2 -> version 1" in proc.stdout
    listed = vaeflow("models", "list", cwd=registry)
    assert listed.returncode == 0 and "staging-2" in listed.stdout, listed.stderr[-3000:]


def test_an_alias_mlflow_refuses_past_the_check_is_a_user_error(registry, monkeypatch):
    """MLflow's own INVALID_PARAMETER_VALUE from setting the alias (were vaeflow's check to fall behind MLflow's rules)
    becomes a VaeflowError naming the alias."""
    from mlflow.tracking import MlflowClient

    from vaeflow.core.errors import VaeflowError
    from vaeflow.pipelines import registry as reg

    monkeypatch.setattr(reg, "alias_problem", lambda alias: None)
    uri = f"sqlite:///{registry / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)  # else the registry is MLflow's process-wide one
    with pytest.raises(VaeflowError, match=r"MLflow refused alias 'v7' for model .* version 1"):
        reg.promote(client, MODEL, 1, "v7")


# --- 2. a PREFECT_API_URL where no server answers ----------------------------------------------------------------
UNREACHABLE_PREFECT = f"http://{NOTHING_LISTENS}/api"


@pytest.mark.parametrize("command", [["run", TINY, "--set", "train.epochs=1"],
                                     ["deploy", TINY, "--pool", "p1"],
                                     ["serve", TINY]], ids=["run", "deploy", "serve"])
def test_an_unreachable_prefect_server_is_named_with_what_to_do(tmp_path, command):
    proc = vaeflow(*command, cwd=tmp_path, env={"PREFECT_API_URL": UNREACHABLE_PREFECT, "VAEFLOW_HOME": str(tmp_path)},
                   timeout=120)
    err = user_error(proc, f"PREFECT_API_URL={UNREACHABLE_PREFECT}", "no Prefect server answers", "prefect server start")
    if command[0] == "run":
        assert "unset it" in err  # `vaeflow run` can use a temporary local server instead
    assert listing(tmp_path) == []  # no mlflow.db, no workspace, no MLflow run left RUNNING


# --- 3. schedules Prefect would refuse ---------------------------------------------------------------------------
@pytest.mark.parametrize("cron", ["not a cron", "61 * * * *", ""])
def test_serve_refuses_a_bad_cron_up_front_naming_it_and_an_example(tmp_path, cron):
    user_error(vaeflow("serve", TINY, "--cron", cron, cwd=tmp_path), f"--cron {cron!r}", "'0 3 * * *'")
    assert listing(tmp_path) == []


def test_deploy_refuses_a_bad_cron_and_an_interval_past_a_year(tmp_path):
    user_error(vaeflow("deploy", TINY, "--pool", "p1", "--cron", "every day", cwd=tmp_path),
               "--cron 'every day'", "'0 3 * * *'")
    user_error(vaeflow("deploy", TINY, "--pool", "p1", "--interval", str(10**9), cwd=tmp_path),
               f"--interval {10**9}", "31622400", "--interval 3600")
    assert listing(tmp_path) == []  # refused before any store, workspace or deployment was made


def test_a_bad_cron_in_the_configs_schedules_is_named(tmp_path):
    config = tmp_path / "scheduled.yaml"
    config.write_text(TINY.read_text() + "\nschedules:\n  - cron: '0 3 * * *'\n  - cron: 'nightly'\n")
    user_error(vaeflow("serve", config, cwd=tmp_path), "schedules[1]", "'nightly'", "'0 3 * * *'")
    assert listing(tmp_path) == ["scheduled.yaml"]


# --- 4. an MLflow store that can not be used ---------------------------------------------------------------------
@pytest.mark.parametrize("uri, words", [
    ("nonsense://foo", ["MLFLOW_TRACKING_URI=nonsense://foo", "sqlite:///PATH/mlflow.db", "http(s)://HOST:PORT",
                        "postgresql://"]),
    ("file:///{tmp}/store", ["MLFLOW_TRACKING_URI=file:///{tmp}/store", "folder store", "sqlite:///PATH/mlflow.db"]),
    ("{tmp}/store", ["MLFLOW_TRACKING_URI={tmp}/store", "folder store", "sqlite:///PATH/mlflow.db"]),
    (f"http://{NOTHING_LISTENS}", [f"MLFLOW_TRACKING_URI=http://{NOTHING_LISTENS}", "no MLflow tracking server answers",
                                   "mlflow server"]),
    (f"postgresql://vaeflow:secret@{NOTHING_LISTENS}/mlflow", [f"postgresql://vaeflow:***@{NOTHING_LISTENS}/mlflow",
                                                               "no postgresql database server answers"]),
], ids=["unknown-scheme", "file-uri", "plain-path", "http-nothing-listens", "postgres-nothing-listens"])
def test_models_list_names_a_store_uri_that_can_not_be_used(tmp_path, uri, words):
    uri = uri.format(tmp=tmp_path)
    # MLflow alone retries an unanswered server for minutes; the probe gives up after about 5 s
    err = user_error(vaeflow("models", "list", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}, timeout=60),
                     *(w.format(tmp=tmp_path) for w in words))
    assert "secret" not in err  # a password in the URI is masked
    assert listing(tmp_path) == []  # no store folder or file was made


def test_a_corrupt_store_file_is_named_and_left_as_it_was(tmp_path):
    store = tmp_path / "mlflow.db"
    store.write_bytes(os.urandom(4096))
    before = store.read_bytes()
    user_error(vaeflow("models", "list", cwd=tmp_path), str(store), "not an SQLite database")
    assert store.read_bytes() == before


def test_generate_from_the_registry_names_an_unanswering_server(tmp_path):
    proc = vaeflow("generate", "--model", f"models:/{MODEL}@champion", "--out", tmp_path / "samples.png",
                   cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"http://{NOTHING_LISTENS}"}, timeout=60)
    user_error(proc, f"MLFLOW_TRACKING_URI=http://{NOTHING_LISTENS}", "no MLflow tracking server answers")
    assert not (tmp_path / "samples.png").exists()
