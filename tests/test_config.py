"""Config validation, overrides, schema and canonical hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from vaeflow.core.config import config_hash, config_model, env_overrides, load_config, validate
from vaeflow.core.errors import ConfigError
from vaeflow.core.model import build_model
from vaeflow.pipelines.cli import app

from conftest import ROOT, TINY

runner = CliRunner()


def tiny_raw() -> dict:
    return yaml.safe_load(TINY.read_text())


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def validate_cli(path: Path, *extra: str):
    res = runner.invoke(app, ["config", "validate", str(path), *extra])
    assert "Traceback" not in res.output
    return res


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(name):
    res = validate_cli(ROOT / "configs" / name)
    assert res.exit_code == 0, res.output
    assert "valid" in res.stdout


def mutate(raw, dotted, value):
    node = raw
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value


@pytest.mark.parametrize(
    "dotted, value, path, expect",
    [
        ("train.epoch", 3, "train.epoch", "allowed keys here: "),  # typo
        ("train.batch_size", "big", "train.batch_size", "integer"),  # wrong type
        ("model.encoder", {"name": "cnn"}, "model.encoder", "known encoders: conv, mlp"),  # unknown plugin
        ("model.latent_dim", -4, "model.latent_dim", "greater than 0"),  # negative size
        ("model.encoder", {"name": "conv", "chanels": [8]}, "model.encoder.chanels", "channels"),  # option typo
        ("model.likelihood", {"name": "gaussian", "sigma": -1}, "model.likelihood.sigma", "greater than 0"),
        ("data.dataset", {"name": "shapes", "image_size": "x"}, "data.dataset.image_size", "integer"),
        ("train.beta", {"schedule": "linear"}, "train.beta.warmup_steps", "missing"),
        ("model.decoder", {"channels": [8]}, "model.decoder", "choose one of: conv, mlp"),
    ],
)
def test_invalid_configs_exit_2_with_path_and_allowed(tmp_path, dotted, value, path, expect):
    raw = tiny_raw()
    mutate(raw, dotted, value)
    res = validate_cli(write(tmp_path, raw))
    assert res.exit_code == 2
    line = next((ln for ln in res.stderr.splitlines() if ln.strip().startswith(path + ":")), None)
    assert line is not None, res.stderr
    assert expect in line, line
    if expect.startswith("allowed keys"):
        assert "epochs" in line and "batch_size" in line


def test_shape_mismatch_is_a_config_error(tmp_path):
    raw = tiny_raw()
    raw["data"]["dataset"]["image_size"] = 30  # 30 is not a multiple of 4 (two stride-2 stages)
    res = validate_cli(write(tmp_path, raw))
    assert res.exit_code == 2
    assert "model.likelihood" not in res.stderr
    assert "model.encoder:" in res.stderr and "multiples of 4" in res.stderr and "30x30" in res.stderr
    res = validate_cli(write(tmp_path, raw), "--set", "data.pad_to=32")
    assert res.exit_code == 0, res.output


def test_dae_needs_noise(tmp_path):
    res = validate_cli(TINY, "--set", "model.kind=dae")
    assert res.exit_code == 2 and "model.noise" in res.stderr
    res = validate_cli(TINY, "--set", "model.kind=dae", "--set", "model.noise={name: masking, p: 0.3}")
    assert res.exit_code == 0, res.output


def test_missing_file_and_bad_yaml(tmp_path):
    res = validate_cli(tmp_path / "nope.yaml")
    assert res.exit_code == 2 and "file not found" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    res = validate_cli(bad)
    assert res.exit_code == 2 and "not valid YAML" in res.stderr


def test_set_and_env_overrides(monkeypatch):
    cfg = load_config(TINY, ["train.epochs=7", "train.lr=3e-4", "model.encoder.hidden=64"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.encoder.hidden) == (7, 3e-4, 64)
    environ = {"VAEFLOW_TRAIN__EPOCHS": "9", "VAEFLOW_PLUGINS": "x", "VAEFLOW_DATA__DATASET__N_TRAIN": "128"}
    assert env_overrides(environ) == [("data.dataset.n_train", 128), ("train.epochs", 9)]
    cfg = load_config(TINY, ["train.epochs=2"], environ=environ)
    assert cfg.train.epochs == 2  # --set wins over the environment
    assert cfg.data.dataset.n_train == 128
    with pytest.raises(ConfigError, match="expected --set section.field=value"):
        load_config(TINY, ["train.epochs"])
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(TINY, ["train.nope=1"])


def test_schema_has_plugin_options_as_discriminated_union():
    res = runner.invoke(app, ["config", "schema"])
    assert res.exit_code == 0
    schema = json.loads(res.stdout)
    defs = schema["$defs"]
    kinds = [m["$ref"].split("/")[-1] for m in schema["properties"]["model"]["oneOf"]]  # one per model kind
    builtin = ["ae", "beta-tcvae", "dae", "factor-vae", "info-vae", "iwae", "vae", "vqvae", "vqvae2", "wae-mmd"]
    assert kinds == [f"Model_{kind.replace('-', '_')}" for kind in builtin]
    assert [defs[k]["properties"]["kind"]["const"] for k in kinds] == builtin
    assert "noise" in defs["Model_dae"]["required"] and "noise" not in defs["Model_vae"]["properties"]
    assert "quantizer" not in defs["Model_vae"]["properties"] and "latent_dim" not in defs["Model_vqvae"]["properties"]
    enc = defs["Model_vae"]["properties"]["encoder"]
    assert enc["discriminator"]["propertyName"] == "name"
    assert set(enc["discriminator"]["mapping"]) == {"conv", "mlp", "vqvae-conv"}
    quantizer = defs["Model_vqvae2"]["properties"]["quantizer"]
    assert set(quantizer["discriminator"]["mapping"]) == {"fsq", "vq", "vq-ema"}
    conv = defs[enc["discriminator"]["mapping"]["conv"].split("/")[-1]]
    assert {"channels", "hidden", "activation", "name"} <= set(conv["properties"])
    assert conv["additionalProperties"] is False
    beta = defs["TrainConfig"]["properties"]["beta"]  # schedule plugins, tagged by `schedule` (may be left out)
    refs = [m["$ref"].split("/")[-1] for m in beta["oneOf"]]
    assert refs == ["Schedule_capacity", "Schedule_constant", "Schedule_cyclical", "Schedule_linear"]
    assert [defs[r]["properties"]["schedule"]["const"] for r in refs] == ["capacity", "constant", "cyclical", "linear"]
    assert set(defs["Schedule_linear"]["properties"]) == {"schedule", "value", "warmup_steps"}


def test_beta_value_alone_overrides_the_constant_default():
    cfg = load_config(TINY, ["train.beta.value=4"])
    assert cfg.train.beta.schedule == "constant" and cfg.train.beta.value == 4.0


def test_hash_is_canonical():
    raw = tiny_raw()
    a = validate(raw)
    # reversed key order and explicitly written defaults give the same hash
    rev = {k: (dict(reversed(list(v.items()))) if isinstance(v, dict) else v) for k, v in reversed(list(raw.items()))}
    rev["train"]["weight_decay"] = 0.0
    rev["model"]["encoder"]["activation"] = "relu"
    b = validate(rev)
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 64
    raw["train"]["lr"] = 5e-4
    c = validate(raw)
    assert config_hash(a) != config_hash(c)
    assert config_hash(a, "data") == config_hash(c, "data")
    assert config_hash(a, "train") != config_hash(c, "train")


def test_config_model_is_built_from_the_registry():
    model = config_model()
    assert "model" in model.model_fields
    cfg = validate(tiny_raw())
    assert type(cfg.model).__name__ == "Model_vae" and cfg.model.capabilities.log_likelihood == "bound"
    net = build_model(cfg)
    assert type(net.encoder).__name__ == "ConvEncoder"


def test_code_priors_do_not_change_the_hashes_of_models_without_code_grids():
    """The prior section only applies to models with code grids; another kind's fields are not in the model at all."""
    from vaeflow.core.config import config_hash, load_config

    base = load_config(TINY)
    other = load_config(TINY, ["prior.epochs=3"])
    assert config_hash(base) == config_hash(other) and config_hash(base, "model") == config_hash(other, "model")
    assert config_hash(base) != config_hash(load_config(TINY, ["model.latent_dim=3"]))
    with pytest.raises(ConfigError, match="model.vq: unknown key 'vq'; allowed keys here: decoder, encoder, kind, "
                                          "latent_dim, likelihood, prior"):
        load_config(TINY, ["model.vq.embedding_dim=7"])
