"""End-to-end CLI on the tiny config: train, evaluate, generate, interpolate; plus layering rules."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from torchvision.utils import make_grid
from typer.testing import CliRunner

from vaeflow.core import load_model
from vaeflow.core.data import known_factors, load_split
from vaeflow.core.metrics import evaluate
from vaeflow.pipelines.cli import app

from conftest import ROOT, TINY, VAEFLOW

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    res = runner.invoke(app, ["train", str(TINY), "--out", str(run), "--set", "train.epochs=2",
                              "--set", "data.dataset.n_train=1024", "--set", "train.progress=false", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["run_dir"] == str(run) and summary["steps"] == 2 * 1024 // 64
    return run


def test_train_prints_a_human_summary_and_json_on_request(tmp_path):
    """Without --json: what was trained, where, and the last epoch's terms as words; with --json: the same numbers
    as one JSON line."""
    sets = ["train.epochs=1", "data.dataset.n_train=256", "train.progress=false"]
    args = [a for s in sets for a in ("--set", s)]
    human = runner.invoke(app, ["train", str(TINY), "--out", str(tmp_path / "h"), *args])
    assert human.exit_code == 0, human.output
    lines = human.stdout.strip().splitlines()
    assert lines[-3].startswith(f"trained 1 epoch ({256 // 64} steps") and lines[-3].endswith(str(tmp_path / "h"))
    assert lines[-2].startswith("last epoch: loss ") and lines[-1] == f"next: vaeflow evaluate --model {tmp_path / 'h'}"
    machine = runner.invoke(app, ["train", str(TINY), "--out", str(tmp_path / "j"), *args, "--json"])
    data = json.loads(machine.stdout.strip().splitlines()[-1])
    assert data["epochs"] == 1 and data["steps"] == 256 // 64 and {"loss", "reconstruction", "kl"} <= set(data)
    assert f"loss {data['loss']:.4g}" in lines[-2]  # the same seed and data: the same loss, printed to 4 digits


def test_every_option_and_argument_has_help():
    """--help explains everything: no parameter of any command (sub-apps included) without a help text."""
    def commands(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from commands(sub, [*path, name])
        else:
            yield path, cmd

    found = list(commands(typer.main.get_command(app), ["vaeflow"]))
    assert len(found) > 15
    missing = [f"{' '.join(path)} {p.name}" for path, cmd in found for p in cmd.params
               if p.name != "help" and not getattr(p, "help", None)]
    assert not missing, missing


def test_version_and_template_listing():
    from vaeflow import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"vaeflow {__version__}"
    listing = runner.invoke(app, ["init", "--list"])
    names = [line.split()[0] for line in listing.stdout.strip().splitlines()]
    assert names == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))  # every shipped config, no other


def test_init_writes_a_template_that_validates_and_refuses_to_overwrite(tmp_path):
    res = runner.invoke(app, ["init", str(tmp_path / "proj"), "--template", "vae-shapes-tiny"])
    assert res.exit_code == 0, res.output
    written = tmp_path / "proj" / "vae-shapes-tiny.yaml"
    assert written.read_bytes() == (ROOT / "configs" / "vae-shapes-tiny.yaml").read_bytes()
    assert runner.invoke(app, ["config", "validate", str(written)]).exit_code == 0
    again = runner.invoke(app, ["init", str(tmp_path / "proj"), "--template", "vae-shapes-tiny"])
    assert again.exit_code == 2 and "exists" in again.stderr and "--force" in again.stderr
    assert runner.invoke(app, ["init", str(tmp_path / "proj"), "-t", "vae-shapes-tiny", "--force"]).exit_code == 0
    bad = runner.invoke(app, ["init", str(tmp_path / "proj"), "--template", "nope"])
    assert bad.exit_code == 2 and "vae-shapes-tiny" in bad.output  # the choices are listed
    assert not list((tmp_path / "proj").glob(".*.tmp"))


def test_a_template_name_stands_for_a_path_and_unknown_names_list_the_templates(tmp_path):
    assert runner.invoke(app, ["config", "validate", "vae-shapes-tiny"]).exit_code == 0
    res = runner.invoke(app, ["config", "validate", "vae-shapes-tinyy"])
    assert res.exit_code == 2 and "no template has that name" in res.stderr and "vae-shapes-tiny," in res.stderr
    folder = runner.invoke(app, ["config", "validate", str(tmp_path)])
    assert folder.exit_code == 2 and "is a directory" in folder.stderr


def to_uint8(grid: torch.Tensor) -> np.ndarray:
    """What torchvision.utils.save_image writes for a [0, 1] grid (C, H, W)."""
    return grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()


def test_generate_writes_the_decoded_prior_samples(run_dir, tmp_path):
    out = tmp_path / "grid.png"
    res = runner.invoke(app, ["generate", "--model", str(run_dir), "-n", "16", "--out", str(out), "--seed", "5"])
    assert res.exit_code == 0, res.output
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape == (4 * 34 + 2, 4 * 34 + 2, 3)  # 4x4 grid of 32x32 images, padding 2
    model, _ = load_model(run_dir)
    z = torch.randn(16, model.latent_dim, generator=torch.Generator().manual_seed(5))
    want = to_uint8(make_grid(torch.sigmoid(model.decode(z)).detach(), nrow=4, padding=2))
    assert np.abs(png.astype(int) - want.astype(int)).max() <= 1  # same z, same decoder: same pixels


def test_interpolate_rows_run_between_two_reconstructions(run_dir, tmp_path):
    out = tmp_path / "interp.png"
    res = runner.invoke(app, ["interpolate", "--model", str(run_dir), "--pairs", "3", "--steps", "5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    png = np.asarray(Image.open(out).convert("L")).astype(float) / 255
    assert png.shape == (3 * 34 + 2, 5 * 34 + 2)
    model, cfg = load_model(run_dir)
    test = load_split(cfg, "test")
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:6]
    first = model.reconstruct(test[idx[:3]])  # (3, 1, 32, 32)
    last = model.reconstruct(test[idx[3:]])
    for row in range(3):
        top = 2 + row * 34
        left_tile = png[top : top + 32, 2 : 2 + 32]
        right_tile = png[top : top + 32, 2 + 4 * 34 : 2 + 4 * 34 + 32]
        assert np.abs(left_tile - first[row, 0].numpy()).max() < 1 / 255 + 1e-6
        assert np.abs(right_tile - last[row, 0].numpy()).max() < 1 / 255 + 1e-6


def test_evaluate_json_matches_the_library(run_dir, tmp_path):
    out = tmp_path / "eval.json"
    res = runner.invoke(app, ["evaluate", "--model", str(run_dir), "--out", str(out), "--set", "eval.iwae_k=16"])
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    model, cfg = load_model(run_dir)
    cfg.eval.iwae_k = 16
    want = evaluate(model, load_split(cfg, "test"), cfg.eval, **known_factors(cfg))
    assert got.keys() == want.keys() and "disentanglement/mig" in got  # shapes has known factors
    for key in ("neg_elbo_nats", "iwae_nll_nats", "mse", "psnr", "active_units", "disentanglement/mig",
                "disentanglement/sap"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    assert got["iwae_k"] == 16 and got["examples"] == 256
    assert "iwae_nll_nats" in res.stdout and f"wrote {out}" in res.stdout
    assert math.isclose(got["neg_elbo_nats"], got["reconstruction_nats"] + got["kl_nats"], rel_tol=1e-6)


def test_bad_output_and_missing_model_exit_2(run_dir, tmp_path):
    res = runner.invoke(app, ["generate", "--model", str(run_dir), "--out", str(tmp_path / "x.gif")])
    assert res.exit_code == 2 and ".png" in res.stderr
    assert not (tmp_path / "x.gif").exists()
    res = runner.invoke(app, ["interpolate", "--model", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.stderr


def test_console_script_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("name: conv", "name: convv", 1))
    proc = subprocess.run([VAEFLOW, "train", str(bad), "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "model.encoder: unknown encoder 'convv'; known encoders: conv, mlp" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing half-written


def imports_of(path: Path) -> set[str]:
    """The absolute module names a file imports, to the depth of vaeflow's subpackages (vaeflow.core, ...)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        for module in modules:
            parts = module.split(".")
            names.add(".".join(parts[:2]) if parts[0] == "vaeflow" else parts[0])
    return names


def test_core_imports_no_plugin_and_no_pipeline():
    for path in sorted((ROOT / "core").rglob("*.py")):
        bad = imports_of(path) & {"vaeflow.plugins", "vaeflow.pipelines"}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    for path in sorted((ROOT / "plugins").rglob("*.py")):
        assert "vaeflow.pipelines" not in imports_of(path), path


def test_everything_imports_through_the_vaeflow_namespace():
    """No file of the project imports the folders by their bare names (core, plugins, pipelines): installed, they
    exist only as vaeflow.core, vaeflow.plugins and vaeflow.pipelines, and a user's own core/ must not shadow them."""
    folders = ("core", "plugins", "pipelines", "tests", "examples", "scripts", "docker", "vaeflow")
    files = [p for folder in folders for p in (ROOT / folder).rglob("*.py") if ".venv" not in p.parts]
    assert len(files) > 50
    for path in files:
        bare = imports_of(path) & {"core", "plugins", "pipelines"}
        assert not bare, f"{path.relative_to(ROOT)} imports {bare}"


def test_render_traversals_from_a_run_dir(run_dir, tmp_path):
    res = runner.invoke(app, ["render", "--model", str(run_dir), "--out", str(tmp_path / "r"),
                              "--kind", "traversal", "--kind", "phase"])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "r" / "traversal" / "traversal.json").read_text())
    _, cfg = load_model(run_dir)
    assert sorted(info["order"]) == list(range(cfg.model.latent_dim))  # every dimension, ordered by KL
    kl = info["kl_per_dim"]
    assert [kl[j] for j in info["order"]] == sorted(kl, reverse=True)
    assert (tmp_path / "r" / "phase" / "phase.png").stat().st_size > 0
    assert not (tmp_path / "r" / "interpolation").exists()  # only the renderers asked for
    bad = runner.invoke(app, ["render", "--model", str(run_dir), "--out", str(tmp_path / "x"), "--kind", "nope"])
    assert bad.exit_code == 2 and "unknown renderer 'nope'" in bad.stderr
    vq_only = runner.invoke(app, ["render", "--model", str(run_dir), "--out", str(tmp_path / "y"), "--kind", "discrete"])
    assert vq_only.exit_code == 2 and "discrete" in vq_only.stderr


# --- start-up: what a command imports -------------------------------------------------------------------------
HEAVY = ("torch", "mlflow", "prefect")


def imported(*args: str, env: dict | None = None) -> tuple[set[str], subprocess.CompletedProcess]:
    """The modules a fresh `vaeflow ARGS` process imports (python -X importtime), and the process."""
    proc = subprocess.run([sys.executable, "-X", "importtime", VAEFLOW, *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "vaeflow.pipelines.cli" in names  # the parse worked
    return names, proc


def heavy(names: set[str]) -> set[str]:
    """Which of torch, mlflow and prefect were imported."""
    return {h for h in HEAVY if h in names}


def test_help_imports_no_torch_mlflow_or_prefect():
    names, proc = imported("--help")
    assert not heavy(names) and "plugins" in proc.stdout


def test_config_validate_imports_torch_but_not_mlflow_or_prefect():
    names, proc = imported("config", "validate", str(TINY))
    assert heavy(names) == {"torch"} and "valid" in proc.stdout  # torch: the shape check builds the model


def test_plugins_answers_from_its_cache_without_torch_and_says_the_same(tmp_path):
    for args in (("plugins",), ("plugins", "--json")):
        env = {**os.environ, "VAEFLOW_CACHE_DIR": str(tmp_path / "-".join(args))}  # cold: an empty cache
        cold_names, cold = imported(*args, env=env)
        warm_names, warm = imported(*args, env=env)
        assert "torch" in cold_names and not heavy(warm_names)
        assert warm.stdout == cold.stdout and "vaeflow.plugins.encoders" in warm.stdout


def test_plugins_cache_misses_when_a_plugin_file_or_vaeflow_plugins_changes(tmp_path):
    """A listing served from the cache after a plugin's source changed would name components that are gone."""
    pkg = tmp_path / "src"
    pkg.mkdir()
    probe = pkg / "vf_cache_probe.py"
    module = textwrap.dedent('''
        from vaeflow.core.hookspecs import hookimpl
        from vaeflow.plugins.encoders import MLPEncoder


        class Probe(MLPEncoder):
            name = "{name}"


        @hookimpl
        def register_encoders(register):
            register(Probe)
    ''')
    probe.write_text(module.format(name="probe-one"))
    env = {**os.environ, "VAEFLOW_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(pkg),
           "VAEFLOW_PLUGINS": "vf_cache_probe"}
    names, proc = imported("plugins", env=env)
    assert "probe-one" in proc.stdout and "torch" in names
    names, proc = imported("plugins", env=env)
    assert "probe-one" in proc.stdout and not heavy(names)  # a hit
    probe.write_text(module.format(name="probe-two-renamed"))  # another size, another mtime
    names, proc = imported("plugins", env=env)
    assert "probe-two-renamed" in proc.stdout and "probe-one" not in proc.stdout and "torch" in names
    names, proc = imported("plugins", env={**env, "VAEFLOW_PLUGINS": ""})
    assert "probe-two" not in proc.stdout and "torch" in names  # the plugin list changed: a miss


def test_until_and_force_complete_to_the_configs_stage_ids():
    """Shell completion (bash) of `run --until` and `--force` offers the stage graph of the config on the line."""
    from vaeflow.core.config import load_config
    from vaeflow.pipelines.pipeline import stage_graph

    ids = [s.id for s in stage_graph(load_config(TINY, [])).stages]

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        env = {**os.environ, "_VAEFLOW_COMPLETE": "complete_bash", "COMP_WORDS": line, "COMP_CWORD": str(len(words) - 1)}
        proc = subprocess.run([VAEFLOW], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.split()

    assert complete(f"vaeflow run {TINY} --until ") == ids
    assert complete(f"vaeflow run {TINY.stem} --force tr") == [i for i in ids if i.startswith("tr")]  # a template name
    assert complete("vaeflow run --until ") == []  # no config yet: nothing to offer


def test_render_kind_completes_to_the_registered_renderers():
    from vaeflow.core.registry import get_registry

    env = {**os.environ, "_VAEFLOW_COMPLETE": "complete_bash", "COMP_WORDS": "vaeflow render --kind ", "COMP_CWORD": "3"}
    proc = subprocess.run([VAEFLOW], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = get_registry().names("renderer")
    assert proc.stdout.split() == list(names) and {"traversal", "phase"} <= set(names)
