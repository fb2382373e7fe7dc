"""`vaeflow bench zoo`: the NLL estimator against closed forms, the two sides' networks and scores against each other,
and the report's statistics from hand-made records; no assertion is about speed, and pythae is only used where the
bench's virtualenv already exists."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vaeflow.core.errors import VaeflowError
from vaeflow.core.model import build_model
from vaeflow.pipelines import bench_zoo
from vaeflow.pipelines.bench_zoo import ZOO, ZooModel
from vaeflow.pipelines.pythae_worker import MLPDecoderNet, MLPEncoderNet, nll_batch_size
from vaeflow.plugins.latent_priors import StandardNormal
from vaeflow.plugins.likelihoods import Bernoulli, Gaussian
from vaeflow.plugins.models import VAE

# 784-400-(20, 20) and 20-400-784, weights and biases, counted by hand
MLP_PARAMS = (784 * 400 + 400) + 2 * (400 * 20 + 20) + (20 * 400 + 400) + (400 * 784 + 784)


# --- the estimator against a linear-Gaussian model with a known marginal -----------------------------------------
D, J, SIGMA = 6, 2, 0.5
SCALES = torch.tensor([1.5, 0.8], dtype=torch.float64)


def linear_gaussian(posterior_scale: float = 1.0, variance_factor: float = 1.0):
    """z ~ N(0, I_2), x = W z + b + 0.5 eps in R^6 as a vaeflow VAE, and the exact marginal p(x) = N(b, W W^T + s^2 I).

    W = Q diag(1.5, 0.8) has orthogonal columns, so the true posterior is diagonal: Sigma = diag(1 / (1 + s_j^2 /
    sigma^2)), mean A (x - b) with A = Sigma W^T / sigma^2. The encoder is that linear map (times posterior_scale) with
    the log-variance log Sigma + log variance_factor: (1, 1) gives the exact posterior."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D, J, generator=gen, dtype=torch.float64))  # (D, J) orthonormal columns
    w = q * SCALES  # (D, J)
    b = torch.randn(D, generator=gen, dtype=torch.float64)  # (D,)
    post_var = 1.0 / (1.0 + SCALES**2 / SIGMA**2)  # (J,)
    a = post_var[:, None] * w.T / SIGMA**2  # (J, D)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(D, 2 * J)).double()
    decoder = nn.Sequential(nn.Linear(J, D), nn.Unflatten(1, (1, 1, D))).double()
    with torch.no_grad():
        encoder[1].weight.copy_(torch.cat([posterior_scale * a, torch.zeros(J, D, dtype=torch.float64)]))
        encoder[1].bias.copy_(torch.cat([-posterior_scale * a @ b, post_var.log() + math.log(variance_factor)]))
        decoder[0].weight.copy_(w)
        decoder[0].bias.copy_(b)
    likelihood = Gaussian(Gaussian.Options(sigma=SIGMA), (1, 1, D))
    model = VAE(encoder, decoder, likelihood, StandardNormal(StandardNormal.Options(), J), J).eval()
    marginal = torch.distributions.MultivariateNormal(b, w @ w.T + SIGMA**2 * torch.eye(D, dtype=torch.float64))
    return model, marginal


def samples(marginal, n: int) -> torch.Tensor:
    """n draws of the marginal as images (n, 1, 1, 6)."""
    return marginal.sample((n,)).view(n, 1, 1, D)


def test_nll_with_the_true_posterior_is_the_exact_marginal_for_any_k():
    torch.manual_seed(0)
    model, marginal = linear_gaussian()
    x = samples(marginal, 16)
    exact = -marginal.log_prob(x.view(16, D)).mean().item()
    for k in (1, 7):  # every importance weight equals p(x): no Monte Carlo error at all
        assert bench_zoo.iwae_nll(model, x, k, batch_size=5) == pytest.approx(exact, abs=1e-9)


def test_nll_falls_to_the_exact_marginal_as_k_grows():
    torch.manual_seed(0)
    model, marginal = linear_gaussian(posterior_scale=0.6, variance_factor=2.5)  # a wrong, wider q(z|x)
    x = samples(marginal, 64)
    exact = -marginal.log_prob(x.view(64, D)).mean().item()
    nll = {k: bench_zoo.iwae_nll(model, x, k) for k in (1, 20, 5000)}
    assert nll[1] > nll[20] > nll[5000] > exact - 0.01  # a bound: tighter with k (Burda et al. 2016, Theorem 1)
    assert nll[1] - exact > 0.2  # the mismatch is visible at k = 1 ...
    assert nll[5000] == pytest.approx(exact, abs=0.02)  # ... and gone at k = 5000


def test_iwae_per_image_keeps_the_order_of_the_images():
    model, marginal = linear_gaussian()
    x = samples(marginal, 7)
    per_image = bench_zoo.iwae_per_image(model, x, 3, batch_size=3)  # batches of 3, 3, 1
    assert torch.allclose(per_image, marginal.log_prob(x.view(7, D)), atol=1e-9)


# --- both sides score the same quantity with the same networks ---------------------------------------------------
def test_bernoulli_on_continuous_pixels_is_pythaes_bce():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 28, 28, generator=gen)  # not binarized
    logits = 20 * torch.rand(4, 1, 28, 28, generator=gen) - 10  # |l| <= 10
    ours = Bernoulli(Bernoulli.Options(), (1, 28, 28)).log_prob(x, logits)  # (4,)
    bce = F.binary_cross_entropy(torch.sigmoid(logits).flatten(1), x.flatten(1), reduction="none").sum(1)  # (4,)
    assert torch.allclose(ours, -bce, rtol=1e-5)
    # where float32 sigmoid rounds to 1, BCE clamps log(1 - p) at -100; the exact value is x l - softplus(l) = -10
    x, logit = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), 20.0)
    assert Bernoulli(Bernoulli.Options(), (1, 1, 1)).log_prob(x, logit).item() == pytest.approx(-10.0, abs=1e-6)
    assert -F.binary_cross_entropy(torch.sigmoid(logit), x).item() == pytest.approx(-50.0)


def test_both_sides_have_the_same_networks():
    vaeflow = build_model(bench_zoo.zoo_config(ZOO["vae"], 0, 1, 1, 60_000))
    assert sum(p.numel() for p in vaeflow.parameters()) == MLP_PARAMS == bench_zoo.network_params() == 652_824


def test_pythaes_vamp_pseudo_inputs_carry_over():
    """pythae builds u_k = hardtanh(Linear(K, 784)(e_k), 0, 1) (a bias included); the vaeflow VampPrior loaded from
    the worker's W e_k + b has the same pseudo-inputs, and so the same prior density at any z."""
    torch.manual_seed(0)
    encoder, decoder = MLPEncoderNet(784, 400, 20), MLPDecoderNet(784, 400, 20)
    layer = nn.Linear(50, 784)
    nn.init.normal_(layer.weight, 0.3, 0.5)  # spread across the hard-tanh's clipped and linear parts
    pythae_u = F.hardtanh(layer(torch.eye(50)), 0.0, 1.0).view(50, 1, 28, 28)  # pythae's forward on its idle inputs
    weights = {"encoder": encoder.state_dict(), "decoder": decoder.state_dict(),
               "idle_weight": (layer.weight.t() + layer.bias).detach()}  # as pythae_worker.trained_weights saves it
    model = bench_zoo.pythae_networks_in_vaeflow(weights, 0, 1, 60_000)
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model.prior.pseudo_inputs, pythae_u)
        z = torch.randn(7, 20)
        mean, logvar = encoder(pythae_u)  # (50, 20) each: the mixture's components, pythae-side
        comp = torch.distributions.Normal(mean, (0.5 * logvar).exp())
        want = torch.logsumexp(comp.log_prob(z.unsqueeze(1)).sum(2), 1) - math.log(50)  # (7,)
        torch.testing.assert_close(model.prior.log_prob(z), want, rtol=1e-5, atol=1e-4)
    plain = bench_zoo.pythae_networks_in_vaeflow({k: weights[k] for k in ("encoder", "decoder")}, 0, 1, 60_000)
    assert type(plain.prior).__name__ == "StandardNormal"


def test_pythae_networks_load_into_the_vaeflow_vae():
    torch.manual_seed(0)
    encoder, decoder = MLPEncoderNet(784, 400, 20), MLPDecoderNet(784, 400, 20)
    model = build_model(bench_zoo.zoo_config(ZOO["vae"], 0, 1, 1, 60_000))
    bench_zoo.load_pythae_networks(model, encoder.state_dict(), decoder.state_dict())
    x, z = torch.rand(5, 1, 28, 28), torch.randn(5, 20)
    with torch.no_grad():
        mean, logvar = encoder(x)
        q = model.posterior(x)
        assert torch.allclose(q.mean, mean) and torch.allclose(q.logvar, logvar)
        assert torch.allclose(model.decode(z).flatten(1), decoder(z))  # logits, (5, 784)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_configs_carry_the_shared_hyperparameters(name):
    zoo = ZOO[name]
    if bench_zoo.missing_plugin(zoo):
        pytest.skip(bench_zoo.missing_plugin(zoo))
    cfg = bench_zoo.zoo_config(zoo, 2, 5, 1, 60_000)
    t, h = cfg.train, zoo.hyperparameters
    assert (t.epochs, t.batch_size, t.lr, t.weight_decay, t.seed) == (5, 128, 1e-3, 0.0, 2)  # AdamW(wd 0) = Adam
    model = build_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    extra = {"vamp": 50 * 784}.get(name, 0)  # the VampPrior's pseudo-inputs (pythae's have a bias: + 784)
    assert params == MLP_PARAMS + extra
    m = cfg.model
    if name == "iwae":
        assert m.samples == h["samples"] == 5
    if name == "beta-tcvae":
        assert (m.alpha, m.gamma, m.estimator, m.dataset_size) == (h["alpha"], h["gamma"], h["estimator"], 60_000)
        assert t.beta.model_dump()["value"] == h["beta"]  # the TC weight is train.beta
    if name == "vamp":
        assert m.prior.model_dump()["components"] == h["components"] == 50
    if name == "info-vae":
        assert (m.alpha, m.lambda_, m.kernel, m.kernel_scale) == (h["alpha"], h["lambda"], h["kernel"], h["kernel_scale"])


def test_missing_plugin_names_it():
    assert bench_zoo.missing_plugin(ZOO["vae"]) is None
    why = bench_zoo.missing_plugin(ZooModel("nope", "NOPE", {}, lambda h, n: {"kind": "no-such-kind"}))
    assert "no-such-kind" in why and "vae" in why  # what is missing, and what is registered


# --- the report's statistics ---------------------------------------------------------------------------------------
def records(nll: list[float], img_per_s: list[float]) -> list[dict]:
    """Per-seed records with the fields the bench reads."""
    return [{"nll": n, "img_per_s": s, "wall_s": 300_000 / s} for n, s in zip(nll, img_per_s)]


def test_summary_and_targets_from_per_seed_records():
    vaeflow = bench_zoo.side_summary(records([100.0, 102.0, 104.0], [3000.0, 3300.0, 3600.0]))
    pythae = bench_zoo.side_summary(records([101.0, 104.0, 107.0], [2000.0, 2200.0, 2400.0]))
    assert vaeflow["nll"] == {"mean": 102.0, "std": 2.0, "per_seed": [100.0, 102.0, 104.0]}  # sample std
    assert pythae["nll"]["std"] == pytest.approx(3.0)
    assert vaeflow["wall_s"]["per_seed"] == pytest.approx([100.0, 90.9090909, 83.3333333])
    c = bench_zoo.compare(vaeflow, pythae)
    assert c["img_per_s_ratio"] == pytest.approx(3300 / 2200)  # 1.5: the target is met at equality
    assert c["nll_difference"] == pytest.approx(-2.0)
    assert c["nll_difference_in_pythae_std"] == pytest.approx(-2.0 / 3.0)
    assert c["nll_pooled_std"] == pytest.approx(math.sqrt((2.0**2 + 3.0**2) / 2))
    assert c["targets"] == {"nll_at_most_pythae_plus_one_std": True, "nll_at_most_pythae_plus_one_pooled_std": True,
                            "img_per_s_ratio_at_least_1.5": True}


def test_targets_fail_past_one_std_and_below_the_speed_ratio():
    vaeflow = bench_zoo.side_summary(records([105.0, 106.0, 107.0], [2900.0, 3000.0, 3100.0]))
    pythae = bench_zoo.side_summary(records([101.0, 102.0, 103.0], [2000.0, 2100.0, 2200.0]))
    c = bench_zoo.compare(vaeflow, pythae)
    assert c["nll_difference"] == pytest.approx(4.0) and c["nll_difference_in_pythae_std"] == pytest.approx(4.0)
    assert c["img_per_s_ratio"] == pytest.approx(3000 / 2100)
    assert c["targets"] == {"nll_at_most_pythae_plus_one_std": False, "nll_at_most_pythae_plus_one_pooled_std": False,
                            "img_per_s_ratio_at_least_1.5": False}


def test_the_two_readings_of_the_nll_target_differ_when_pythaes_seeds_agree_closely():
    """pythae's seeds within 0.02 nats, vaeflow's spread 0.3: 0.05 worse is past pythae's std, within the pooled."""
    vaeflow = bench_zoo.side_summary(records([100.75, 101.05, 100.45], [3000.0] * 3))
    pythae = bench_zoo.side_summary(records([100.72, 100.70, 100.68], [2000.0] * 3))
    c = bench_zoo.compare(vaeflow, pythae)
    assert c["nll_difference"] == pytest.approx(0.05)
    assert c["nll_pooled_std"] == pytest.approx(math.sqrt((0.3**2 + 0.02**2) / 2))
    assert not c["targets"]["nll_at_most_pythae_plus_one_std"]
    assert c["targets"]["nll_at_most_pythae_plus_one_pooled_std"]


def test_one_seed_has_zero_std():
    one = bench_zoo.side_summary(records([100.0], [3000.0]))
    c = bench_zoo.compare(one, bench_zoo.side_summary(records([100.5], [1000.0])))
    assert one["nll"]["std"] == 0.0 and c["nll_difference_in_pythae_std"] is None
    assert c["targets"]["nll_at_most_pythae_plus_one_std"]  # -0.5 <= 0


@pytest.mark.parametrize(("k", "batch"), [(1000, 100), (50, 50), (250, 50), (7, 7), (101, 1)])
def test_pythae_get_nll_batch_draws_exactly_k(k, batch):
    assert nll_batch_size(k) == batch and k % batch == 0


def test_a_broken_pythae_venv_is_reported_not_raised(tmp_path):
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\necho 'no interpreter here' >&2\nexit 3\n")
    python.chmod(0o755)
    found, why = bench_zoo.ensure_pythae_venv(tmp_path / "venv")
    assert found is None and "failed (3)" in why and "no interpreter here" in why


def test_report_without_pythae_keeps_vaeflows_side(capsys):
    vaeflow = [{**r, "params": MLP_PARAMS} for r in records([100.0, 104.0], [3000.0, 3200.0])]
    report = bench_zoo._model_report(ZOO["vae"], {"vaeflow": vaeflow, "pythae": []},
                                     {"pythae": "pythae is not available (see pythae.error)"}, 60_000)
    assert report["vaeflow"]["nll"]["mean"] == 102.0 and report["vaeflow"]["params"] == MLP_PARAMS
    assert report["pythae"] == {"error": "pythae is not available (see pythae.error)", "class": "VAE"}
    assert "comparison" not in report
    result = {"setup": {"epochs": 5, "seeds": 2, "nll_k": 1000, "nll_test_images": 10_000, "threads": 2,
                        "torch": torch.__version__},
              "pythae": {"version": None, "error": "pip install pythae failed"}, "models": {"vae": report},
              "cross_check": None}
    bench_zoo.print_summary(result)
    err = capsys.readouterr().err
    assert "pythae not run: pip install pythae failed" in err and "102.00+-2.83" in err  # stdev of 100, 104


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(VaeflowError, match="unknown"):
        bench_zoo.bench_zoo(tmp_path / "z.json", models=["vae", "nvae"])
    with pytest.raises(VaeflowError, match="get-nll-examples"):
        bench_zoo.bench_zoo(tmp_path / "z.json", models=["vamp"], get_nll_examples=-1)
    assert not (tmp_path / "z.json").exists()


# --- optional: the worker in an existing pythae virtualenv ---------------------------------------------------------
def pythae_python():
    """The bench's pythae interpreter when its virtualenv already exists and imports pythae; never built here."""
    python = bench_zoo.venv_python(bench_zoo.venv_path())
    if not python.exists() or bench_zoo._check_import(python) is not None:
        pytest.skip(f"no pythae virtualenv at {bench_zoo.venv_path()} (`vaeflow bench zoo` builds it)")
    return python


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A .pt file of 256 train and 100 test images (float in [0, 1]) as the bench writes it."""
    gen = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("zoo") / "data.pt"
    torch.save({"train": torch.rand(256, 1, 28, 28, generator=gen), "test": torch.rand(100, 1, 28, 28, generator=gen)},
               path)
    return path


def job(data, name: str, **extra) -> dict:
    """A one-epoch worker job on the tiny data."""
    return {"data": str(data), "model": name, "hyper": ZOO[name].hyperparameters, "seed": 0, "epochs": 1,
            "batch_size": 128, "lr": 1e-3, "latent_dim": 20, "hidden": 400, "threads": 1, "nll_k": 10,
            "nll_examples": 20, "nll_batch": nll_batch_size(10), **extra}


@pytest.mark.parametrize("name", list(ZOO))
def test_worker_trains_each_pythae_model_with_the_shared_hyperparameters(name, tiny_data, tmp_path):
    record = bench_zoo.run_pythae(pythae_python(), job(tiny_data, name, weights_out=str(tmp_path / "w.pt")))
    assert "error" not in record, record.get("error")
    assert record["params"] == MLP_PARAMS + {"vamp": 50 * 784 + 784}.get(name, 0)
    assert (record["train_images"], record["get_nll_examples"], record["threads"]) == (256, 20, 1)
    assert record["img_per_s"] == pytest.approx(256 / record["wall_s"])
    assert math.isfinite(record["get_nll"]) and record["get_nll"] > 0
    saved = torch.load(record["weights"])
    assert ("idle_weight" in saved) == (name == "vamp")
    c, h = record["pythae_config"], ZOO[name].hyperparameters
    assert (c["latent_dim"], c["reconstruction_loss"]) == (20, "bce")
    expected = {"iwae": {"number_samples": h.get("samples")},
                "beta-tcvae": {"alpha": h.get("alpha"), "beta": h.get("beta"), "gamma": h.get("gamma"),
                               "use_mss": h.get("estimator") == "mss"},
                "vamp": {"number_components": h.get("components"), "linear_scheduling_steps": 0},
                "info-vae": {"alpha": h.get("alpha"), "lbd": h.get("lambda"), "kernel_choice": h.get("kernel"),
                             "kernel_bandwidth": math.sqrt(h.get("kernel_scale", 1.0)), "scales": None}}.get(name, {})
    assert {key: c[key] for key in expected} == expected


@pytest.mark.parametrize("name", ["vae", "vamp"])
def test_vaeflows_estimator_on_pythaes_networks_agrees_with_get_nll(name, tiny_data, tmp_path):
    """The bench's pythae score: vaeflow's estimator on every test image of the networks (and VAMP's pseudo-inputs)
    pythae trained, checked against pythae's own get_nll on the first 60 within 4 Monte Carlo standard errors."""
    weights = tmp_path / "w.pt"
    record = bench_zoo.run_pythae(pythae_python(), job(tiny_data, name, nll_k=100, nll_examples=60, nll_batch=100,
                                                       weights_out=str(weights)))
    assert "error" not in record, record.get("error")
    test = torch.load(tiny_data)["test"]
    bench_zoo.score_pythae_run(record, test, 100, 1, 256)
    check = record["get_nll_check"]
    assert record["nll_examples"] == 100 and check["examples"] == 60 and check["mc_standard_error"] > 0
    assert check["agree"], json.dumps(check)
    assert not weights.exists()  # scored, then removed
    summary = bench_zoo.cross_check_summary([{"model": name, **check}])
    assert summary["all_agree"] and summary["max_abs_difference_in_standard_errors"] == pytest.approx(
        abs(check["difference_in_standard_errors"]))
