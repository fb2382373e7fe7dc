"""The third-party plugin path end to end: pip-install examples/plugin-package, discover it, train with its encoder,
and run its own model kind (`rae`) through the whole pipeline, with the stage that kind adds (`fit_gmm`).

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

from conftest import run_result

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "examples" / "plugin-package"
CONFIG = ROOT / "configs" / "vae-shapes-tiny.yaml"
DIST = "vaeflow-example 0.1.0"
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
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'vaeflow'; from vaeflow.pipelines.cli import main; main()"]


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
    assert (target / "vaeflow_example" / "rae.py").is_file()
    assert list(target.glob("vaeflow_example-0.1.0.dist-info/entry_points.txt"))
    return target


def test_installed_plugin_is_listed_with_its_distribution(site, tmp_path):
    proc = vaeflow("plugins", "--json", env=_env(tmp_path, pythonpath=site), cwd=tmp_path)
    encoders = _encoders(proc)
    assert "residual-mlp" in encoders, encoders
    assert encoders["residual-mlp"].startswith(DIST), encoders["residual-mlp"]
    assert "vaeflow_example.encoder" in encoders["residual-mlp"]
    models = {m["name"]: m for m in json.loads(proc.stdout)["model"]}
    assert models["rae"]["source"].startswith(DIST) and {"vae", "vqvae2"} <= set(models)
    assert models["rae"]["capabilities"]["continuous"] and models["rae"]["capabilities"]["log_likelihood"] is None
    stages = {s["name"]: s["source"] for s in json.loads(proc.stdout)["stage"]}
    assert stages["fit_gmm"].startswith(DIST) and "vaeflow_example.gmm" in stages["fit_gmm"], stages
    assert {"mlp", "conv"} <= set(encoders)  # the built-ins are still there
    assert "did not load" not in proc.stderr, proc.stderr


def test_train_with_installed_plugin(site, tmp_path):
    run = tmp_path / "run"
    proc = vaeflow("train", str(CONFIG), "--out", str(run), *SMALL_RUN, "--json", env=_env(tmp_path, pythonpath=site),
                   cwd=tmp_path)
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

        from vaeflow.core.hookspecs import hookimpl
        from vaeflow.core.interfaces import Encoder, Options


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
        "_example_encoder_under_test", PACKAGE / "vaeflow_example" / "encoder.py")
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


RAE_SETS = ["model.kind=rae", "model.latent_weight=0.5", "model.decoder_weight=0.001"]


def test_rae_objective_is_its_three_terms_and_the_engine_sums_them_with_their_weights(local_plugins, tmp_path):
    """The example model kind in process (loaded through VAEFLOW_PLUGINS from its source file): each term checked
    against a hand computation, and the engine's loss is the weighted sum the model asked for."""
    from vaeflow.core.config import load_config
    from vaeflow.core.engine import Trainer
    from vaeflow.core.model import build_model

    local_plugins({"vf_example_rae": (PACKAGE / "vaeflow_example" / "rae.py").read_text()})
    cfg = load_config(CONFIG, [*RAE_SETS, "train.progress=false", "data.dataset.n_train=64", "train.batch_size=16"])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.kind == "rae" and model.scheduled is None and not model.capabilities.discrete
    x = torch.rand(4, *model.encoder.in_shape)
    out = model(x)
    z = model.encoder(x)  # (4, J)
    want = {"reconstruction": -model.likelihood.log_prob(x, model.decoder(z)).mean(),
            "latent_norm": 0.5 * (z ** 2).sum(1).mean(),
            "decoder_l2": sum((p ** 2).sum() for p in model.decoder.parameters())}
    assert set(out.terms) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(out.terms[name], value)
    assert out.weights == {"latent_norm": 0.5, "decoder_l2": 0.001}

    trainer = Trainer(cfg, tmp_path / "run")
    batch = next(iter(trainer.data.epoch(torch.arange(64), 0)))  # (16, C, H, W)
    recorded = trainer.train_step(batch).tolist()  # [loss, grad_norm, *the model's terms and stats]
    values = dict(zip(("loss", "grad_norm", *trainer.model_terms), recorded))
    assert values["loss"] == pytest.approx(values["reconstruction"] + 0.5 * values["latent_norm"]
                                           + 0.001 * values["decoder_l2"], rel=1e-6)


def test_the_rae_adds_fit_gmm_after_train_and_its_options_key_only_that_stage(local_plugins):
    """In process, without running anything: the kind's stage sits after train and refines the model, so the stages
    after it read its result as `train`; model.ex_post is in fit_gmm's key and not in train's, --force fit_gmm re-runs
    fit_gmm and the stages that load its model, and a kind without ex-post options cannot run the stage."""
    from vaeflow.core.config import apply_sets, load_config
    from vaeflow.core.errors import ConfigError
    from vaeflow.pipelines.pipeline import plan, stage_graph, what_runs_again

    local_plugins({"vf_example_rae": (PACKAGE / "vaeflow_example" / "rae.py").read_text(),
                   "vf_example_gmm": (PACKAGE / "vaeflow_example" / "gmm.py").read_text()})
    cfg = load_config(CONFIG, [*RAE_SETS, "model.ex_post.components=4"])
    graph = stage_graph(cfg)
    ids = [s.id for s in graph.stages]
    assert ids.index("train") < ids.index("fit_gmm") < ids.index("evaluate"), ids
    assert graph.needs["fit_gmm"] == ["prepare_data", "train"]
    for later in ("evaluate", "render", "register"):  # the refined model replaces train's for every stage after it
        assert graph.sources[later]["train"] == ["fit_gmm"] and "train" not in graph.needs[later], later
    results = {"prepare_data": {"sha256": "d" * 64}, "train": {"run_dir": "trained", "sha256": "w" * 64},
               "fit_gmm": {"run_dir": "refined", "sha256": "r" * 64}, "train_features": {"sha256": "f" * 64}}
    evaluate_inputs = graph.inputs_of(graph.by_id["evaluate"], results)
    assert evaluate_inputs["train"] is results["fit_gmm"], evaluate_inputs
    assert graph.inputs_of(graph.by_id["fit_gmm"], results)["train"] is results["train"]
    evaluate_key = graph.key(graph.by_id["evaluate"], cfg, evaluate_inputs)
    for change in ({"sha256": "s" * 64}, {"plugins_sha256": "p" * 64}):  # new weights, or the gmm prior's code
        other_model = {**evaluate_inputs, "train": {**results["fit_gmm"], **change}}
        assert graph.key(graph.by_id["evaluate"], cfg, other_model) != evaluate_key, change

    data, trained = {"sha256": "d" * 64}, {"sha256": "w" * 64}

    def keys(c):
        g = stage_graph(c)
        return (g.key(g.by_id["train"], c, {"prepare_data": data}),
                g.key(g.by_id["fit_gmm"], c, {"prepare_data": data, "train": trained}))

    train_key, gmm_key = keys(cfg)
    for change in ("model.ex_post.components=3", "model.ex_post.covariance=diag", "model.ex_post.seed=1",
                   "model.ex_post.samples=16"):
        other_train, other_gmm = keys(apply_sets(cfg, [change]))
        assert other_train == train_key and other_gmm != gmm_key, change
    assert keys(apply_sets(cfg, ["model.latent_weight=0.25"]))[0] != train_key  # a weight-changing option still counts
    assert graph.key(graph.by_id["fit_gmm"], cfg, {"prepare_data": data, "train": {"sha256": "v" * 64}}) != gmm_key

    refits = ["fit_gmm", "evaluate", "render", "register"]
    assert ("`model.ex_post`", refits) in what_runs_again(graph, cfg)  # what `vaeflow stages --markdown` shows

    ids, forced = plan(cfg, force=["fit_gmm"])
    assert forced == set(refits) and "register" in ids
    assert plan(cfg, until="fit_gmm")[0] == ["prepare_data", "train", "fit_gmm"]
    fit_gmm = graph.by_id["fit_gmm"]
    with pytest.raises(ConfigError, match="model.ex_post"):
        type(fit_gmm).check(load_config(CONFIG, []), "config")  # kind=vae has no model.ex_post


def _run(args: list[str], env: dict[str, str], cwd: Path) -> dict:
    """`vaeflow run CONFIG ARGS...`: the pipeline's result (stage statuses, folders), or a failed assertion."""
    proc = subprocess.run([*_vaeflow_cmd(), "run", str(CONFIG), "--json", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return run_result(proc.stdout)


def _gmm(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "gmm.safetensors"))


def _png(path: Path) -> torch.Tensor:
    """A PNG's pixels as int16 (H, W, C), for differences."""
    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).to(torch.int16)


def test_an_installed_model_kind_runs_through_the_whole_pipeline(site, tmp_path, monkeypatch):
    """`vaeflow run` with kind rae from the installed package: trained, its ex-post GMM fitted (the package's own
    stage), evaluated, rendered and registered, with its own loss terms in MLflow and the package pinned in the
    registered model's requirements. fit_gmm refines the model: the champion is the trained model with the mixture as
    model.prior, evaluate's FID and `vaeflow generate` sample the mixture. Then the stage's caching: an identical run is
    all cached, and a model.ex_post change or --force fit_gmm re-runs fit_gmm and the stages that load its model."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file
    from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

    from vaeflow.core import load_model
    from vaeflow.core.interfaces import file_sha256, to_unit_float
    from vaeflow.core.manifest import load_prepared
    from vaeflow.core.registry import reset_registry
    from vaeflow.core.sample_quality import FEATURES_INFO, load_feature_net, quality_scores
    from vaeflow.pipelines.render import samples as render_samples

    env = {**_env(tmp_path, pythonpath=site), "VAEFLOW_HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    sets = [*RAE_SETS, "data.dataset.n_train=512", "data.dataset.n_test=64", "train.epochs=1", "train.progress=false",
            "quality.feature_epochs=1", "quality.samples=64", "tracking.promote_metric=mse",
            "tracking.model_name=rae-tiny", "model.ex_post.components=4", "model.ex_post.samples=16"]
    args = [a for s in sets for a in ("--set", s)]
    first = _run(args, env, tmp_path)
    assert first["stages"]["fit_gmm"] == "ran" and first["stages"]["train"] == "ran", first["stages"]
    assert list(first["stages"]).index("fit_gmm") == list(first["stages"]).index("train") + 1
    assert first["stages"]["train_features"] == "ran" and first["model"]["champion"], first
    folder = Path(first["gmm"])
    for name in ("gmm.safetensors", "ex_post.json", "latents.safetensors", "samples.png", "model/config.yaml",
                 "model/plugins.json", "model/model.safetensors"):
        assert (folder / name).is_file(), name

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    (version,) = client.search_model_versions("name='rae-tiny'")
    runs = client.search_runs([client.get_experiment_by_name("vaeflow").experiment_id])
    train = next(r for r in runs if r.data.tags.get("stage") == "train")
    assert {"epoch/reconstruction", "epoch/latent_norm", "epoch/decoder_l2"} <= set(train.data.metrics)
    assert "epoch/kl" not in train.data.metrics and train.data.tags["plugin.kind"].startswith(f"rae ({DIST}")
    evaluate = next(r for r in runs if r.data.tags.get("stage") == "evaluate")
    assert "eval/mse" in evaluate.data.metrics and "eval/iwae_nll_nats" not in evaluate.data.metrics  # no bound
    local = Path(mlflow.artifacts.download_artifacts(client.get_model_version_download_uri("rae-tiny", version.version),
                                                     dst_path=str(tmp_path / "download"), tracking_uri=uri))
    requirements = (local / "requirements.txt").read_text().split()
    assert "vaeflow-example==0.1.0" in requirements and any(r.startswith("vaeflow==") for r in requirements)
    plugins = json.loads((local / "artifacts" / "model_dir" / "plugins.json").read_text())
    assert plugins["kind"]["package"] == "vaeflow-example" and len(plugins["kind"]["code_sha256"]) == 64
    assert plugins["prior"]["name"] == "gmm" and plugins["prior"]["package"] == "vaeflow-example", plugins

    # the GMM against an independent computation on the latents the stage fitted it to
    fit = next(r for r in runs if r.data.tags.get("stage") == "fit_gmm")
    metrics = fit.data.metrics
    artifacts = {a.path for a in client.list_artifacts(fit.info.run_id, "ex_post")}
    assert {"ex_post/gmm.safetensors", "ex_post/ex_post.json"} <= artifacts, artifacts
    assert [a.path for a in client.list_artifacts(fit.info.run_id, "images")] == ["images/samples.png"]
    latents = load_file(str(folder / "latents.safetensors"))
    z = latents["train"].double()  # (512, 8)
    assert z.shape == (512, 8) and latents["test"].shape == (64, 8)
    g = _gmm(first["gmm"])
    assert g["weights"].shape == (4,) and g["covariances"].shape == (4, 8, 8)
    mixture = MixtureSameFamily(Categorical(probs=g["weights"]), MultivariateNormal(g["means"], g["covariances"]))
    gmm_ll = mixture.log_prob(z).mean().item()
    gaussian = MultivariateNormal(z.mean(0), torch.cov(z.T, correction=0) + 1e-6 * torch.eye(8, dtype=z.dtype))
    gaussian_ll = gaussian.log_prob(z).mean().item()  # the k = 1 maximum-likelihood fit, in closed form
    assert metrics["ex_post/train_log_likelihood_gmm"] == pytest.approx(gmm_ll, rel=1e-6)
    assert metrics["ex_post/train_log_likelihood_gaussian"] == pytest.approx(gaussian_ll, rel=1e-6)
    assert {f"ex_post/{s}_log_likelihood_{d}" for s in ("train", "test") for d in ("gmm", "gaussian", "standard_normal")
            } <= set(metrics)
    # 4 components fitted by EM from k-means++ beat the single Gaussian on the latents they were fitted to
    assert gmm_ll >= gaussian_ll, (gmm_ll, gaussian_ll)
    record = json.loads((folder / "ex_post.json").read_text())
    assert record["log_likelihood"][-1] == pytest.approx(gmm_ll, rel=1e-9)
    assert record["log_likelihood"][-1] >= record["log_likelihood"][0]

    # the champion is the refined model: train's weights, with the fitted mixture as model.prior
    assert client.get_model_version_by_alias("rae-tiny", "champion").version == version.version
    assert version.tags["weights_sha256"] == file_sha256(folder / "model" / "model.safetensors")
    monkeypatch.syspath_prepend(str(site))  # load models with the installed package in this process
    reset_registry()
    try:
        champion, champion_cfg = load_model(local / "artifacts" / "model_dir")
        trained, _ = load_model(first["run_dir"])
        refined, _ = load_model(folder / "model")
        assert type(champion.prior).name == "gmm" and type(trained.prior).name == "standard-normal"
        assert (champion_cfg.model.prior.name, champion_cfg.model.prior.components) == ("gmm", 4)
        for name in ("weights", "means", "covariances"):
            assert torch.equal(getattr(champion.prior, name), g[name]), name
        state, want = champion.state_dict(), trained.state_dict()
        assert set(state) - set(want) == {"prior.weights", "prior.means", "prior.covariances"}
        assert any(k.startswith("decoder.") for k in want)
        for name, value in want.items():  # the decoder (and the encoder) as trained
            assert torch.equal(state[name], value), name

        # evaluate's FID is that of the mixture's samples (same seed, same feature network), not of N(0, I)'s
        scores = json.loads(Path(first["eval"]).read_text())
        n = scores["quality/samples"]
        (features,) = [p.parent for p in (tmp_path / ".vaeflow" / "features").glob(f"*/{FEATURES_INFO}")]
        net, _ = load_feature_net(features)
        test = to_unit_float(load_prepared(first["data"]["folder"])["test"])[:n]
        fid = {name: quality_scores(net, test, m.generate(n, torch.Generator().manual_seed(0)))["fid"]
               for name, m in (("gmm", refined), ("standard_normal", trained))}
        assert scores["quality/fid"] == pytest.approx(fid["gmm"], rel=1e-4), (scores["quality/fid"], fid)
        assert abs(fid["gmm"] - fid["standard_normal"]) > 1e-2 * fid["gmm"], fid

        # `vaeflow generate` on the champion: reproducible with a seed, and the mixture's samples
        grids = [tmp_path / f"generated-{i}.png" for i in range(2)]
        for grid in grids:
            proc = vaeflow("generate", "--model", "models:/rae-tiny@champion", "-n", "16", "--seed", "3", "--out",
                           str(grid), env=env, cwd=tmp_path)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        assert grids[0].read_bytes() == grids[1].read_bytes()
        render_samples(refined, 16, 3, tmp_path / "mixture.png")
        render_samples(trained, 16, 3, tmp_path / "standard-normal.png")
        generated = _png(grids[0])
        assert (generated - _png(tmp_path / "mixture.png")).abs().max().item() <= 1
        assert (generated - _png(tmp_path / "standard-normal.png")).abs().float().mean().item() > 1
    finally:
        reset_registry()

    again = _run(args, env, tmp_path)
    assert set(again["stages"].values()) <= {"cached", "skipped"}, again["stages"]
    assert again["gmm"] == first["gmm"]

    refits = {"fit_gmm", "evaluate", "render", "register"}  # fit_gmm and the stages that load its model
    three = _run([*args, "--set", "model.ex_post.components=3"], env, tmp_path)
    assert {k for k, v in three["stages"].items() if v == "ran"} == refits, three["stages"]  # train stays cached
    assert three["gmm"] != first["gmm"] and _gmm(three["gmm"])["weights"].shape == (3,)
    assert three["model"]["version"] != first["model"]["version"]  # another mixture, another model

    before = (folder / "gmm.safetensors").stat().st_mtime_ns
    forced = _run([*args, "--force", "fit_gmm"], env, tmp_path)
    assert {k for k, v in forced["stages"].items() if v == "ran"} == refits, forced["stages"]
    assert forced["gmm"] == first["gmm"] and (folder / "gmm.safetensors").stat().st_mtime_ns != before
    for name, value in _gmm(forced["gmm"]).items():  # seeded: the same fit again
        torch.testing.assert_close(value, g[name], rtol=1e-6, atol=1e-9)
    assert forced["model"]["reused"] and forced["model"]["version"] == first["model"]["version"]  # the same weights


def test_the_package_runs_the_conformance_kit_in_its_own_pytest(site, tmp_path):
    """examples/plugin-package/tests/ uses vaeflow.core.testing as a plugin author would, against the installed package."""
    tests = tmp_path / "tests"
    shutil.copytree(PACKAGE / "tests", tests)
    env = _env(tmp_path, pythonpath=site)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "24 passed" in proc.stdout
