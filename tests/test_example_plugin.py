"""The third-party plugin path end to end: pip-install examples/plugin-package, discover it, train with it.

Everything runs the real `vaeflow` console script in subprocesses, because plugin
discovery happens once per process through importlib.metadata entry points.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "examples" / "plugin-package"
CONFIG = ROOT / "configs" / "vae-shapes-tiny.yaml"
DIST = "vaeflow-example-encoder 0.1.0"
SMALL_RUN = [
    "--set", "model.encoder={name: residual-mlp, width: 64, depth: 2}",
    "--set", "train.epochs=1",
    "--set", "data.dataset.n_train=512",
    "--set", "train.progress=false",
]


def _vaeflow_cmd() -> list[str]:
    """The installed console script next to this interpreter (the venv's bin dir)."""
    for candidate in (Path(sys.executable).parent / "vaeflow", shutil.which("vaeflow")):
        if candidate and Path(candidate).is_file():
            return [str(candidate)]
    # no console script: same entry point, but note `-c` also puts the cwd on sys.path
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'vaeflow'; from pipelines.cli import main; main()"]


def _env(tmp: Path, pythonpath: Path | None = None, plugins: str | None = None) -> dict[str, str]:
    """A clean environment: no inherited PYTHONPATH, plugin list or VAEFLOW_* config overrides."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("VAEFLOW_")}
    env.update(VAEFLOW_DATA_DIR=str(tmp / "data-cache"), DO_NOT_TRACK="true", PIP_NO_INDEX="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    if plugins is not None:
        env["VAEFLOW_PLUGINS"] = plugins
    return env


def vaeflow(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*_vaeflow_cmd(), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def _encoders(proc: subprocess.CompletedProcess) -> dict[str, str]:
    assert proc.returncode == 0, proc.stderr
    return {e["name"]: e["source"] for e in json.loads(proc.stdout)["encoder"]}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example package pip-installed (offline, no deps) into a fresh --target directory."""
    base = tmp_path_factory.mktemp("example-plugin")
    src = base / "src"  # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    shutil.copytree(PACKAGE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = base / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=180, env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (target / "vaeflow_example_encoder" / "__init__.py").is_file()
    assert list(target.glob("vaeflow_example_encoder-0.1.0.dist-info/entry_points.txt"))
    return target


def test_installed_plugin_is_listed_with_its_distribution(site, tmp_path):
    proc = vaeflow("plugins", "--json", env=_env(tmp_path, pythonpath=site), cwd=tmp_path)
    encoders = _encoders(proc)
    assert "residual-mlp" in encoders, encoders
    assert encoders["residual-mlp"].startswith(DIST), encoders["residual-mlp"]
    assert "vaeflow_example_encoder" in encoders["residual-mlp"]
    assert {"mlp", "conv"} <= set(encoders)  # the built-ins are still there
    assert "did not load" not in proc.stderr, proc.stderr


def test_train_with_installed_plugin(site, tmp_path):
    run = tmp_path / "run"
    proc = vaeflow("train", str(CONFIG), "--out", str(run), *SMALL_RUN, env=_env(tmp_path, pythonpath=site), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["epochs"] == 1

    weights = run / "model.safetensors"
    assert weights.is_file()
    with safe_open(str(weights), framework="pt") as fh:
        keys = set(fh.keys())
    # parameter names come from the plugin's modules: stem, res_blocks.{i}.fc1/fc2/norm, head
    assert "encoder.stem.weight" in keys
    for i in range(2):
        assert {f"encoder.res_blocks.{i}.{p}.weight" for p in ("norm", "fc1", "fc2")} <= keys
    assert "encoder.res_blocks.2.fc1.weight" not in keys  # depth=2 was honoured
    assert not any(k.startswith("encoder.features.") for k in keys)  # not the built-in conv encoder

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["encoder"] == {"name": "residual-mlp", "width": 64, "depth": 2}


def test_without_the_plugin_the_config_is_a_user_error(tmp_path):
    run = tmp_path / "run"
    proc = vaeflow("train", str(CONFIG), "--out", str(run), *SMALL_RUN, env=_env(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "'residual-mlp'" in proc.stderr
    assert "known encoders:" in proc.stderr and "conv" in proc.stderr and "mlp" in proc.stderr
    assert not (run / "model.safetensors").exists()


def test_vaeflow_plugins_env_var_loads_a_local_module(tmp_path):
    (tmp_path / "my_local_encoders.py").write_text(textwrap.dedent('''
        import math

        from pydantic import Field
        from torch import nn

        from core.hookspecs import hookimpl
        from core.interfaces import Encoder, Options


        class LinearEncoder(Encoder):
            name = "local-linear"

            class Options(Options):
                bias: bool = Field(True, description="add a bias")

            def __init__(self, options, in_shape, out_features):
                super().__init__(options, in_shape, out_features)
                self.fc = nn.Linear(math.prod(in_shape), out_features, bias=options.bias)

            def forward(self, x):
                return self.fc(x.flatten(1))


        @hookimpl
        def register_encoders(register):
            register(LinearEncoder)
    '''))
    env = _env(tmp_path, pythonpath=tmp_path, plugins="my_local_encoders")
    proc = vaeflow("plugins", "--json", env=env, cwd=tmp_path)
    encoders = _encoders(proc)
    assert encoders.get("local-linear") == "VAEFLOW_PLUGINS:my_local_encoders", encoders
    assert "residual-mlp" not in encoders  # the example package is not on this PYTHONPATH

    # the local encoder's options reach config validation (unknown keys are still errors)
    ok = vaeflow("config", "validate", str(CONFIG), "--set", "model.encoder={name: local-linear, bias: false}",
                 env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    bad = vaeflow("config", "validate", str(CONFIG), "--set", "model.encoder={name: local-linear, width: 3}",
                  env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "'width'" in bad.stderr and "bias" in bad.stderr, bad.stderr


def test_residual_mlp_encoder_in_process():
    """Shapes, identity-at-init blocks and strict options, without installing anything."""
    spec = importlib.util.spec_from_file_location(
        "_example_encoder_under_test", PACKAGE / "vaeflow_example_encoder" / "__init__.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cls = mod.ResidualMLPEncoder
    assert cls.name == "residual-mlp"
    assert all(f.description for f in cls.Options.model_fields.values())

    enc = cls(cls.Options(width=32, depth=3), (1, 8, 8), 10)
    assert enc(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    h = torch.randn(4, 32)
    assert torch.equal(enc.res_blocks[0](h), h)  # zero-initialised residual branch
    with pytest.raises(Exception, match="extra"):
        cls.Options(width=32, hidden=[3])

    seen = []
    mod.register_encoders(register=seen.append)
    assert seen == [cls]
