"""Plugin discovery: built-ins through entry points, clashes, broken plugins, misspelled hooks, listing."""

from __future__ import annotations

import inspect
import json

import pytest
from typer.testing import CliRunner

from vaeflow.core import hookspecs
from vaeflow.core.errors import PluginError
from vaeflow.core.interfaces import FAMILIES, HOOKS
from vaeflow.core.registry import get_registry
from vaeflow.pipelines.cli import app

GOOD = """
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Noise, Options

class Flip(Noise):
    name = "flip"
    def __call__(self, x):
        return 1 - x

@hookimpl
def register_noises(register):
    register(Flip)
"""


def test_builtins_come_from_entry_points():
    reg = get_registry()
    assert {"mlp", "conv"} <= set(reg.names("encoder"))
    assert {"bernoulli", "gaussian", "gaussian-learned"} <= set(reg.names("likelihood"))
    assert {"fashion-mnist", "mnist", "shapes", "image-folder"} <= set(reg.names("dataset"))
    assert reg.get("encoder", "mlp").source.startswith("vaeflow ")
    assert "vaeflow.plugins.encoders" in reg.get("encoder", "mlp").source
    assert reg.failures == []


def test_every_hook_has_a_family_and_a_docstring():
    specs = {n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("register_")}
    assert specs == set(HOOKS.values())
    assert set(HOOKS) == set(FAMILIES)
    for name in specs:
        assert getattr(hookspecs, name).__doc__, f"hook {name} needs a docstring"


def test_local_module_via_env(local_plugins):
    reg = local_plugins({"vf_good": GOOD})
    entry = reg.get("noise", "flip")
    assert entry.source == "VAEFLOW_PLUGINS:vf_good"
    assert "gaussian" in reg.names("noise")  # built-ins still there


def test_name_clash_names_both_sources(local_plugins):
    clash = """
from vaeflow.core.hookspecs import hookimpl
from vaeflow.plugins.encoders import MLPEncoder

class Mine(MLPEncoder):
    name = "mlp"

@hookimpl
def register_encoders(register):
    register(Mine)
"""
    with pytest.raises(PluginError) as info:
        local_plugins({"vf_clash": clash})
    msg = str(info.value)
    assert "'mlp'" in msg and "vaeflow.plugins.encoders" in msg and "VAEFLOW_PLUGINS:vf_clash" in msg


BROKEN = {
    "import error": ("raise ImportError('needs libfoo')\n", "needs libfoo"),
    "misspelled hook": ("""
from vaeflow.core.hookspecs import hookimpl

@hookimpl
def register_encoder(register):  # missing the final s
    pass
""", "register_encoder"),
    "wrong base class": ("""
from vaeflow.core.hookspecs import hookimpl

class NotAnEncoder:
    name = "x"

@hookimpl
def register_encoders(register):
    register(NotAnEncoder)
""", "must subclass vaeflow.core.interfaces.Encoder"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_plugin_is_reported_by_name_and_others_load(local_plugins, case):
    source, reason = BROKEN[case]
    reg = local_plugins({"vf_broken": source, "vf_good": GOOD})
    assert [n for n, _ in reg.failures] == ["vf_broken"]
    assert reason in reg.failures[0][1]
    assert "flip" in reg.names("noise") and "mlp" in reg.names("encoder")


def test_option_called_name_and_wrong_api_version_are_rejected(local_plugins):
    named = """
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Noise, Options

class Named(Noise):
    name = "named"
    class Options(Options):
        name: str = "x"

@hookimpl
def register_noises(register):
    register(Named)
"""
    future = "VAEFLOW_PLUGIN_API = 99\n" + GOOD
    reg = local_plugins({"vf_named": named, "vf_future": future})
    reasons = dict(reg.failures)
    assert "option called `name`" in reasons["vf_named"]
    assert "plugin API 99" in reasons["vf_future"]
    assert "named" not in reg.names("noise") and "flip" not in reg.names("noise")


def test_unknown_component_lists_known():
    with pytest.raises(PluginError, match="known encoders: conv, mlp"):
        get_registry().get("encoder", "cnn")


def test_cli_plugins_json_and_text(local_plugins):
    local_plugins({"vf_good": GOOD, "vf_broken": "import no_such_module_xyz\n"})
    runner = CliRunner()
    res = runner.invoke(app, ["plugins", "--json"])
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert set(data) == set(FAMILIES)
    assert {"name": "flip", "source": "VAEFLOW_PLUGINS:vf_good"} in data["noise"]
    extra = {"encoder": {"form"}, "decoder": {"form"}, "model": {"capabilities", "slots", "stages"},
             "stage": {"inputs", "optional"}, "metric": {"needs", "headline"}}
    assert all(set(item) == {"name", "source", *extra.get(family, ())} for family, items in data.items() for item in items)
    forms = {e["name"]: e["form"] for e in data["encoder"]}
    assert forms == {"conv": "vector", "mlp": "vector", "vqvae-conv": "feature map"}
    vqvae2 = next(m for m in data["model"] if m["name"] == "vqvae2")
    assert vqvae2["capabilities"]["discrete"] and vqvae2["slots"]["encoder"]["form"] == "feature map"
    assert vqvae2["stages"] == ["extract_codes", "train_prior", "sample"]
    stages = {s["name"]: s for s in data["stage"]}
    assert stages["train_prior"]["inputs"] == ["extract_codes"] and stages["sample"]["inputs"] == ["train", "train_prior"]
    assert {m["name"]: m["needs"] for m in data["metric"]} == {"codebook": ["discrete"], "latent": ["continuous"],
                                                              "disentanglement": ["continuous"]}
    assert "vf_broken" in res.stderr  # reported by name, not fatal
    text = runner.invoke(app, ["plugins"])
    assert text.exit_code == 0
    assert "flip" in text.stdout and "options: channels=[32, 64]" in text.stdout
    assert "produces: a feature map" in text.stdout and "capabilities: continuous latents, sampling, bound" in text.stdout


def test_plugin_code_hash_follows_its_imports_and_sees_every_edit(tmp_path, monkeypatch):
    """code_sha256 covers the module, what it imports from its own package (relative or absolute) and from core,
    never third-party code; an edit to any of those files changes it, and so does an import added later."""
    import importlib
    import os

    from vaeflow.core.registry import code_sha256, module_files

    pkg = tmp_path / "vf_hashpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import torch\nfrom . import b\nfrom vaeflow.core.errors import VaeflowError\n")
    (pkg / "b.py").write_text("X = 1\n")
    (pkg / "c.py").write_text("Y = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    names = lambda: {p.name for p in module_files("vf_hashpkg.a", {"vf_hashpkg", "vaeflow.core"})}  # noqa: E731
    assert names() == {"__init__.py", "a.py", "b.py", "errors.py"}
    before = code_sha256("vf_hashpkg.a")
    (pkg / "b.py").write_text("X = 2\n")  # same size, new bytes
    assert code_sha256("vf_hashpkg.a") != before
    edited = code_sha256("vf_hashpkg.a")
    (pkg / "b.py").write_text("X = 2\nfrom vf_hashpkg import c\n")
    os.utime(pkg / "b.py", ns=(1, 1))  # even with an old mtime, the size changed: b is parsed again
    assert "c.py" in names() and code_sha256("vf_hashpkg.a") != edited
