"""The package as a user gets it (#13): one top-level name in site-packages, no clash with a user's own core/,
plugins/ or pipelines/ folders, and a non-editable install that works from outside any clone.

The throwaway venv borrows this environment's dependencies through a .pth file instead of installing torch, MLflow
and Prefect again (5 GB, offline); vaeflow itself is installed from a wheel built from the checkout's tracked files,
as `pip install <clone>` does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

SMALL = ["--set", "data.dataset.n_train=256", "--set", "data.dataset.n_test=64", "--set", "train.epochs=1",
         "--set", "train.progress=false", "--set", "eval.iwae_k=4"]


def _env(tmp: Path) -> dict[str, str]:
    """No PYTHONPATH, no VAEFLOW_* overrides, a store and caches of the test's own, no network."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("VAEFLOW_")}
    env.update(VAEFLOW_DATA_DIR=str(tmp / "data-cache"), PIP_NO_INDEX="1", DO_NOT_TRACK="true",
               MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_HOME=str(tmp / "prefect-home"))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the tracked files (what a clone holds), and that copy, to check what the build
    left behind."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in filter(None, files.stdout.split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src), "-w", str(tmp / "dist")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (src / "build").exists(), "building the wheel left a build/ folder in the tree"
    return next((tmp / "dist").glob("vaeflow-*.whl"))


def test_the_wheel_installs_nothing_but_vaeflow_at_the_top_level(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"vaeflow", wheel.name.split("-py3")[0] + ".dist-info"}, top
    for package in ("core", "plugins", "pipelines", "configs"):
        assert f"vaeflow/{package}/__init__.py" in names, package
    shipped = {Path(n).name for n in names if n.startswith("vaeflow/configs/") and n.endswith(".yaml")}
    assert shipped == {p.name for p in (ROOT / "configs").glob("*.yaml")}  # every starter config, as package data
    assert "vaeflow/py.typed" in names and any(n.endswith("licenses/LICENSE") for n in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    targets = [line.split("=", 1)[1].strip() for line in entry_points.splitlines() if "=" in line]
    assert targets and all(t.startswith("vaeflow.") for t in targets), targets


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (non-editable); returns its bin folder."""
    tmp = tmp_path_factory.mktemp("venv")
    venv.create(tmp / "venv", with_pip=True)
    bin_dir = tmp / "venv" / "bin"
    purelib = subprocess.run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]  # this environment's, .pth-added ones included
    Path(purelib, "zz_vaeflow_deps.pth").write_text("\n".join(deps) + "\n")  # the dependencies, after its own
    proc = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return bin_dir


def _clashing_project(folder: Path) -> Path:
    """A user's project with its own core/, plugins/ and pipelines/ packages, each failing loudly on import."""
    for name in ("core", "plugins", "pipelines"):
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name}/ was imported')\n")
    return folder


def test_from_a_plain_install_outside_any_clone(installed, tmp_path):
    """init, validate, train, evaluate, run the pipeline and load the registered model, from a folder that holds
    its own core/, plugins/ and pipelines/, with nothing of the checkout on the path."""
    project = _clashing_project(tmp_path / "project")
    env = _env(tmp_path)

    def vaeflow(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(installed / "vaeflow"), *args], cwd=project, env=env, capture_output=True,
                              text=True, timeout=timeout)
        assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-3000:])
        assert "the user's own" not in proc.stderr
        return proc

    listing = json.loads(vaeflow("plugins", "--json").stdout)
    assert all(e["source"].startswith("vaeflow ") for e in listing["model"])
    vaeflow("init", ".", "--template", "vae-shapes-tiny")
    config = project / "vae-shapes-tiny.yaml"
    assert "valid" in vaeflow("config", "validate", str(config)).stdout
    assert "valid" in vaeflow("config", "validate", "vae-shapes-tiny").stdout  # a template by name
    run = project / "runs" / "direct"
    vaeflow("train", str(config), "--out", str(run), *SMALL, "--nproc", "2")
    vaeflow("evaluate", "--model", str(run))
    assert json.loads((run / "eval.json").read_text())["examples"] == 64
    vaeflow("run", str(config), *SMALL, "--set", "tracking.model_name=plain-install", timeout=900)
    code = ("import mlflow, torch\n"
            "m = mlflow.pyfunc.load_model('models:/plain-install@champion')\n"
            "y = m.predict(torch.rand(2, 1, 32, 32).numpy())\n"
            "print(tuple(y.shape))\n")
    store = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}  # where `vaeflow run` registered it
    proc = subprocess.run([str(installed / "python"), "-c", code], cwd=project, env=store, capture_output=True,
                          text=True, timeout=600)  # -c puts the project folder first on sys.path
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "(2, 1, 32, 32)"
    site = Path(subprocess.run([str(installed / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    assert not {"core", "plugins", "pipelines"} & {p.name for p in site.iterdir()}
