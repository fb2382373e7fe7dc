"""`vaeflow bench zoo`: vaeflow's model zoo against pythae, same networks, data, budget and estimator (issue #12).

pythae: Chadebec, Vincent & Allassonnière 2022, "Pythae: Unifying Generative Autoencoders in Python - A Benchmarking
Use Case" (arXiv:2206.08309). The models, each with the same hyperparameters on both sides:

- vae: Kingma & Welling 2014, "Auto-Encoding Variational Bayes" (arXiv:1312.6114);
- iwae: Burda, Grosse & Salakhutdinov 2016, "Importance Weighted Autoencoders" (arXiv:1509.00519), k samples;
- beta-tcvae: Chen, Li, Grosse & Duvenaud 2018, "Isolating Sources of Disentanglement in Variational Autoencoders"
  (arXiv:1802.04942), eq. 4 with weights alpha, beta (on the total correlation), gamma;
- vamp: Tomczak & Welling 2018, "VAE with a VampPrior" (arXiv:1705.07120), eq. 9, 50 pseudo-inputs;
- info-vae: Zhao, Song & Ermon 2019, "InfoVAE" (arXiv:1706.02262), eq. 8 with the MMD.

Setup: Fashion-MNIST through vaeflow's `fashion-mnist` dataset plugin, float pixels in [0, 1] (not binarized), the same
tensors handed to both sides; the MLP of `vaeflow bench train` (encoder 784-400-(20, 20), decoder 20-400-784, ReLU)
with a Bernoulli likelihood; batch 128, Adam(lr 1e-3) (vaeflow's AdamW with weight_decay 0 is Adam), E epochs.

Scored quantity, both sides: the test NLL as minus the IWAE bound (Burda et al. 2016, eq. 8) with k samples,
log p(x) >= E[log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x)] (eq. 9), z_i ~ q(z|x), one draw of the k samples
per test image, averaged over the test images. Both score the
non-binarized x with the Bernoulli log-probability sum_d x_d log p_d + (1 - x_d) log(1 - p_d): vaeflow from the
logits l (x l - softplus(l)), pythae as -BCE(sigmoid(l), x). These agree wherever float32 sigmoid(l) is not rounded to
0 or 1 (|l| < ~16), where BCE clamps its log at -100. One estimator scores both sides on the whole test set:
vaeflow.core.metrics.iwae_log_likelihood (the model's log_joint_terms), batched, on vaeflow's model and on the networks pythae
trained (their weights, and VAMP's pseudo-inputs, loaded into the vaeflow model of the same prior). pythae's own
get_nll(data, n_samples, batch_size) scores one image at a time (about 37 ms an image at k = 1000 here, 6 min per
run on 10,000 images), so it runs on the first --get-nll-examples test images of every pythae run and checks that
estimator: the two must agree within CROSS_CHECK_Z Monte Carlo standard errors.

Speed: img/s = training images x epochs / wall seconds of the whole training call, same definition both sides:
vaeflow's Trainer(cfg, run_dir, train_images).fit() (model build, epochs, a checkpoint per epoch, the weights),
pythae's TrainingPipeline(...)(train_data) (trainer build, sanity check, epochs, a best-model copy per epoch, the
final model). vaeflow's TrainResult.img_per_s (its last epoch's step loop only) is recorded beside it. Both sides
get the bench process's torch thread count; they run interleaved (seed 0 vaeflow, seed 0 pythae, ...) so that
machine noise hits both alike. pythae runs in a virtualenv of its own that the bench builds (pythae is no dependency
of vaeflow); where it cannot be built, the report says why and holds vaeflow's side only.

Disentanglement: beta-TCVAE against the beta-VAE at the same beta on `shapes`, MIG (Chen et al. 2018), SAP (Kumar et
al. 2018, arXiv:1711.00848) and DCI (Eastwood & Williams 2018), by vaeflow's `disentanglement` metric plugin.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vaeflow.core.checkpoint import write_text
from vaeflow.core.config import Config, config_path, read_yaml, validate
from vaeflow.core.data import known_factors, load_split
from vaeflow.core.engine import Trainer
from vaeflow.core.errors import VaeflowError
from vaeflow.core.interfaces import MetricContext
from vaeflow.core.metrics import iwae_log_likelihood
from vaeflow.core.registry import get_registry
from vaeflow.pipelines.bench import BATCH_SIZE, HIDDEN, LATENT_DIM, LR, PIXELS, fashion_mnist_available
from vaeflow.pipelines.bench_quantizer import cpu_name
from vaeflow.pipelines.pythae_worker import MLPDecoderNet, MLPEncoderNet, nll_batch_size

WORKER = Path(__file__).resolve().with_name("pythae_worker.py")
VENV_ENV = "VAEFLOW_BENCH_PYTHAE_VENV"  # overrides the pythae virtualenv's folder
DEFAULT_VENV = Path("~/.cache/vaeflow/bench-pythae-venv")
PYTHAE_REQUIREMENT = "pythae==0.1.2"
TORCH_PTH = "zz_vaeflow_torch.pth"  # sorts after the venv's own .pth files: its own packages come first
PIP_TIMEOUT_S = 1800
NLL_BATCH = 100  # test images per iwae_log_likelihood call on the vaeflow side
CROSS_CHECK_Z = 4.0  # get_nll and vaeflow's estimator agree within this many Monte Carlo standard errors
GET_NLL_EXAMPLES = 500  # test images pythae's own get_nll scores per run, the estimator check
WARMUP_STEPS = 20  # one unrecorded vaeflow run before the measured ones: first-touch allocations, lazy inits
TARGET_SPEEDUP = 1.5  # vaeflow img/s over pythae's, at least
DIS_CONFIG = "vae-shapes-tiny"  # a shipped template (configs/vae-shapes-tiny.yaml in a clone)
DIS_METRICS = ("mig", "sap", "dci_disentanglement")

MLP = {"name": "mlp", "hidden": [HIDDEN], "activation": "relu"}
BASE_MODEL = {"kind": "vae", "latent_dim": LATENT_DIM, "encoder": MLP, "decoder": MLP,
              "likelihood": {"name": "bernoulli"}}


# --- the zoo ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo: its shared hyperparameters, and how vaeflow's config spells them."""

    name: str
    pythae_class: str
    hyperparameters: dict = field(default_factory=dict)
    model: Callable[[dict, int], dict] = lambda h, n: {}  # hyperparameters, train-set size -> model section fields
    beta: Callable[[dict], float] = lambda h: 1.0  # train.beta's constant value

    def vaeflow_model(self, n_train: int) -> dict:
        """The config's model section: the bench MLP with this model's kind and options."""
        return {**BASE_MODEL, **self.model(self.hyperparameters, n_train)}

    def needs(self) -> tuple[str, str]:
        """(family, name) of the plugin vaeflow needs for this model."""
        section = self.vaeflow_model(1)
        if "prior" in section:
            return "latent_prior", section["prior"]["name"]
        return "model", section["kind"]


ZOO = {z.name: z for z in (
    ZooModel("vae", "VAE"),
    ZooModel("iwae", "IWAE", {"samples": 5},  # k = 5: Burda et al.'s smaller training setting
             lambda h, n: {"kind": "iwae", "samples": h["samples"]}),
    # mws: the same estimator on both sides (pythae's mss keeps the authors' code's row slip, vaeflow's follows
    # the appendix)
    ZooModel("beta-tcvae", "BetaTCVAE", {"alpha": 1.0, "beta": 6.0, "gamma": 1.0, "estimator": "mws"},
             lambda h, n: {"kind": "beta-tcvae", "alpha": h["alpha"], "gamma": h["gamma"],
                           "estimator": h["estimator"], "dataset_size": n},
             lambda h: h["beta"]),
    ZooModel("vamp", "VAMP", {"components": 50},
             lambda h, n: {"prior": {"name": "vamp", "components": h["components"]}}),
    ZooModel("info-vae", "INFOVAE_MMD", {"alpha": 0.0, "lambda": 1000.0, "kernel": "imq", "kernel_scale": 1.0},
             lambda h, n: {"kind": "info-vae", "alpha": h["alpha"], "lambda_": h["lambda"], "kernel": h["kernel"],
                           "kernel_scale": h["kernel_scale"]}),
)}


def zoo_config(zoo: ZooModel, seed: int, epochs: int, threads: int, n_train: int,
               max_steps: int | None = None) -> Config:
    """The validated vaeflow config of one zoo model on Fashion-MNIST: bench MLP, Bernoulli, batch 128, Adam 1e-3."""
    raw = {
        "data": {"dataset": {"name": "fashion-mnist"}, "loader": "memory"},
        "model": zoo.vaeflow_model(n_train),
        "train": {"epochs": epochs, "max_steps": max_steps, "batch_size": BATCH_SIZE, "lr": LR, "weight_decay": 0.0,
                  "seed": seed, "device": "cpu", "num_threads": threads, "log_every": 50, "checkpoint_every": None,
                  "progress": False, "beta": {"value": zoo.beta(zoo.hyperparameters)}},
    }
    return validate(raw, source=f"vaeflow bench zoo ({zoo.name})")


def missing_plugin(zoo: ZooModel) -> str | None:
    """Why vaeflow cannot build this model (its kind or prior is not registered), or None."""
    family, name = zoo.needs()
    names = get_registry().names(family)
    if name in names:
        return None
    return f"no {family} plugin {name!r} is registered (registered: {', '.join(names)}); see `vaeflow plugins`"


# --- the estimator and the statistics ---------------------------------------------------------------------------
@torch.no_grad()
def iwae_per_image(model, images: torch.Tensor, k: int, batch_size: int = NLL_BATCH) -> torch.Tensor:
    """The IWAE bound with k samples of each image (N, C, H, W), by vaeflow.core.metrics.iwae_log_likelihood: (N,)."""
    return torch.cat([iwae_log_likelihood(model, batch.to(model.device), k).cpu()
                      for batch in images.split(batch_size)])  # (N,)


def iwae_nll(model, images: torch.Tensor, k: int, batch_size: int = NLL_BATCH) -> float:
    """Mean over images (N, C, H, W) of minus the IWAE bound with k samples, in nats."""
    return -iwae_per_image(model, images, k, batch_size).double().mean().item()


def spread(values: list[float]) -> dict:
    """{"mean", "std" (sample, 0 for one value), "per_seed"} of a list of per-seed values."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": list(values)}


def side_summary(records: list[dict]) -> dict:
    """Per-seed records of one side ({"nll", "wall_s", "img_per_s", ...}) -> mean/std/per-seed of each."""
    keys = [k for k in ("nll", "wall_s", "img_per_s", "engine_img_per_s", "nll_seconds", "get_nll", "get_nll_seconds")
            if records[0].get(k) is not None]
    return {k: spread([r[k] for r in records]) for k in keys}


def compare(vaeflow: dict, pythae: dict) -> dict:
    """The ratios and targets of one model from its two side summaries (see side_summary).

    NLL target ("within one standard deviation"), in two readings, both reported: vaeflow's mean NLL <= pythae's
    mean + pythae's standard deviation over seeds (the strict one), or + the pooled standard deviation of the two
    sides, sqrt((s_v^2 + s_p^2) / 2), the seed-to-seed spread of a model trained either way.
    Speed target: vaeflow's mean img/s >= 1.5 x pythae's."""
    diff = vaeflow["nll"]["mean"] - pythae["nll"]["mean"]
    std, pooled = pythae["nll"]["std"], math.sqrt((vaeflow["nll"]["std"] ** 2 + pythae["nll"]["std"] ** 2) / 2)
    speedup = vaeflow["img_per_s"]["mean"] / pythae["img_per_s"]["mean"]
    return {
        "img_per_s_ratio": speedup,
        "nll_difference": diff,
        "nll_difference_in_pythae_std": diff / std if std > 0 else None,
        "nll_pooled_std": pooled,
        "targets": {"nll_at_most_pythae_plus_one_std": diff <= std,
                    "nll_at_most_pythae_plus_one_pooled_std": diff <= pooled,
                    f"img_per_s_ratio_at_least_{TARGET_SPEEDUP:g}": speedup >= TARGET_SPEEDUP},
    }


# --- the vaeflow side ---------------------------------------------------------------------------------------------
def run_vaeflow(cfg: Config, train: torch.Tensor, test: torch.Tensor, k: int) -> dict:
    """Train one config on the given images (N, 1, 28, 28) in a throw-away run dir, score test NLL: the record."""
    with tempfile.TemporaryDirectory(prefix="vaeflow-bench-zoo-") as tmp:
        start = time.perf_counter()
        trainer = Trainer(cfg, Path(tmp) / "run", train_images=train)
        result = trainer.fit()
        seconds = time.perf_counter() - start
    model = trainer.model.eval()
    n_images = len(train) * result.epochs
    torch.manual_seed(cfg.train.seed)
    start = time.perf_counter()
    nll = iwae_nll(model, test, k)
    return {"seed": cfg.train.seed, "nll": nll, "wall_s": seconds, "img_per_s": n_images / seconds,
            "engine_img_per_s": result.img_per_s, "train_images": n_images, "nll_seconds": time.perf_counter() - start,
            "params": sum(p.numel() for p in model.parameters())}


def pythae_networks_in_vaeflow(weights: dict, seed: int, threads: int, n_train: int):
    """The vaeflow model (eval mode) that holds the networks a pythae run trained (pythae_worker.trained_weights):
    the MLP VAE with the standard-normal prior, or with the VampPrior and pythae's pseudo-inputs when they came
    along. pythae's u_k = hardtanh(W e_k + b) is vaeflow's hardtanh(W'[k]) with W'[k] = W e_k + b."""
    from vaeflow.core.model import build_model

    vamp = "idle_weight" in weights
    model = build_model(zoo_config(ZOO["vamp" if vamp else "vae"], seed, 1, threads, n_train))
    load_pythae_networks(model, weights["encoder"], weights["decoder"])
    if vamp:
        with torch.no_grad():
            model.prior.idle_weight.copy_(weights["idle_weight"].view_as(model.prior.idle_weight))  # (K, C, H, W)
    return model.eval()


def load_pythae_networks(model, encoder: dict, decoder: dict) -> None:
    """Load pythae_worker's MLPEncoderNet / MLPDecoderNet state dicts into a vaeflow MLP VAE of the same shape:
    the mean and log-variance heads stack into the encoder's last layer, rows [mean | logvar] as DiagonalGaussian
    splits them; the decoder's logits are the Bernoulli parameters on both sides."""
    model.encoder.net.load_state_dict({
        "0.weight": encoder["fc1.weight"], "0.bias": encoder["fc1.bias"],
        "2.weight": torch.cat([encoder["fc_mean.weight"], encoder["fc_logvar.weight"]]),  # (2J, 400)
        "2.bias": torch.cat([encoder["fc_mean.bias"], encoder["fc_logvar.bias"]]),  # (2J,)
    })
    model.decoder.net.load_state_dict({"0.weight": decoder["fc3.weight"], "0.bias": decoder["fc3.bias"],
                                       "2.weight": decoder["fc4.weight"], "2.bias": decoder["fc4.bias"]})


def network_params() -> int:
    """Parameters of the pythae side's networks (encoder + decoder, without a model's own extras)."""
    nets = MLPEncoderNet(PIXELS, HIDDEN, LATENT_DIM), MLPDecoderNet(PIXELS, HIDDEN, LATENT_DIM)
    return sum(p.numel() for net in nets for p in net.parameters())


# --- the pythae side ----------------------------------------------------------------------------------------------
def venv_path(path: str | Path | None = None) -> Path:
    """The pythae virtualenv's folder: `path`, else $VAEFLOW_BENCH_PYTHAE_VENV, else
    ~/.cache/vaeflow/bench-pythae-venv."""
    return Path(path or os.environ.get(VENV_ENV) or DEFAULT_VENV).expanduser()


def venv_python(venv: Path) -> Path:
    """The virtualenv's interpreter."""
    return venv / "bin" / "python"


def _check_import(python: Path) -> str | None:
    """None when `import pythae, torch` works in that interpreter, else why not."""
    proc = subprocess.run([str(python), "-c", "import pythae, torch"], capture_output=True, text=True, timeout=300)
    return None if proc.returncode == 0 else f"`import pythae, torch` failed: {proc.stderr.strip()[-1500:]}"


def ensure_pythae_venv(venv: Path) -> tuple[Path | None, str | None]:
    """(python of a virtualenv where `import pythae, torch` works, None), building it when missing, or (None, why).

    The venv gets this interpreter's base Python and a .pth file putting this environment's site-packages after its
    own (torch is seen, not re-installed, and pythae's own requirements win); the .pth is rewritten when it points
    elsewhere (a moved checkout), so both sides run this torch. pip installs pythae when it is not importable."""
    python = venv_python(venv)
    try:
        if not python.exists():
            print(f"building the pythae virtualenv in {venv} ...", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, text=True,
                           timeout=600)
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True, timeout=120).stdout.strip()
        pth, ours = Path(purelib, TORCH_PTH), sysconfig.get_paths()["purelib"] + "\n"
        if not pth.exists() or pth.read_text() != ours:
            pth.write_text(ours)
        if _check_import(python) is None:
            return python, None
        subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", PYTHAE_REQUIREMENT],
                       check=True, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        return None, f"{' '.join(map(str, exc.cmd[:4]))} ... failed ({exc.returncode}): {(exc.stderr or '')[-1500:]}"
    except (subprocess.TimeoutExpired, OSError) as exc:
        return None, f"building the pythae virtualenv in {venv} failed: {exc}"
    why = _check_import(python)
    return (None, why) if why else (python, None)


def run_pythae(python: Path, job: dict) -> dict:
    """One worker run (pythae_worker.py in the pythae venv); its JSON record, or {"error": why}."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of vaeflow on its path
    proc = subprocess.run([str(python), str(WORKER), json.dumps(job)], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"pythae_worker exited {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
    record = json.loads(lines[-1])
    record["wall_s"] = record.pop("train_seconds")
    return record


# --- the disentanglement table ------------------------------------------------------------------------------------
def disentanglement_config(kind: str, seed: int, beta: float, epochs: int, n_train: int, n_test: int,
                           threads: int, config: str | Path = DIS_CONFIG) -> Config:
    """`config` (the tiny shapes VAE) as a beta-VAE or a beta-TCVAE (TC weight beta, alpha = gamma = 1, MWS)."""
    raw = read_yaml(config_path(config))
    raw["data"]["dataset"].update({"n_train": n_train, "n_test": n_test})
    if kind == "beta-tcvae":
        raw["model"].update({"kind": "beta-tcvae", "alpha": 1.0, "gamma": 1.0, "estimator": "mws",
                             "dataset_size": n_train})
    raw["train"].update({"epochs": epochs, "seed": seed, "beta": {"value": beta}, "progress": False,
                         "checkpoint_every": None, "device": "cpu", "num_threads": threads})
    raw["eval"] = {**raw.get("eval", {}), "max_examples": None}
    return validate(raw, source=f"vaeflow bench zoo disentanglement ({kind})")


def disentanglement_scores(cfg: Config) -> dict:
    """Train, then vaeflow's `disentanglement` metric on the whole test split: {"mig", "sap", "dci_disentanglement"}."""
    with tempfile.TemporaryDirectory(prefix="vaeflow-bench-zoo-") as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run")
        trainer.fit()
    model = trainer.model.eval()
    factors = known_factors(cfg, "test")
    metric = get_registry().get("metric", "disentanglement").cls()
    ctx = MetricContext(model, load_split(cfg, "test"), cfg.eval, factors["factors"],
                        tuple(factors["factor_names"]), tuple(factors["factor_discrete"]))
    scores = metric.compute(ctx)
    if "disentanglement_error" in scores:
        raise VaeflowError(f"disentanglement scores: {scores['disentanglement_error']}")
    return {m: scores[f"disentanglement/{m}"] for m in DIS_METRICS}


def bench_disentanglement(seeds: int, beta: float, epochs: int, n_train: int, n_test: int, threads: int) -> dict:
    """beta-VAE vs beta-TCVAE at the same beta on shapes, `seeds` seeds interleaved: mean/std/per-seed per metric."""
    kinds = ("vae", "beta-tcvae")
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for seed in range(seeds):
        for kind in kinds:
            runs[kind].append(disentanglement_scores(
                disentanglement_config(kind, seed, beta, epochs, n_train, n_test, threads)))
            scores = ", ".join(f"{m} {runs[kind][-1][m]:.3f}" for m in DIS_METRICS)
            print(f"disentanglement seed {seed} {kind}: {scores}", file=sys.stderr)
    rows = {kind: {m: spread([r[m] for r in runs[kind]]) for m in DIS_METRICS} for kind in kinds}
    return {
        "dataset": {"name": "shapes", "n_train": n_train, "n_test": n_test}, "config": f"configs/{DIS_CONFIG}.yaml",
        "beta": beta, "epochs": epochs, "seeds": seeds,
        "beta_tcvae": {"alpha": 1.0, "gamma": 1.0, "estimator": "mws", "dataset_size": n_train},
        "rows": rows,
        "target_mig_beta_tcvae_above_beta_vae": rows["beta-tcvae"]["mig"]["mean"] > rows["vae"]["mig"]["mean"],
    }


# --- the benchmark ------------------------------------------------------------------------------------------------
def bench_zoo(out: str | Path, seeds: int = 3, epochs: int = 5, nll_k: int = 1000, nll_examples: int | None = None,
              models: list[str] | None = None, venv: str | Path | None = None, pythae: bool = True,
              get_nll_examples: int = GET_NLL_EXAMPLES, dis_seeds: int = 3, dis_beta: float = 6.0,
              dis_epochs: int = 10, dis_n_train: int = 10_000, dis_n_test: int = 2_000) -> dict:
    """Measure every zoo model on both sides (interleaved per seed), the estimator check and the disentanglement
    table; write the JSON to `out` and return it. get_nll_examples = 0 skips pythae's get_nll, dis_seeds = 0 the
    disentanglement table."""
    models = list(models or ZOO)
    unknown = [m for m in models if m not in ZOO]
    if unknown:
        raise VaeflowError(f"--models: unknown {unknown}; the zoo has {', '.join(ZOO)}")
    if seeds < 1 or epochs < 1 or nll_k < 1 or (nll_examples is not None and nll_examples < 1):
        raise VaeflowError(f"seeds, epochs, nll-k and nll-examples must be >= 1, got {seeds}, {epochs}, {nll_k}, "
                           f"{nll_examples}")
    if get_nll_examples < 0:
        raise VaeflowError(f"get-nll-examples must be >= 0 (0 skips pythae's get_nll), got {get_nll_examples}")
    if not fashion_mnist_available():
        raise VaeflowError("the zoo bench runs on Fashion-MNIST, which was not found where the `fashion-mnist` dataset "
                           "plugin looks (see `vaeflow plugins`; set its root option or VAEFLOW_DATA_DIR)")
    threads = torch.get_num_threads()
    python, pythae_error = (None, "skipped (--no-pythae)")
    if pythae:
        python, pythae_error = ensure_pythae_venv(venv_path(venv))
    if pythae_error:
        print(f"pythae side not run: {pythae_error}", file=sys.stderr)

    probe = validate({"data": {"dataset": {"name": "fashion-mnist"}}, "model": BASE_MODEL}, source="vaeflow bench zoo")
    train, test = load_split(probe, "train"), load_split(probe, "test")[:nll_examples]  # (N, 1, 28, 28) in [0, 1]
    with tempfile.TemporaryDirectory(prefix="vaeflow-bench-zoo-") as tmp:
        data_file = Path(tmp) / "fashion-mnist.pt"
        torch.save({"train": train, "test": test}, data_file)
        results = _measure(models, seeds, epochs, nll_k, threads, train, test, python, data_file, get_nll_examples,
                           Path(tmp))
    result = {
        "benchmark": "vaeflow bench zoo",
        "setup": _setup(epochs, seeds, nll_k, len(train), len(test), min(get_nll_examples, len(test)), threads),
        "pythae": {"available": python is not None, "venv": str(venv_path(venv)) if pythae else None,
                   "requirement": PYTHAE_REQUIREMENT, "version": results.pop("pythae_version"),
                   "torch": results.pop("pythae_torch"), "error": pythae_error},
        **results,
    }
    if dis_seeds > 0:
        why = missing_plugin(ZOO["beta-tcvae"])
        result["disentanglement"] = {"error": why} if why else bench_disentanglement(
            dis_seeds, dis_beta, dis_epochs, dis_n_train, dis_n_test, threads)
    write_text(out, json.dumps(result, indent=2) + "\n")
    print_summary(result)
    return result


def _measure(models: list[str], seeds: int, epochs: int, k: int, threads: int, train: torch.Tensor,
             test: torch.Tensor, python: Path | None, data_file: Path, get_nll_examples: int, tmp: Path) -> dict:
    """Both sides of every model, seed by seed; every pythae run scored by vaeflow's estimator and checked."""
    records: dict[str, dict[str, list[dict]]] = {m: {"vaeflow": [], "pythae": []} for m in models}
    errors: dict[str, dict[str, str]] = {m: {} for m in models}
    for m in models:
        why = missing_plugin(ZOO[m])
        if why:
            errors[m]["vaeflow"] = why
        if python is None:
            errors[m]["pythae"] = "pythae is not available (see pythae.error)"
        elif missing_plugin(scorer := ZOO["vamp" if m == "vamp" else "vae"]):  # what scores pythae's networks
            errors[m]["pythae"] = f"pythae's networks are scored in vaeflow: {missing_plugin(scorer)}"
    runnable = [m for m in models if "vaeflow" not in errors[m]]
    if runnable:
        run_vaeflow(zoo_config(ZOO[runnable[0]], 0, 1, threads, len(train), max_steps=WARMUP_STEPS), train, test[:2], 1)
    checks, pythae_version, pythae_torch = [], None, None
    for seed in range(seeds):
        for m in models:
            zoo = ZOO[m]
            if "vaeflow" not in errors[m]:
                record = run_vaeflow(zoo_config(zoo, seed, epochs, threads, len(train)), train, test, k)
                records[m]["vaeflow"].append(record)
                print(f"seed {seed} {m} vaeflow: NLL {record['nll']:.2f}, {record['img_per_s']:.0f} img/s",
                      file=sys.stderr)
            if "pythae" not in errors[m]:
                job = {"data": str(data_file), "model": m, "hyper": zoo.hyperparameters, "seed": seed, "epochs": epochs,
                       "batch_size": BATCH_SIZE, "lr": LR, "latent_dim": LATENT_DIM, "hidden": HIDDEN,
                       "threads": threads, "nll_k": k, "nll_examples": min(get_nll_examples, len(test)),
                       "nll_batch": nll_batch_size(k), "weights_out": str(tmp / f"pythae-{m}-{seed}.pt")}
                record = run_pythae(python, job)
                if "error" in record:  # later seeds of this model are not tried; earlier ones are kept
                    errors[m]["pythae"] = f"seed {seed}: {record['error']}"
                    print(f"seed {seed} {m} pythae failed: {record['error']}", file=sys.stderr)
                    continue
                pythae_version, pythae_torch = record["pythae"], record["torch"]
                score_pythae_run(record, test, k, threads, len(train))
                records[m]["pythae"].append(record)
                check = record.get("get_nll_check")
                if check:
                    checks.append({"model": m, **check})
                z = check["difference_in_standard_errors"] if check else None  # None too when the draws agree exactly
                print(f"seed {seed} {m} pythae: NLL {record['nll']:.2f}, {record['img_per_s']:.0f} img/s"
                      + (f"; get_nll check {z:+.1f} SE" if z is not None else ""), file=sys.stderr)
    return {"models": {m: _model_report(ZOO[m], records[m], errors[m], len(train)) for m in models},
            "cross_check": cross_check_summary(checks), "pythae_version": pythae_version, "pythae_torch": pythae_torch}


def score_pythae_run(record: dict, test: torch.Tensor, k: int, threads: int, n_train: int) -> None:
    """Score a pythae run's networks with vaeflow's estimator on every test image (record["nll"]), and check that
    estimator against pythae's get_nll on the images get_nll scored (record["get_nll_check"]).

    On those images vaeflow's estimate is drawn a second time with independent samples: the per-image differences
    of the two draws hold no image-to-image spread, so their standard deviation / sqrt(M) is the Monte Carlo
    standard error of the difference of two independent estimates of the mean, the yardstick for vaeflow's
    estimate minus get_nll's."""
    model = pythae_networks_in_vaeflow(torch.load(record["weights"]), record["seed"], threads, n_train)
    Path(record.pop("weights")).unlink()
    torch.manual_seed(record["seed"])
    start = time.perf_counter()
    first = iwae_per_image(model, test, k).double()  # (N,)
    record.update(nll=-first.mean().item(), nll_seconds=time.perf_counter() - start, nll_examples=len(test))
    m = record["get_nll_examples"]
    if record.get("get_nll") is None or m < 2:
        return
    torch.manual_seed(record["seed"] + 1)
    second = iwae_per_image(model, test[:m], k).double()  # (M,)
    ours = -first[:m].mean().item()
    diff, se = ours - record["get_nll"], (first[:m] - second).std().item() / math.sqrt(m)
    z = diff / se if se > 0 else None
    record["get_nll_check"] = {
        "seed": record["seed"], "examples": m, "pythae_get_nll": record["get_nll"],
        "vaeflow_estimator": ours, "vaeflow_second_draw": -second.mean().item(), "difference": diff,
        "mc_standard_error": se, "difference_in_standard_errors": z,
        "agree": z is not None and abs(z) <= CROSS_CHECK_Z,
    }


def cross_check_summary(checks: list[dict]) -> dict | None:
    """Every run's get_nll check, the largest |difference| in standard errors, and whether all agree."""
    if not checks:
        return None
    zs = [abs(c["difference_in_standard_errors"]) for c in checks if c["difference_in_standard_errors"] is not None]
    return {
        "runs": checks, "max_abs_difference_in_standard_errors": max(zs) if zs else None,
        "all_agree": all(c["agree"] for c in checks), "agree_within_standard_errors": CROSS_CHECK_Z,
        "how": "pythae's trained networks (and VAMP's pseudo-inputs) loaded into the vaeflow model of the same prior; "
               "vaeflow.core.metrics.iwae_log_likelihood on the first images of the test set vs pythae's model.get_nll on "
               "the same images with the same k",
    }


def _model_report(zoo: ZooModel, records: dict[str, list[dict]], errors: dict[str, str], n_train: int) -> dict:
    """One model's entry: hyperparameters, each side's summary (or its error) and, with both, the comparison."""
    report: dict = {"hyperparameters": zoo.hyperparameters}
    sides = {}
    for side in ("vaeflow", "pythae"):
        if records[side]:
            sides[side] = side_summary(records[side])
            report[side] = {**sides[side], "params": records[side][0]["params"]}
            if side == "pythae":
                report[side]["pythae_config"] = records[side][0]["pythae_config"]
            if side in errors:
                report[side]["failed"] = errors[side]  # a later seed failed: the summary is of the seeds that ran
        else:
            report[side] = {"error": errors.get(side, "not run")}
    report["vaeflow"]["model_config"] = zoo.vaeflow_model(n_train)
    report["pythae"]["class"] = zoo.pythae_class
    if len(sides) == 2:
        report["comparison"] = compare(sides["vaeflow"], sides["pythae"])
    return report


def _setup(epochs: int, seeds: int, k: int, n_train: int, n_test: int, n_get_nll: int, threads: int) -> dict:
    """What was run, without timestamps or paths."""
    return {
        "dataset": "fashion-mnist (vaeflow dataset plugin), float pixels in [0, 1], not binarized, the same tensors "
                   "on both sides",
        "train_images": n_train, "nll_test_images": n_test, "get_nll_test_images": n_get_nll, "epochs": epochs,
        "seeds": seeds, "nll_k": k,
        "architecture": f"encoder {PIXELS}-{HIDDEN}-({LATENT_DIM} mean, {LATENT_DIM} log-variance), decoder "
                        f"{LATENT_DIM}-{HIDDEN}-{PIXELS}, ReLU; Bernoulli likelihood (vaeflow: logits; pythae: "
                        f"sigmoid + BCE)",
        "network_params": network_params(),
        "batch_size": BATCH_SIZE, "optimizer": f"vaeflow AdamW(lr={LR}, weight_decay=0) = Adam; pythae Adam(lr={LR})",
        "nll": "minus the IWAE bound with k samples, mean over the test images, by one estimator on both sides: "
               "vaeflow.core.metrics.iwae_log_likelihood on vaeflow's model and on pythae's trained networks loaded into "
               "the vaeflow model of the same prior; pythae's own model.get_nll (batch_size a divisor of k so "
               "exactly k samples are drawn) on the first get_nll_test_images images of each pythae run checks it",
        "likelihood_on_continuous_x": "both score sum_d x_d log p_d + (1 - x_d) log(1 - p_d) on x in [0, 1]; equal "
                                      "while float32 sigmoid(logit) is not rounded to 0 or 1 (|logit| < ~16), where "
                                      "pythae's BCE clamps the log at -100",
        "img_per_s": "train images x epochs / wall seconds of the whole training call (vaeflow Trainer(...).fit(), "
                     "pythae TrainingPipeline(...)(train_data)); vaeflow's TrainResult.img_per_s as engine_img_per_s",
        "order": "interleaved: for each seed, for each model, vaeflow then pythae",
        "threads": threads, "cpu_count": os.cpu_count(), "cpu": cpu_name(), "torch": torch.__version__,
        "python": platform.python_version(),
        "openmp": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                   "note": "both sides: the pythae worker inherits this process's environment"},
        "denormals": "vaeflow's engine flushes denormal floats to zero on CPU (a vaeflow feature since #14); "
                     "pythae's loop does not",
        "targets": {"nll": "vaeflow mean NLL <= pythae mean NLL + one std over seeds (pythae's, and pooled)",
                    "speed": f"vaeflow img/s >= {TARGET_SPEEDUP:g} x pythae's", "mig": "beta-TCVAE MIG > beta-VAE MIG"},
    }


def print_summary(result: dict) -> None:
    """A readable table of the report, on stderr like the progress lines."""
    s = result["setup"]
    lines = [f"vaeflow bench zoo: fashion-mnist, MLP 784-400-20, {s['epochs']} epochs x {s['seeds']} seeds, NLL k="
             f"{s['nll_k']} on {s['nll_test_images']} test images, {s['threads']} threads, torch {s['torch']}, "
             f"pythae {result['pythae']['version'] or 'not run: ' + str(result['pythae']['error'])}",
             f"  {'model':<12}{'NLL vaeflow':>16}{'NLL pythae':>16}{'img/s vaeflow':>15}{'img/s pythae':>14}"
             f"{'ratio':>7}"]

    def cell(side: dict, key: str, fmt: str) -> str:
        if "error" in side:
            return "-"
        v = side[key]
        return f"{v['mean']:{fmt}}+-{v['std']:{fmt}}" if key == "nll" else f"{v['mean']:{fmt}}"

    for name, m in result["models"].items():
        ratio = m.get("comparison", {}).get("img_per_s_ratio")
        lines.append(f"  {name:<12}{cell(m['vaeflow'], 'nll', '.2f'):>16}{cell(m['pythae'], 'nll', '.2f'):>16}"
                     f"{cell(m['vaeflow'], 'img_per_s', '.0f'):>15}{cell(m['pythae'], 'img_per_s', '.0f'):>14}"
                     f"{'-' if ratio is None else f'{ratio:.2f}x':>7}")
        for side in ("vaeflow", "pythae"):
            if "error" in m[side]:
                lines.append(f"    {side}: {m[side]['error'][:160]}")
    c = result.get("cross_check")
    if c:
        worst = c["max_abs_difference_in_standard_errors"]
        lines.append(f"  estimator check: pythae get_nll vs vaeflow's estimator on pythae's networks, "
                     f"{len(c['runs'])} runs, {s['get_nll_test_images']} images each: largest difference "
                     f"{'-' if worst is None else f'{worst:.1f}'} Monte Carlo standard errors "
                     f"({'all agree' if c['all_agree'] else 'DISAGREE'} within {c['agree_within_standard_errors']:g})")
    d = result.get("disentanglement")
    if d and "error" in d:
        lines.append(f"  disentanglement not run: {d['error']}")
    elif d:
        lines.append(f"  disentanglement on shapes, beta {d['beta']:g}, {d['seeds']} seeds: "
                     + "; ".join(f"{kind}: " + ", ".join(f"{m} {row[m]['mean']:.3f}+-{row[m]['std']:.3f}"
                                                         for m in DIS_METRICS) for kind, row in d["rows"].items()))
    print("\n".join(lines), file=sys.stderr)
