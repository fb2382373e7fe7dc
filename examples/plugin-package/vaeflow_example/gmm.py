"""The RAE's ex-post density estimation: a Gaussian mixture fitted by EM to the training latents, as a latent prior
and a pipeline stage.

Ghosh et al. 2020, "From Variational to Deterministic Autoencoders" (ICLR 2020, arXiv:1903.12436): a deterministic
autoencoder has no prior it was trained to match, so after training one fits a density q(z) to the latents
{E(x) : x in the training set} and samples by decoding z ~ q(z). Here q is a Gaussian mixture

    q(z) = sum_k pi_k N(z; mu_k, Sigma_k),

fitted by expectation-maximisation (Dempster et al. 1977; the updates are Bishop 2006, "Pattern Recognition and
Machine Learning", eqs. 9.23-9.27) from a k-means++ start (Arthur & Vassilvitskii 2007). EM runs on the CPU in
float64: the latents are small (N, J) and the Cholesky factors stay well conditioned.

The mixture is also a latent prior plugin, `gmm` (`model.prior: {name: gmm, components: K, covariance: full}`), its
parameters registered buffers that live in the model's state dict. The stage `fit_gmm` runs after train for the model
kinds that name it in `Model.stages` (the RAE, rae.py), with its options under `model.ex_post` (rae.ExPostOptions).
It refines the trained model (`provides = "model"`): it writes a run dir holding the trained weights with model.prior
the fitted mixture, and the stages after it (evaluate, render, register) load that model, so that they sample it as
the paper does. Its key covers model.ex_post, the data manifest, the trained weights and this module's code, so a
change under model.ex_post re-runs it and the stages after it, never train.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from vaeflow.core.errors import ConfigError, VaeflowError
from vaeflow.core.bounds import MAX_LATENT
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import LatentPrior, Options, Stage, StageContext, file_sha256

LOG_2PI = math.log(2 * math.pi)
GMM_FILE, LOG_FILE, LATENTS_FILE, SAMPLES_FILE = "gmm.safetensors", "ex_post.json", "latents.safetensors", "samples.png"
MODEL_DIR = "model"  # the refined model's run dir, under the stage's folder
ENCODE_BATCH = 256  # images per encoder pass


# --- the mixture and its EM fit ------------------------------------------------------------------
@dataclass
class GaussianMixture:
    """q(z) = sum_k pi_k N(z; mu_k, Sigma_k) over latent vectors z (J,), with full or diagonal covariances."""

    weights: torch.Tensor  # (K,) pi_k, summing to 1
    means: torch.Tensor  # (K, J) mu_k
    covariances: torch.Tensor  # (K, J, J) Sigma_k when full, (K, J) their diagonals when diagonal

    @property
    def covariance(self) -> str:
        """"full" or "diag"."""
        return "diag" if self.covariances.dim() == 2 else "full"

    def joint_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log pi_k + log N(z_n; mu_k, Sigma_k) for every latent and component: z (N, J) -> (N, K)."""
        z = z.to(self.means.dtype)
        columns = []
        for mean, cov in zip(self.means, self.covariances):
            diff = z - mean  # (N, J)
            if self.covariance == "diag":
                mahalanobis = (diff.pow(2) / cov).sum(1)  # (N,)
                log_det = cov.log().sum()
            else:
                chol = torch.linalg.cholesky(cov)  # (J, J) lower, Sigma = L L^T
                solved = torch.linalg.solve_triangular(chol, diff.T, upper=False)  # L^-1 (z - mu): (J, N)
                mahalanobis = solved.pow(2).sum(0)  # (N,)
                log_det = 2 * chol.diagonal().log().sum()
            columns.append(-0.5 * (z.shape[1] * LOG_2PI + log_det + mahalanobis))
        return torch.stack(columns, 1) + self.weights.log()  # (N, K)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z) in nats: (N, J) -> (N,)."""
        return torch.logsumexp(self.joint_log_prob(z), dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """n draws from a mixture on the CPU: a component k ~ pi, then mu_k + T Sigma_k^(1/2) eps, eps ~ N(0, I): the
        temperature T scales each component's spread (T = 0: its mean): -> (n, J)."""
        k = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)  # (n,)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype)  # (n, J)
        if self.covariance == "diag":
            return self.means[k] + temperature * (self.covariances[k].sqrt() * eps)
        chol = torch.linalg.cholesky(self.covariances)  # (K, J, J)
        return self.means[k] + temperature * (chol[k] @ eps.unsqueeze(-1)).squeeze(-1)  # (n, J)

    def save(self, path) -> None:
        """weights, means and covariances as safetensors (float64), the covariance kind in the metadata, atomically."""
        from safetensors.torch import save_file

        from vaeflow.core.checkpoint import atomic_write

        tensors = {"weights": self.weights, "means": self.means, "covariances": self.covariances}
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                                 metadata={"covariance": self.covariance}))

    @classmethod
    def load(cls, path) -> "GaussianMixture":
        """The mixture that `save` wrote."""
        from safetensors.torch import load_file

        t = load_file(str(path))
        return cls(t["weights"], t["means"], t["covariances"])


def m_step(z: torch.Tensor, resp: torch.Tensor, covariance: str = "full",
           regularization: float = 1e-6) -> GaussianMixture:
    """The mixture that maximises the expected complete-data log-likelihood given responsibilities (Bishop eqs.
    9.24-9.27): z (N, J), resp (N, K) rows summing to 1. `regularization` is added to every covariance's diagonal.

    With K = 1 (resp all ones) this is the closed-form maximum-likelihood Gaussian: the sample mean and the biased
    sample covariance (plus the regularization)."""
    n, j = z.shape
    counts = resp.sum(0)  # (K,) N_k
    safe = counts + 10 * torch.finfo(z.dtype).eps  # an empty component gets mu = 0, Sigma = reg I, pi = 0
    means = resp.T @ z / safe[:, None]  # (K, J)
    covariances = []
    for k in range(resp.shape[1]):
        diff = z - means[k]  # (N, J)
        weighted = resp[:, k, None] * diff  # (N, J)
        if covariance == "diag":
            covariances.append((weighted * diff).sum(0) / safe[k] + regularization)  # (J,)
        else:
            cov = weighted.T @ diff / safe[k]  # (J, J)
            covariances.append(0.5 * (cov + cov.T) + regularization * torch.eye(j, dtype=z.dtype))
    return GaussianMixture(counts / n, means, torch.stack(covariances))


def kmeans_plus_plus(z: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k centres chosen among the latents (Arthur & Vassilvitskii 2007): the first uniformly, each next one with
    probability proportional to its squared distance to the nearest centre so far: z (N, J) -> (k, J)."""
    n = z.shape[0]
    first = torch.randint(n, (1,), generator=generator)
    centres = [z[first[0]]]
    nearest = (z - centres[0]).pow(2).sum(1)  # (N,) squared distance to the nearest centre
    for _ in range(1, k):
        p = nearest if nearest.sum() > 0 else torch.ones(n, dtype=z.dtype)  # all latents equal: any will do
        pick = torch.multinomial(p, 1, generator=generator)[0]
        centres.append(z[pick])
        nearest = torch.minimum(nearest, (z - z[pick]).pow(2).sum(1))
    return torch.stack(centres)  # (k, J)


def fit_gmm(z: torch.Tensor, components: int, covariance: str = "full", iterations: int = 100, tolerance: float = 1e-6,
            regularization: float = 1e-6, seed: int = 0) -> tuple[GaussianMixture, list[float]]:
    """Fit a K-component mixture to latents z (N, J) by EM; returns it and the mean train log-likelihood per latent
    (nats) before the first iteration and after each one, the last entry being the returned mixture's.

    The start: k-means++ centres, each latent assigned to its nearest centre, and one M-step on those hard
    assignments. EM then stops after `iterations`, or once an iteration gains no more than `tolerance`
    (nats per latent). Without
    regularization every EM iteration raises the log-likelihood or leaves it unchanged (Dempster et al. 1977)."""
    z = z.detach().to("cpu", torch.float64)
    n = z.shape[0]
    if covariance not in ("full", "diag"):
        raise ValueError(f"covariance must be 'full' or 'diag', got {covariance!r}")
    if not 1 <= components <= n:
        raise ValueError(f"components must be between 1 and the number of latents ({n}), got {components}")
    centres = kmeans_plus_plus(z, components, torch.Generator().manual_seed(seed))  # (K, J)
    nearest = torch.cdist(z, centres).argmin(1)  # (N,)
    gmm = m_step(z, torch.nn.functional.one_hot(nearest, components).to(z.dtype), covariance, regularization)
    history: list[float] = []
    for step in range(iterations + 1):
        joint = gmm.joint_log_prob(z)  # (N, K)
        log_q = torch.logsumexp(joint, 1)  # (N,)
        history.append(log_q.mean().item())
        if step == iterations or (step > 0 and history[-1] - history[-2] <= tolerance):
            break
        gmm = m_step(z, (joint - log_q[:, None]).exp(), covariance, regularization)  # E-step, then M-step
    return gmm, history


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) in nats: (N, J) -> (N,)."""
    z = z.to(torch.float64)
    return -0.5 * (z.pow(2).sum(1) + z.shape[1] * LOG_2PI)


# --- the mixture as a model's prior ---------------------------------------------------------------
class GaussianMixturePrior(LatentPrior):
    """p(z) = sum_k pi_k N(z; mu_k, Sigma_k) (Ghosh et al. 2020's ex-post density) as a continuous model's prior.

    The mixture's weights (K,), means (K, J) and covariances ((K, J, J) full, (K, J) diagonal) are float64 buffers,
    saved and loaded with the model's weights. Built, it is K equal copies of N(0, I) (so it is N(0, I)) until a fitted
    mixture is loaded (`load_mixture`, as the fit_gmm stage does, or a state dict). KL(q || p) has no closed form
    against a mixture: `kl` is LatentPrior's one-sample Monte Carlo estimate."""

    name = "gmm"

    class Options(Options):
        components: int = Field(
            10, ge=1, le=MAX_LATENT, description="K, the number of mixture components (the paper uses 10)")
        covariance: Literal["full", "diag"] = Field("full", description="each component's covariance: a full J x J "
                                                                         "matrix, or diagonal")

    def __init__(self, options: Options, latent_dim: int):
        super().__init__(options, latent_dim)
        k, j = options.components, latent_dim
        identities = (torch.ones(k, j, dtype=torch.float64) if options.covariance == "diag"
                      else torch.eye(j, dtype=torch.float64).repeat(k, 1, 1))  # (K, J) or (K, J, J)
        self.register_buffer("weights", torch.full((k,), 1 / k, dtype=torch.float64))  # (K,)
        self.register_buffer("means", torch.zeros(k, j, dtype=torch.float64))  # (K, J)
        self.register_buffer("covariances", identities)

    @property
    def mixture(self) -> GaussianMixture:
        """The mixture these buffers hold (the tensors themselves, on the prior's device)."""
        return GaussianMixture(self.weights, self.means, self.covariances)

    @torch.no_grad()
    def load_mixture(self, mixture: GaussianMixture) -> None:
        """Copy a fitted mixture into the buffers; its K, J and covariance kind must be this prior's."""
        for name in ("weights", "means", "covariances"):
            have, got = getattr(self, name), getattr(mixture, name)
            if tuple(got.shape) != tuple(have.shape):
                raise ValueError(f"the mixture's {name} have shape {tuple(got.shape)}, but this gmm prior "
                                 f"(components={self.options.components}, covariance={self.options.covariance}, "
                                 f"latent_dim={self.latent_dim}) holds {tuple(have.shape)}")
            have.copy_(got)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) in nats, computed in float64 and returned in z's dtype: (..., J) -> (...)."""
        flat = z.reshape(-1, self.latent_dim)  # (N, J)
        return self.mixture.log_prob(flat).to(z.dtype).reshape(z.shape[:-1])

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """z ~ p(z), each component's spread scaled by T, drawn on the CPU from `generator` (so a seed gives the same
        latents on any device), then moved to the prior's device as float32: (n, J)."""
        cpu = GaussianMixture(*(t.detach().cpu() for t in (self.weights, self.means, self.covariances)))
        return cpu.sample(n, generator, temperature).to(self.means.device, torch.float32)  # (n, J)


# --- the stage -----------------------------------------------------------------------------------
@torch.no_grad()
def encode(model, images: torch.Tensor, batch: int = ENCODE_BATCH) -> torch.Tensor:
    """The posterior modes (an RAE's deterministic codes) of images (N, C, H, W), in batches: -> (N, J) on the CPU."""
    from vaeflow.core.interfaces import to_unit_float

    return torch.cat([model.posterior(to_unit_float(images[i:i + batch]).to(model.device)).mode().float().cpu()
                      for i in range(0, len(images), batch)])


class FitGMM(Stage):
    """Ex-post density estimation (Ghosh et al. 2020): a Gaussian mixture fitted by EM to the training latents of the
    trained model, scored on both splits against a single Gaussian and N(0, I); then the refined model (the trained
    weights with model.prior the mixture), which the later stages load, and samples.png decoded from it."""

    name = "fit_gmm"
    inputs = ("prepare_data", "train")
    reads = ("model.ex_post",)  # through key_parts
    code = ("model",)  # how the model encodes and decodes
    folder = "ex_post"
    heavy = True  # encodes the whole train split, then EM over it
    provides = "model"  # its result is a run dir like train's: evaluate, render and register load the refined model

    @classmethod
    def check(cls, cfg, source: str) -> None:
        """The model kind has continuous latents, a latent prior slot (model.prior) and ex-post options."""
        from vaeflow.core.model import model_class

        slot = model_class(cfg).slots.get("prior")
        if (not cfg.model.capabilities.continuous or getattr(cfg.model, "ex_post", None) is None
                or slot is None or slot.family != LatentPrior.FAMILY):
            raise ConfigError([("model.kind", f"the fit_gmm stage needs a model with latent vectors, a latent prior "
                                              f"(model.prior) and model.ex_post options (like kind=rae); "
                                              f"kind={cfg.model.kind} lacks them")], source)

    def key_parts(self, cfg, inputs: dict) -> list:
        """model.ex_post: the mixture, the EM settings, the seed and the number of samples."""
        return [cfg.model.ex_post.model_dump(mode="json")]

    @staticmethod
    def identity(result: dict):
        """The refined weights and the plugins that read them (plugins.json, with each one's code hash): the later
        stages' keys cover the code of the user's config's plugins, not of the gmm prior that only the refined config
        selects, so an edit of its sampling that leaves the weights as they were still re-runs what samples them."""
        return [result.get("sha256"), result.get("plugins_sha256")]

    def run(self, ctx: StageContext, inputs: dict) -> dict:
        """latents.safetensors, gmm.safetensors, the refined model's run dir (model/), samples.png, then ex_post.json
        (the EM log and the metrics, last)."""
        from vaeflow.core.checkpoint import CONFIG_FILE, PLUGINS_FILE, WEIGHTS_FILE, load_model, write_text
        from vaeflow.core.images import save_grid, square_rows
        from vaeflow.core.manifest import load_prepared

        opts, folder = ctx.cfg.model.ex_post, ctx.folder
        paths = {name: folder / name for name in (GMM_FILE, LOG_FILE, LATENTS_FILE, SAMPLES_FILE)}
        run_dir = folder / MODEL_DIR
        if paths[LOG_FILE].exists():  # written last and atomically: an earlier or concurrent run of this key finished
            ctx.log.info("ex-post GMM already fitted in %s; reusing it", folder)
            record = json.loads(paths[LOG_FILE].read_text())
        else:
            model, trained_cfg = load_model(inputs["train"]["run_dir"], device="auto")
            splits = load_prepared(inputs["prepare_data"]["folder"])
            latents = {split: encode(model, splits[split]) for split in ("train", "test")}  # (N, J) each
            if opts.components > len(latents["train"]):
                raise VaeflowError(f"model.ex_post.components={opts.components} is more than the "
                                   f"{len(latents['train'])} training latents; use at most that many")
            save_tensors(paths[LATENTS_FILE], latents)
            gmm, history = fit_gmm(latents["train"], opts.components, opts.covariance, opts.iterations,
                                   opts.tolerance, opts.regularization, opts.seed)
            gmm.save(paths[GMM_FILE])
            write_refined(model, refined_config(trained_cfg, opts), gmm, run_dir)
            refined, _ = load_model(run_dir, device=model.device)  # as the later stages load it
            images = refined.generate(opts.samples, torch.Generator().manual_seed(opts.seed))  # z ~ q(z): (n, C, H, W)
            save_grid(images, paths[SAMPLES_FILE], nrow=square_rows(opts.samples))
            record = {"options": opts.model_dump(mode="json"), "log_likelihood": history,
                      "iterations": len(history) - 1, "metrics": score(gmm, latents, opts)}
            write_text(paths[LOG_FILE], json.dumps(record, indent=2))
        ctx.log_params({"ex_post/iterations_run": str(record["iterations"])})
        ctx.log_metrics(record["metrics"])
        for path in (paths[GMM_FILE], paths[LOG_FILE]):
            ctx.log_artifact(path, "ex_post")
        ctx.log_artifact(paths[SAMPLES_FILE], "images")
        model_files = [run_dir / name for name in (CONFIG_FILE, PLUGINS_FILE, WEIGHTS_FILE)]
        for path in model_files:
            ctx.log_artifact(path, MODEL_DIR)
        m = record["metrics"]
        ctx.log.info("ex-post GMM (%d components, %s): test log q(z) %.4g nats per latent (one Gaussian %.4g, "
                     "N(0, I) %.4g) after %d EM iterations; the model with it as model.prior is in %s",
                     opts.components, opts.covariance, m["ex_post/test_log_likelihood_gmm"],
                     m["ex_post/test_log_likelihood_gaussian"], m["ex_post/test_log_likelihood_standard_normal"],
                     record["iterations"], run_dir)
        weights = file_sha256(run_dir / WEIGHTS_FILE)
        return {"run_dir": str(run_dir), "weights_sha256": weights, "sha256": weights,  # train's keys: the model
                "plugins_sha256": file_sha256(run_dir / PLUGINS_FILE), "folder": str(folder),
                "gmm_sha256": file_sha256(paths[GMM_FILE]), "metrics": m,
                "files": [str(p) for p in (*paths.values(), *model_files)]}

    def summary(self, result: dict) -> dict:
        """The ex-post folder in the pipeline's result."""
        return {"gmm": result["folder"]}


def refined_config(cfg, opts):
    """The trained model's config with model.prior the ex-post mixture (the config.yaml of the refined run dir; the
    user's config, and so train's key, keep their own prior)."""
    from vaeflow.core.config import validate

    raw = cfg.model_dump(mode="json")
    raw["model"]["prior"] = {"name": GaussianMixturePrior.name, "components": opts.components,
                             "covariance": opts.covariance}
    return validate(raw, source=f"the {FitGMM.name} stage's model.prior")


def write_refined(model, cfg, gmm: GaussianMixture, run_dir) -> None:
    """A run dir that vaeflow.core.checkpoint.load_model reads (config.yaml, plugins.json, model.safetensors): the model `cfg`
    describes, with every weight of the trained `model` except its prior's, and the mixture in model.prior."""
    from vaeflow.core.checkpoint import WEIGHTS_FILE, save_weights, weights_metadata, write_run_config
    from vaeflow.core.model import build_model

    refined = build_model(cfg)
    refined.prior.load_mixture(gmm)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("prior.")}  # the trained prior's go
    state.update({f"prior.{k}": v for k, v in refined.prior.state_dict().items()})
    refined.load_state_dict(state)  # strict: every other weight is the trained model's
    write_run_config(run_dir, cfg)
    save_weights(run_dir / WEIGHTS_FILE, refined, weights_metadata(cfg))


def score(gmm: GaussianMixture, latents: dict[str, torch.Tensor], opts) -> dict[str, float]:
    """Mean log-density per latent (nats) of each split under the mixture, under the single Gaussian fitted to the
    train latents in closed form (same covariance kind and regularization), and under N(0, I)."""
    train = latents["train"].double()
    gaussian = m_step(train, torch.ones(len(train), 1, dtype=torch.float64), opts.covariance, opts.regularization)
    densities = {"gmm": gmm.log_prob, "gaussian": gaussian.log_prob, "standard_normal": standard_normal_log_prob}
    return {f"ex_post/{split}_log_likelihood_{name}": log_prob(z.double()).mean().item()
            for split, z in latents.items() for name, log_prob in densities.items()}


def save_tensors(path, tensors: dict[str, torch.Tensor]) -> None:
    """A dict of tensors as one safetensors file, atomically."""
    from safetensors.torch import save_file

    from vaeflow.core.checkpoint import atomic_write

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))


@hookimpl
def register_latent_priors(register):
    """Add the `gmm` latent prior (model.prior: {name: gmm, ...})."""
    register(GaussianMixturePrior)


@hookimpl
def register_stages(register):
    """Add the `fit_gmm` stage (used by kind=rae)."""
    register(FitGMM)
