"""`vaeflow bench train`: CPU training images/s of the engine, a pytorch/examples-style loop, and the matmul roofline.

All three are measured in one process on the same data and the same model shape (an MLP VAE
784-400-20 with a Bernoulli likelihood, batch 128), interleaved repeat by repeat so that machine
noise hits them alike; the report holds the medians, their ratios and every raw value.

- engine: the `vaeflow train` code path, ``vaeflow.core.engine.Trainer(cfg, run_dir).fit()``, whose
  ``TrainResult.img_per_s`` times the step loop only (data loading and checkpoints are outside it).
- reference: the loop of pytorch/examples/vae/main.py with its CPU DataLoader settings
  (num_workers=0): one image at a time through PIL and ToTensor, BCE(sum) + KLD, Adam.
- roofline: the GFLOP/s of a 1024^3 fp32 matmul divided by the training FLOPs per image,
  6 x the multiply-adds of the model's linear layers (2 forward, 4 backward).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn, optim
from torch.utils.data import DataLoader
from torchvision import transforms

from vaeflow.core.checkpoint import write_text
from vaeflow.core.config import Config, config_path, validate
from vaeflow.core.data import open_dataset
from vaeflow.core.engine import Trainer
from vaeflow.core.errors import VaeflowError

BATCH_SIZE = 128
SIDE = 28  # images are 1 x 28 x 28
PIXELS = SIDE * SIDE  # 784
HIDDEN = 400
LATENT_DIM = 20
LR = 1e-3
SEED = 0
LOG_EVERY = 50  # engine steps between host syncs, as in the shipped configs
WARMUP_STEPS = 20  # one unrecorded run of each loop before the repeats
EXPECTED_FLOPS_PER_IMAGE = 3_907_200  # 6 * (784*400 + 400*40 + 20*400 + 400*784), the check on the counter
SHAPES_MIN_TRAIN = 10_000
MATMUL_N = 1024
MATMUL_WARMUP = 3
MATMUL_TIMED = 7


# --- FLOPs -----------------------------------------------------------------------------------
def linear_macs(model: nn.Module) -> int:
    """Multiply-adds per image of every nn.Linear in `model` (in_features x out_features each)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def training_flops_per_image(model: nn.Module) -> int:
    """Training FLOPs per image: 6 x the linear multiply-adds (2 forward, 2 + 2 backward for inputs and weights)."""
    return 6 * linear_macs(model)


# --- data ------------------------------------------------------------------------------------
def fashion_mnist_available() -> bool:
    """True when the four Fashion-MNIST IDX files (plain or .gz) are in a folder the dataset plugin searches."""
    from vaeflow.plugins.datasets import IDX_FILES, FashionMNIST

    names = [name for pair in IDX_FILES.values() for name in pair]
    folders = FashionMNIST(FashionMNIST.Options()).search_folders()
    return any(all((f / n).is_file() or (f / f"{n}.gz").is_file() for n in names) for f in folders)


def dataset_spec(steps: int) -> dict:
    """data.dataset: Fashion-MNIST when present (never downloaded), else shapes at 28x28 with one epoch >= steps."""
    if fashion_mnist_available():
        return {"name": "fashion-mnist"}
    n_train = max(SHAPES_MIN_TRAIN, steps * BATCH_SIZE)
    return {"name": "shapes", "image_size": SIDE, "n_train": n_train, "n_test": 256, "seed": SEED}


def engine_config(dataset: dict, steps: int | None, threads: int | None, epochs: int = 1) -> Config:
    """The validated run config of the engine variant: MLP 784-400-20, Bernoulli, batch 128, CPU, `steps` steps
    (None: all `epochs`); threads None: the job's share of the CPUs (core.cpu)."""
    mlp = {"name": "mlp", "hidden": [HIDDEN], "activation": "relu"}
    raw = {
        "data": {"dataset": dataset, "loader": "memory"},
        "model": {"kind": "vae", "latent_dim": LATENT_DIM, "encoder": mlp, "decoder": mlp,
                  "likelihood": {"name": "bernoulli"}},
        "train": {"epochs": epochs, "max_steps": steps, "batch_size": BATCH_SIZE, "lr": LR, "seed": SEED,
                  "device": "cpu", "num_threads": threads, "log_every": LOG_EVERY, "checkpoint_every": None,
                  "progress": False},
    }
    return validate(raw, source="vaeflow bench train")


def reference_images(cfg: Config) -> np.ndarray:
    """The engine's training split as the uint8 (N, 28, 28) array the reference Dataset hands to PIL."""
    images = open_dataset(cfg).tensors("train")  # (N, 1, 28, 28), uint8 or float in [0, 1]
    if images.dtype != torch.uint8:
        images = images.mul(255).round().to(torch.uint8)  # shapes: quantized like a PNG would be
    return images[:, 0].numpy()  # (N, 28, 28)


# --- (a) the engine --------------------------------------------------------------------------
def run_engine(cfg: Config, expect_steps: int | None = None) -> tuple[float, int]:
    """One `vaeflow train` run in a throw-away run dir: (TrainResult.img_per_s, the model's training FLOPs per image);
    img/s is over the run's last epoch."""
    with tempfile.TemporaryDirectory(prefix="vaeflow-bench-") as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run")
        flops = training_flops_per_image(trainer.model)
        result = trainer.fit()
    expect_steps = cfg.train.max_steps if expect_steps is None else expect_steps
    if result.steps != expect_steps:
        raise RuntimeError(f"the engine ran {result.steps} steps, expected {expect_steps}")
    return result.img_per_s, flops


# --- (b) the pytorch/examples reference ------------------------------------------------------
class ReferenceImages(torch.utils.data.Dataset):
    """One image at a time, as torchvision's MNIST does: Image.fromarray on uint8 (28, 28), then ToTensor."""

    def __init__(self, images: np.ndarray):
        self.images = images  # (N, 28, 28) uint8
        self.transform = transforms.ToTensor()

    def __len__(self) -> int:
        """Number of images."""
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Image i as float (1, 28, 28) in [0, 1]."""
        return self.transform(Image.fromarray(self.images[i]))  # PIL mode L -> (1, 28, 28)


class ReferenceVAE(nn.Module):
    """The VAE of pytorch/examples/vae/main.py: 784-400-(20, 20), 20-400-784, ReLU, sigmoid output."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(PIXELS, HIDDEN)
        self.fc21 = nn.Linear(HIDDEN, LATENT_DIM)
        self.fc22 = nn.Linear(HIDDEN, LATENT_DIM)
        self.fc3 = nn.Linear(LATENT_DIM, HIDDEN)
        self.fc4 = nn.Linear(HIDDEN, PIXELS)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 784) -> mu, logvar, each (B, 20)."""
        h1 = F.relu(self.fc1(x))  # (B, 400)
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mu + eps * std: (B, 20)."""
        std = torch.exp(0.5 * logvar)  # (B, 20)
        eps = torch.randn_like(std)  # (B, 20)
        return mu + eps * std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, 20) -> pixel probabilities (B, 784)."""
        h3 = F.relu(self.fc3(z))  # (B, 400)
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, 1, 28, 28) -> reconstruction (B, 784), mu (B, 20), logvar (B, 20)."""
        mu, logvar = self.encode(x.view(-1, PIXELS))  # (B, 784) in
        z = self.reparameterize(mu, logvar)  # (B, 20)
        return self.decode(z), mu, logvar


def reference_loss(recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The examples' loss, summed over the batch: BCE(recon (B, 784), x) + KL(q(z|x) || N(0, I))."""
    bce = F.binary_cross_entropy(recon, x.view(-1, PIXELS), reduction="sum")  # x (B, 1, 28, 28) -> (B, 784)
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())  # over (B, 20)
    return bce + kld


def run_reference(images: np.ndarray, steps: int, timed_from: int = 0) -> float:
    """Images/s of the examples' train loop from a fresh model, DataLoader included in the time: `steps` steps, of
    which those from step `timed_from` on are timed (a later epoch's steady state)."""
    torch.manual_seed(SEED)
    device = torch.device("cpu")
    model = ReferenceVAE().to(device)
    optimizer = optim.Adam(model.parameters(), lr=LR)
    loader = DataLoader(ReferenceImages(images), batch_size=BATCH_SIZE, shuffle=True, num_workers=0)  # examples' CPU kwargs
    model.train()
    done, n_images, train_loss = 0, 0, 0.0
    start = time.perf_counter()
    while done < steps:
        for data in loader:  # (B, 1, 28, 28)
            if done == timed_from:
                n_images, start = 0, time.perf_counter()
            data = data.to(device)
            optimizer.zero_grad()
            recon, mu, logvar = model(data)
            loss = reference_loss(recon, data, mu, logvar)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
            done, n_images = done + 1, n_images + len(data)
            if done == steps:
                break
    seconds = time.perf_counter() - start
    if not math.isfinite(train_loss):
        raise RuntimeError("the reference loop diverged")
    return n_images / seconds


def steady_state(dataset: dict, images: np.ndarray, threads: int, epochs: int) -> tuple[float, float]:
    """(engine, reference) images/s over the last of `epochs` full epochs of a real training from a fresh model."""
    cfg = engine_config(dataset, None, threads, epochs=epochs)
    engine, _ = run_engine(cfg, expect_steps=epochs * math.ceil(len(images) / BATCH_SIZE))
    per_epoch = math.ceil(len(images) / BATCH_SIZE)  # the examples' DataLoader keeps the last, partial batch
    return engine, run_reference(images, epochs * per_epoch, timed_from=(epochs - 1) * per_epoch)


# --- (c) the matmul roofline -----------------------------------------------------------------
def matmul_gflops(n: int = MATMUL_N, warmup: int = MATMUL_WARMUP, timed: int = MATMUL_TIMED) -> float:
    """GFLOP/s of an fp32 n x n x n matmul: 2 n^3 flops over the median of `timed` runs after `warmup`."""
    a, b = torch.randn(n, n), torch.randn(n, n)  # (n, n) fp32 each
    out = torch.empty(n, n)  # (n, n)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    seconds = []
    for _ in range(timed):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(seconds) / 1e9


# --- the benchmark ---------------------------------------------------------------------------
def bench_train(out: str | Path, repeats: int = 5, steps: int = 200, threads: int = 2, steady_epochs: int = 3,
                steady_repeats: int = 2) -> dict:
    """Measure engine vs reference vs roofline images/s (interleaved repeats), fresh and in a later epoch, write the
    JSON to `out`, return it."""
    if repeats < 1 or steps < 1 or threads < 1 or steady_repeats < 0 or steady_epochs < 2:
        raise VaeflowError(f"repeats, steps and threads must be >= 1, steady repeats >= 0 and steady epochs >= 2, got "
                           f"{repeats}, {steps}, {threads}, {steady_repeats}, {steady_epochs}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = _measure(repeats, steps, threads, steady_epochs, steady_repeats)
    finally:
        torch.set_num_threads(previous_threads)
    write_text(out, json.dumps(result, indent=2) + "\n")
    print_summary(result)
    return result


def _measure(repeats: int, steps: int, threads: int, steady_epochs: int, steady_repeats: int) -> dict:
    """The measurements and the report dict; torch threads are already set."""
    dataset = dataset_spec(steps)
    cfg = engine_config(dataset, steps, threads)
    images = reference_images(cfg)  # (N, 28, 28) uint8
    if steps > len(images) // BATCH_SIZE:
        raise VaeflowError(f"--steps {steps} is more than the {len(images) // BATCH_SIZE} full batches of one "
                           f"{dataset['name']} epoch; the engine times its last epoch only, so use fewer steps")
    warmup = min(WARMUP_STEPS, steps)

    run_engine(engine_config(dataset, warmup, threads))  # unrecorded: first-touch allocations, lazy inits
    run_reference(images, warmup)
    reference_flops = training_flops_per_image(ReferenceVAE())

    engine_runs, reference_runs, gflops_runs, flops = [], [], [], None
    for r in range(repeats):
        img_per_s, flops = run_engine(cfg)
        if flops != EXPECTED_FLOPS_PER_IMAGE or reference_flops != flops:
            raise RuntimeError(f"training FLOPs per image: engine {flops}, reference {reference_flops}, "
                               f"expected {EXPECTED_FLOPS_PER_IMAGE} for 784-400-20")
        engine_runs.append(img_per_s)
        reference_runs.append(run_reference(images, steps))
        gflops_runs.append(matmul_gflops())
        print(f"repeat {r + 1}/{repeats}: engine {engine_runs[-1]:.0f} img/s, reference {reference_runs[-1]:.0f} "
              f"img/s, matmul {gflops_runs[-1]:.1f} GFLOP/s", file=sys.stderr)

    steady_engine, steady_reference = [], []
    for r in range(steady_repeats):  # a later epoch of a real training: what a user's run settles to
        engine_later, reference_later = steady_state(dataset, images, threads, steady_epochs)
        steady_engine.append(engine_later)
        steady_reference.append(reference_later)
        print(f"steady repeat {r + 1}/{steady_repeats}: epoch {steady_epochs}: engine {engine_later:.0f} img/s, "
              f"reference {reference_later:.0f} img/s", file=sys.stderr)

    engine, reference, gflops = (statistics.median(v) for v in (engine_runs, reference_runs, gflops_runs))
    roofline = gflops * 1e9 / flops
    steady = None
    if steady_repeats:
        later, later_reference = statistics.median(steady_engine), statistics.median(steady_reference)
        steady = {"epoch": steady_epochs, "engine_img_per_s": later, "reference_img_per_s": later_reference,
                  "speedup": later / later_reference, "engine_vs_fresh": later / engine,
                  "reference_vs_fresh": later_reference / reference, "repeats": steady_repeats,
                  "statistic": "median over repeats",
                  "timed": f"the step loop of epoch {steady_epochs} of a {steady_epochs}-epoch training on the whole "
                           f"train split, from a fresh model (engine: TrainResult.img_per_s; reference: its last "
                           f"epoch's steps, DataLoader included)",
                  "raw": {"engine_img_per_s": steady_engine, "reference_img_per_s": steady_reference}}
    return {
        "benchmark": "vaeflow bench train",
        "engine_img_per_s": engine,
        "reference_img_per_s": reference,
        "speedup": engine / reference,
        "roofline_img_per_s": roofline,
        "matmul_gflops": gflops,
        "roofline_fraction": engine / roofline,
        "reference_roofline_fraction": reference / roofline,
        "flops_per_image": flops,
        "threads": threads,
        "batch_size": BATCH_SIZE,
        "steps": steps,
        "warmup_steps": warmup,
        "repeats": repeats,
        "dataset": dataset["name"],
        "train_images": len(images),
        "torch_version": torch.__version__,
        "statistic": "median over repeats",
        "raw": {"engine_img_per_s": engine_runs, "reference_img_per_s": reference_runs,
                "matmul_gflops": gflops_runs},
        "steady_state": steady,
        "config": _config_summary(cfg, dataset, steps, warmup, repeats, threads),
    }


def _config_summary(cfg: Config, dataset: dict, steps: int, warmup: int, repeats: int, threads: int) -> dict:
    """What was run, without timestamps or paths, so two reports can be diffed."""
    return {
        "device": "cpu",
        "torch_num_threads": threads,
        "dataset": dataset,
        "model": f"MLP VAE {PIXELS}-{HIDDEN}-{LATENT_DIM} (encoder {PIXELS}-{HIDDEN}-{2 * LATENT_DIM}, "
                 f"decoder {LATENT_DIM}-{HIDDEN}-{PIXELS}), ReLU, Bernoulli likelihood",
        "batch_size": BATCH_SIZE,
        "steps": steps,
        "warmup": f"one unrecorded {warmup}-step run of the engine and of the reference before the repeats",
        "repeats": f"{repeats}, interleaved: engine, reference, matmul",
        "engine": {
            "path": "vaeflow.core.engine.Trainer(cfg, run_dir).fit() (what `vaeflow train` runs), fresh per repeat",
            "timed": "TrainResult.img_per_s: the step loop of the last (only) epoch",
            "optimizer": f"AdamW(lr={LR}, weight_decay={cfg.train.weight_decay})",
            "run_config": cfg.model_dump(mode="json"),
        },
        "reference": {
            "style": "pytorch/examples vae/main.py, fresh model per repeat",
            "data": f"Dataset: PIL Image.fromarray(uint8 28x28) -> ToTensor; "
                    f"DataLoader(batch_size={BATCH_SIZE}, shuffle=True, num_workers=0) (the examples' CPU settings)",
            "loss": "F.binary_cross_entropy(recon, x.view(-1, 784), reduction='sum') + KLD",
            "optimizer": f"Adam(lr={LR})",
            "timed": "images / seconds over the steps, DataLoader iteration included",
        },
        "roofline": {
            "matmul": f"{MATMUL_N}x{MATMUL_N}x{MATMUL_N} fp32 torch.mm, median of {MATMUL_TIMED} after "
                      f"{MATMUL_WARMUP} warm-up, 2*{MATMUL_N}^3 flops",
            "flops_per_image": "6 x multiply-adds of the engine model's nn.Linear layers",
            "img_per_s": "matmul_gflops * 1e9 / flops_per_image",
        },
    }


def print_summary(result: dict) -> None:
    """A short human table of the report on stderr (stdout carries the JSON)."""
    raw = result["raw"]
    lines = [
        f"vaeflow bench train: {result['dataset']}, MLP 784-400-20, batch {result['batch_size']}, "
        f"{result['steps']} steps x {result['repeats']} repeats, {result['threads']} threads, torch {result['torch_version']}",
        f"  {'variant':<22}{'img/s (median)':>15}   per repeat",
        f"  {'engine':<22}{result['engine_img_per_s']:>15.0f}   {_fmt(raw['engine_img_per_s'])}",
        f"  {'reference (examples)':<22}{result['reference_img_per_s']:>15.0f}   {_fmt(raw['reference_img_per_s'])}",
        f"  {'fp32 matmul roofline':<22}{result['roofline_img_per_s']:>15.0f}   "
        f"{result['matmul_gflops']:.1f} GFLOP/s / {result['flops_per_image'] / 1e6:.4f} MFLOP per image",
        f"  speedup engine/reference {result['speedup']:.2f}x; of the roofline: engine "
        f"{100 * result['roofline_fraction']:.1f}%, reference {100 * result['reference_roofline_fraction']:.1f}%",
    ]
    steady = result.get("steady_state")
    if steady:
        lines += [
            f"  steady state, epoch {steady['epoch']} of a real training (median of {steady['repeats']}):",
            f"  {'engine':<22}{steady['engine_img_per_s']:>15.0f}   {_fmt(steady['raw']['engine_img_per_s'])}"
            f"   ({steady['engine_vs_fresh']:.2f}x its fresh start)",
            f"  {'reference (examples)':<22}{steady['reference_img_per_s']:>15.0f}   "
            f"{_fmt(steady['raw']['reference_img_per_s'])}   ({steady['reference_vs_fresh']:.2f}x its fresh start)",
            f"  speedup engine/reference in epoch {steady['epoch']}: {steady['speedup']:.2f}x",
        ]
    print("\n".join(lines), file=sys.stderr)


def _fmt(values: list[float]) -> str:
    """Per-repeat values, rounded, space separated."""
    return " ".join(f"{v:.0f}" for v in values)


# --- vaeflow bench pipeline ----------------------------------------------------------------------
def _timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB of that command's process tree) for one fresh process."""
    import os
    import subprocess

    t0 = time.perf_counter()
    with open(os.devnull, "w") as sink, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=sink, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the max over all children
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            err.seek(0)
            raise VaeflowError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}): {err.read()[-2000:]}")
    return wall, usage.ru_maxrss / 2**20


@contextlib.contextmanager
def _prefect_server(home: Path):
    """A `prefect server` on a free loopback port for the duration; yields its API URL."""
    import os
    import signal
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        for _ in range(360):
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise VaeflowError("prefect server exited during start-up") from None
                time.sleep(0.5)
        else:
            raise VaeflowError("prefect server did not start within 180 s")
        yield api
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def bench_pipeline(out: Path, config: Path, epochs: int, repeats: int) -> dict:
    """overhead_ratio of the pipeline (up to train) vs a bare `vaeflow train`, each a fresh process, interleaved;
    with a temporary Prefect server per run (laptop) and against a running `prefect server` (deployed);
    plus cached_rerun_s and peak RSS per command."""
    import os

    vaeflow = str(Path(sys.executable).parent / "vaeflow")
    config = config_path(config).resolve()  # a file, or a shipped template by name
    sets = [f"train.epochs={epochs}", "train.progress=false"]
    set_args = [a for s in sets for a in ("--set", s)]
    walls: dict[str, list[float]] = {"bare": [], "temporary_server": [], "running_server": []}
    rss: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, _prefect_server(Path(tmp) / "server") as api:
        tmp = Path(tmp)
        for r in range(repeats):
            for mode in walls:
                home = tmp / f"{mode}{r}"
                home.mkdir()
                env = {**os.environ, "VAEFLOW_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
                env.pop("PREFECT_API_URL", None)
                if mode == "running_server":
                    env["PREFECT_API_URL"] = api
                if mode == "bare":
                    cmd = [vaeflow, "train", str(config), "--out", str(home / "run"), *set_args]
                else:
                    cmd = [vaeflow, "run", str(config), *set_args, "--until", "train"]
                wall, peak = _timed(cmd, env, home)
                walls[mode].append(wall)
                rss[mode] = max(rss.get(mode, 0.0), peak)
            print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{m} {w[-1]:.1f} s" for m, w in walls.items()), file=sys.stderr)
        # the rest of the stages once, then an unchanged re-run in a fresh process (temporary server)
        env.pop("PREFECT_API_URL", None)
        _, rss["pipeline_rest"] = _timed([vaeflow, "run", str(config), *set_args], env, home)
        cached, _ = _timed([vaeflow, "run", str(config), *set_args], env, home)
    med = {m: statistics.median(w) for m, w in walls.items()}
    result = {
        "config": config.name, "epochs": epochs, "repeats": repeats, "threads": torch.get_num_threads(),
        "bare_train_s": med["bare"], "pipeline_train_s": med["temporary_server"],
        "overhead_ratio": med["temporary_server"] / med["bare"],
        "pipeline_running_server_train_s": med["running_server"],
        "overhead_ratio_running_server": med["running_server"] / med["bare"],
        "cached_rerun_s": cached, "peak_rss_gib": rss, "raw": walls,
        "note": "fresh process per run; overhead_ratio starts Prefect's temporary server in each run, "
                "overhead_ratio_running_server reports to a `prefect server` started once (PREFECT_API_URL)",
    }
    write_text(out, json.dumps(result, indent=2))
    return result
