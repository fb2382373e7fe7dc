"""The pythae side of `vaeflow bench zoo`: train one zoo model with pythae's own trainer, time it, score its NLL.

Chadebec, Vincent & Allassonnière 2022, "Pythae: Unifying Generative Autoencoders in Python - A Benchmarking Use
Case" (arXiv:2206.08309). The models: VAE (Kingma & Welling 2014, arXiv:1312.6114), IWAE (Burda et al. 2016,
arXiv:1509.00519), BetaTCVAE (Chen et al. 2018, arXiv:1802.04942), VAMP (Tomczak & Welling 2018, arXiv:1705.07120),
INFOVAE_MMD (Zhao et al. 2019, arXiv:1706.02262).

This file runs inside the bench's own virtualenv (pythae is no dependency of vaeflow) as

    python pipelines/pythae_worker.py JOB_JSON

and prints one JSON line (the last line of its stdout). It imports torch and numpy at the top and pythae only inside
`main`, nothing of vaeflow, so that the bench can import the plain networks below to count their parameters and to
load the weights the worker saves into a vaeflow model (the NLL cross-check).

The networks are the MLP of the bench: encoder 784-400-(20 mean, 20 log-variance) with ReLU, decoder 20-400-784 with
a sigmoid (pythae's BCE takes probabilities). The job (a JSON object) says: data (a .pt file {"train", "test"} of
float images (N, 1, 28, 28) in [0, 1] that the bench wrote), model, hyper (the shared hyperparameters), seed, epochs,
batch_size, lr, latent_dim, hidden, threads, nll_k, nll_examples (the first test images that get_nll scores; 0
skips it), nll_batch (pythae's get_nll batch_size), and weights_out (a .pt file for the trained networks' state dicts
and, for VAMP, the pseudo-inputs' pre-activations). The bench scores the whole test set itself, with vaeflow's
estimator on these weights; get_nll on the first images checks that estimator against pythae's own.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time

import torch
from torch import nn


class MLPEncoderNet(nn.Module):
    """x (B, 1, 28, 28) -> q(z|x) parameters: fc1 784-400, ReLU, then fc_mean and fc_logvar 400-20."""

    def __init__(self, pixels: int, hidden: int, latent_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(pixels, hidden)
        self.fc_mean = nn.Linear(hidden, latent_dim)
        self.fc_logvar = nn.Linear(hidden, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) -> mean (B, J), log-variance (B, J)."""
        h = torch.relu(self.fc1(x.flatten(1)))  # (B, 400)
        return self.fc_mean(h), self.fc_logvar(h)


class MLPDecoderNet(nn.Module):
    """z (B, 20) -> Bernoulli logits: fc3 20-400, ReLU, fc4 400-784."""

    def __init__(self, pixels: int, hidden: int, latent_dim: int):
        super().__init__()
        self.fc3 = nn.Linear(latent_dim, hidden)
        self.fc4 = nn.Linear(hidden, pixels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, J) -> logits (B, 784)."""
        return self.fc4(torch.relu(self.fc3(z)))  # (B, 400) -> (B, 784)


def nll_batch_size(k: int, cap: int = 100) -> int:
    """The largest divisor of k that is <= cap: pythae's get_nll draws batch_size x (k // batch_size) samples, and
    batch_size (not k) samples when k <= batch_size, so a divisor makes it draw exactly k."""
    return max(d for d in range(1, min(k, cap) + 1) if k % d == 0)


def pythae_model(name: str, hyper: dict, shape: tuple[int, ...], hidden: int, latent_dim: int):
    """The pythae model `name` with the bench's networks and the shared hyperparameters mapped to pythae's names."""
    from pythae.models import (
        INFOVAE_MMD, IWAE, VAE, VAMP, BetaTCVAE, BetaTCVAEConfig, INFOVAE_MMD_Config, IWAEConfig, VAEConfig,
        VAMPConfig,
    )
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    pixels = math.prod(shape)

    class Encoder(BaseEncoder):
        """pythae's encoder contract around MLPEncoderNet: ModelOutput(embedding, log_covariance)."""

        def __init__(self):
            BaseEncoder.__init__(self)
            self.net = MLPEncoderNet(pixels, hidden, latent_dim)

        def forward(self, x: torch.Tensor) -> ModelOutput:
            """x (B, C, H, W) -> embedding (B, J), log_covariance (B, J)."""
            mean, logvar = self.net(x)
            return ModelOutput(embedding=mean, log_covariance=logvar)

    class Decoder(BaseDecoder):
        """pythae's decoder contract around MLPDecoderNet: ModelOutput(reconstruction = sigmoid(logits))."""

        def __init__(self):
            BaseDecoder.__init__(self)
            self.net = MLPDecoderNet(pixels, hidden, latent_dim)

        def forward(self, z: torch.Tensor) -> ModelOutput:
            """z (B, J) -> reconstruction (B, C, H, W) in (0, 1)."""
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)).view(-1, *shape))

    common = {"input_dim": tuple(shape), "latent_dim": latent_dim, "reconstruction_loss": "bce"}
    models = {
        "vae": lambda: VAE(VAEConfig(**common), Encoder(), Decoder()),
        "iwae": lambda: IWAE(IWAEConfig(**common, number_samples=hyper["samples"]), Encoder(), Decoder()),
        "beta-tcvae": lambda: BetaTCVAE(BetaTCVAEConfig(
            **common, alpha=hyper["alpha"], beta=hyper["beta"], gamma=hyper["gamma"],
            use_mss=hyper["estimator"] == "mss"), Encoder(), Decoder()),
        "vamp": lambda: VAMP(VAMPConfig(**common, number_components=hyper["components"], linear_scheduling_steps=0),
                             Encoder(), Decoder()),
        "info-vae": lambda: INFOVAE_MMD(INFOVAE_MMD_Config(
            **common, kernel_choice=hyper["kernel"], alpha=hyper["alpha"], lbd=hyper["lambda"],
            kernel_bandwidth=math.sqrt(hyper["kernel_scale"]), scales=None), Encoder(), Decoder()),  # C = 2 J bw^2
    }
    if name not in models:
        raise SystemExit(f"pythae_worker: no pythae counterpart for model {name!r}; known: {sorted(models)}")
    return models[name]()


def trained_weights(model) -> dict:
    """The networks' state dicts and, for VAMP, the pseudo-inputs' pre-activations W e_k + b: (K, C*H*W)."""
    weights = {"encoder": model.encoder.net.state_dict(), "decoder": model.decoder.net.state_dict()}
    if hasattr(model, "pseudo_inputs"):  # VAMP: u_k = hardtanh(W e_k + b, 0, 1)
        layer = model.pseudo_inputs[0]
        weights["idle_weight"] = (layer.weight.t() + layer.bias).detach().clone()  # (K, C*H*W), vaeflow's name
    return weights


def train(job: dict, model, images: torch.Tensor) -> float:
    """pythae's TrainingPipeline + BaseTrainer (Adam, no eval set, no checkpoints, output in a temp dir): seconds."""
    from pythae.pipelines import TrainingPipeline
    from pythae.trainers import BaseTrainerConfig

    with tempfile.TemporaryDirectory(prefix="vaeflow-bench-pythae-") as tmp:
        config = BaseTrainerConfig(
            output_dir=tmp, num_epochs=job["epochs"], learning_rate=job["lr"], optimizer_cls="Adam",
            per_device_train_batch_size=job["batch_size"], steps_saving=None, steps_predict=None, seed=job["seed"],
            no_cuda=True)
        start = time.perf_counter()
        TrainingPipeline(model=model, training_config=config)(train_data=images)
        return time.perf_counter() - start


def main(job: dict) -> dict:
    """Train and score one pythae model per the job; returns the record the bench stores."""
    from importlib.metadata import version

    torch.set_num_threads(job["threads"])
    data = torch.load(job["data"])
    train_images, test_images = data["train"], data["test"][: job["nll_examples"]]  # (N, 1, 28, 28) float in [0, 1]
    shape = tuple(train_images.shape[1:])
    torch.manual_seed(job["seed"])  # network init; pythae seeds its trainer with the same seed
    model = pythae_model(job["model"], job["hyper"], shape, job["hidden"], job["latent_dim"])
    seconds = train(job, model, train_images)
    model.eval()
    torch.save(trained_weights(model), job["weights_out"])
    torch.manual_seed(job["seed"])
    start = time.perf_counter()
    log_px = None
    if len(test_images):
        with torch.no_grad():
            log_px = model.get_nll(test_images, n_samples=job["nll_k"], batch_size=job["nll_batch"])  # mean log p(x)
    nll_seconds = time.perf_counter() - start
    n_images = len(train_images) * job["epochs"]
    return {
        "model": job["model"], "seed": job["seed"], "get_nll": None if log_px is None else -float(log_px),
        "nll_k": job["nll_k"], "get_nll_examples": len(test_images), "get_nll_seconds": nll_seconds,
        "train_seconds": seconds,
        "train_images": n_images, "img_per_s": n_images / seconds, "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "pythae": version("pythae"),
        "pythae_config": json.loads(model.model_config.to_json_string()),
        "weights": job["weights_out"],
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
