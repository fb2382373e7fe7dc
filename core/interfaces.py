"""Base classes for every component family; plugins subclass these.

Each component sets a class attribute ``name`` and a nested pydantic ``Options``
model (``extra="forbid"``). Constructors take the validated options first, then
the shapes the host derives from the data and the model config.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

Shape = tuple[int, int, int]  # (C, H, W)


class Options(BaseModel):
    """Base for component options: unknown keys are errors, not silently ignored, and floats are finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Component:
    """Mixin carrying the registry name and the options model of a component."""

    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    FAMILY: ClassVar[str]


class Encoder(Component, nn.Module):
    """x (B, C, H, W) -> posterior parameters (B, out_features)."""

    FAMILY = "encoder"

    def __init__(self, options: Options, in_shape: Shape, out_features: int):
        nn.Module.__init__(self)
        self.options, self.in_shape, self.out_features = options, in_shape, out_features


class Decoder(Component, nn.Module):
    """z (B, latent_dim) -> likelihood parameters (B, *out_shape)."""

    FAMILY = "decoder"

    def __init__(self, options: Options, latent_dim: int, out_shape: Shape):
        nn.Module.__init__(self)
        self.options, self.latent_dim, self.out_shape = options, latent_dim, out_shape


class Likelihood(Component, nn.Module):
    """p(x | z) given the decoder's parameters; may own parameters (a learned sigma)."""

    FAMILY = "likelihood"

    def __init__(self, options: Options, data_shape: Shape):
        nn.Module.__init__(self)
        self.options, self.data_shape = options, data_shape

    def param_channels(self, channels: int) -> int:
        """How many channels of parameters the decoder must output per data channel set."""
        return channels

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(x | params) summed over pixels: x (B, C, H, W), params (B, P, H, W) -> (B,)."""
        raise NotImplementedError

    def log_prob_samples(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(x | params_i) for k parameter sets per image (the IWAE's draws): x (B, C, H, W), params
        (k, B, P, H, W) -> (k, B). This default copies x k times; a likelihood may broadcast it instead."""
        k = params.shape[0]
        x_rep = x.expand(k, *x.shape).flatten(0, 1)  # (k*B, C, H, W)
        return self.log_prob(x_rep, params.flatten(0, 1)).view(k, -1)  # (k, B)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """E[x | params]: (B, P, H, W) -> (B, C, H, W), used for reconstructions and samples."""
        raise NotImplementedError

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x ~ p(x | params): (B, P, H, W) -> (B, C, H, W)."""
        raise NotImplementedError


class GridEncoder(Encoder):
    """x (B, C, H, W) -> a feature map (B, out_channels, H / stride, W / stride), for VQ models.

    `out_features` of the base class is the number of output channels here. The constructor
    raises ValueError (a config error for the user) when `stride` does not divide H and W.
    """

    def __init__(self, options: Options, in_shape: Shape, out_channels: int, stride: int):
        super().__init__(options, in_shape, out_channels)
        self.stride = stride


class GridDecoder(Decoder):
    """A feature map (B, in_channels, h, w) -> (B, *out_shape), out_shape = (P, h * stride, w * stride)."""

    def __init__(self, options: Options, in_channels: int, out_shape: Shape, stride: int):
        super().__init__(options, in_channels, out_shape)
        self.in_channels, self.stride = in_channels, stride


@dataclass
class QuantizerOutput:
    """Named outputs of a quantizer (van den Oord et al. 2017)."""

    quantized: torch.Tensor  # (B, D, h, w), straight-through to z_e
    indices: torch.Tensor  # (B, h, w) int64 codebook indices
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted scalar terms: codebook, commitment
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars: perplexity, usage, ...


class Quantizer(Component, nn.Module):
    """z_e (B, D, h, w) -> QuantizerOutput: nearest codebook vectors with a straight-through gradient.

    Options must include `codebook_size` (K). `losses` are already weighted (the commitment term
    carries its beta) and are added to the training loss as they are. `stats` hold detached
    scalar tensors (no host sync): perplexity, usage (batch), usage_ema, dead_codes.
    """

    FAMILY = "quantizer"

    def __init__(self, options: Options, embedding_dim: int):
        nn.Module.__init__(self)
        self.options, self.embedding_dim = options, embedding_dim
        self.codebook_size: int = options.codebook_size

    @property
    def codebook(self) -> torch.Tensor:  # pragma: no cover - interface
        """The code vectors (K, D), as used for lookup."""
        raise NotImplementedError

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors of indices: (B, h, w) int64 -> (B, D, h, w)."""
        return self.codebook[indices.long()].permute(0, 3, 1, 2)  # (B, h, w, D) -> (B, D, h, w)

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:  # pragma: no cover - interface
        """Quantize a feature map to its nearest codebook vectors."""
        raise NotImplementedError


class Prior(Component, nn.Module):
    """An autoregressive prior over a code grid (B, h, w) of K codes, optionally conditioned on another
    code grid (the top codes of a VQ-VAE-2), which it may see in full.

    Subclasses implement `forward`; `log_prob` and `sample` (raster order) are provided here.
    `forward` must be causal: the logits at position i depend only on codes before i in raster order.
    """

    FAMILY = "prior"

    def __init__(self, options: Options, codebook_size: int, grid: tuple[int, int],
                 condition: tuple[int, tuple[int, int]] | None = None):
        """`condition`: (codebook size, grid) of the conditioning codes, or None for an unconditional prior."""
        nn.Module.__init__(self)
        self.options, self.codebook_size, self.grid, self.condition = options, codebook_size, tuple(grid), condition

    def forward(self, codes: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        """Logits over the K codes: codes (B, h, w) int64, condition (B, hc, wc) int64 -> (B, K, h, w)."""
        raise NotImplementedError

    def log_prob(self, codes: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """log p(codes | condition) in nats, summed over the grid: (B, h, w) -> (B,)."""
        logits = self(codes, condition)  # (B, K, h, w)
        return -torch.nn.functional.cross_entropy(logits, codes.long(), reduction="none").flatten(1).sum(1)

    @torch.no_grad()
    def sample(self, n: int, condition: torch.Tensor | None = None, temperature: float = 1.0,
               top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral sampling in raster order: -> (n, h, w) int64 codes.

        Draws come from `generator` on the CPU, so a seed gives the same codes on any device.
        `temperature` divides the logits; `top_k` keeps only the k most likely codes per position.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        device = next(self.parameters()).device
        if condition is not None:
            condition = condition.to(device)
        h, w = self.grid
        codes = torch.zeros(n, h, w, dtype=torch.long, device=device)
        was_training = self.training
        self.eval()  # no dropout while sampling
        try:
            for r in range(h):
                for c in range(w):
                    logits = self(codes, condition)[:, :, r, c].float().cpu() / temperature  # (n, K)
                    if top_k is not None and top_k < logits.shape[1]:
                        kth = logits.topk(top_k, dim=1).values[:, -1:]  # (n, 1)
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    draw = torch.multinomial(logits.softmax(1), 1, generator=generator)  # (n, 1)
                    codes[:, r, c] = draw.squeeze(1).to(device)
        finally:
            self.train(was_training)
        return codes


class Dataset(Component):
    """A dataset of images in [0, 1] with a fixed shape and train/test splits."""

    FAMILY = "dataset"
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "test")
    # True: the splits follow from the options and the code alone, no file is read (a synthetic dataset). A dataset
    # that lists no sources() and is not GENERATED has its loaded splits hashed to key the pipeline's data cache.
    GENERATED: ClassVar[bool] = False

    def __init__(self, options: Options):
        self.options = options

    @property
    def shape(self) -> Shape:
        """(C, H, W) of one image, known without loading pixels."""
        raise NotImplementedError

    def tensors(self, split: str) -> torch.Tensor:
        """The whole split in memory: (N, C, H, W) uint8 in [0, 255] or float in [0, 1]."""
        raise NotImplementedError

    def torch_dataset(self, split: str) -> torch.utils.data.Dataset:
        """A map-style dataset of (C, H, W) float images, for the streaming DataLoader path."""
        return _ImageTensorDataset(self.tensors(split))

    def sources(self) -> list[Path]:
        """The files this dataset reads, listed with their sha256 in the data manifest; [] if GENERATED."""
        return []

    def labels(self, split: str) -> torch.Tensor | None:
        """Class labels of a split, int64 (N,), or None when the dataset has none."""
        return None

    def factors(self, split: str) -> torch.Tensor | None:
        """Ground-truth generative factors of a split, float (N, F) (names in FACTOR_NAMES), or None."""
        return None

    FACTOR_NAMES: ClassVar[tuple[str, ...]] = ()
    FACTOR_DISCRETE: ClassVar[tuple[bool, ...]] = ()  # per factor: categorical (True) or ordered/continuous


class _ImageTensorDataset(torch.utils.data.Dataset):
    """Map-style view over an in-memory (N, C, H, W) tensor, scaling uint8 to [0, 1]."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_unit_float(self.images[i])


def digest_tensor(digest, tensor: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes (contiguous, on the CPU) to a hashlib digest."""
    value = tensor.detach().cpu().contiguous()
    digest.update(str(value.dtype).encode() + str(tuple(value.shape)).encode())
    digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input passes through as float32."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


class Noise(Component):
    """Input corruption for the denoising autoencoder (Vincent et al. 2008)."""

    FAMILY = "noise"

    def __init__(self, options: Options):
        self.options = options

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Corrupt x (B, C, H, W) -> (B, C, H, W), drawing from the global torch RNG."""
        raise NotImplementedError


@dataclass
class RenderContext:
    """What a renderer gets: the trained model, held-out images, where to write, and a seed."""

    model: nn.Module  # a vaeflow.core.interfaces.Model (see its capabilities: latent vectors or code grids), in eval mode
    images: torch.Tensor  # held-out images (N, C, H, W) in [0, 1], on the CPU
    out_dir: Path  # the renderer writes its files under this folder (atomically)
    seed: int = 0  # seeds every random choice: which images, which samples
    priors: dict = field(default_factory=dict)  # a VQ model's trained priors by level ("top", "bottom"), if any


class Renderer(Component):
    """Turns a trained model into image files (grids, GIFs): latent traversals, phase diagrams, ...

    `kinds` says which models it can render: "continuous" (VAE, AE, DAE) and/or "discrete" (VQ models).
    """

    FAMILY = "renderer"
    kinds: ClassVar[tuple[str, ...]] = ("continuous",)

    def __init__(self, options: Options):
        self.options = options

    def render(self, ctx: RenderContext) -> list[Path]:  # pragma: no cover - interface
        """Write this renderer's images under ctx.out_dir; returns the paths written."""
        raise NotImplementedError


# --- continuous priors p(z) -------------------------------------------------------------------------
class LatentPrior(Component, nn.Module):
    """p(z) over a continuous latent vector (B, J): the prior a continuous model's KL, sampling and IWAE use.

    Subclasses implement `log_prob` and `sample`. `kl` defaults to the one-sample Monte Carlo estimate
    log q(z|x) - log p(z) at the posterior draw z; a prior with a closed form overrides it (and `kl_per_dim`).
    """

    FAMILY = "latent_prior"

    def __init__(self, options: Options, latent_dim: int):
        nn.Module.__init__(self)
        self.options, self.latent_dim = options, latent_dim

    def bind(self, model) -> None:
        """Called by a continuous model once it is built, so a prior defined through the posterior (the VampPrior)
        can reach q(z|x) and the data shape. A prior that keeps `model` must hold it outside its submodules (a plain
        attribute, not nn.Module registration), so the encoder is not saved twice and copies follow the copy's
        model. The default does nothing."""

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """log p(z) summed over the latent dimensions: (..., J) -> (...)."""
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Draw n latents on the CPU from `generator` (then moved to the prior's device): (n, J)."""
        raise NotImplementedError  # pragma: no cover - interface

    def kl(self, posterior, z: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || p(z)) per example, estimated at the posterior draw z (B, J): (B,)."""
        return posterior.log_prob(z) - self.log_prob(z)

    def kl_per_dim(self, posterior) -> torch.Tensor | None:
        """KL per latent dimension (B, J) when it has a closed form, else None."""
        return None


# --- weight schedules ----------------------------------------------------------------------------
class Schedule(Component):
    """A weight schedule for the loss term a model names in `scheduled` (a VAE's KL), selected by train.beta.schedule
    (the config key is `schedule`, not `name`). `penalty(term, step)` is what enters the loss: beta(step) * term
    unless a schedule says otherwise (controlled capacity: gamma * |term - C(t)|)."""

    FAMILY = "schedule"
    constant: ClassVar[bool] = False  # the weight never changes: logged once as a param, not as a metric curve

    def __init__(self, options: Options):
        self.options = options

    def beta(self, step: int) -> float:  # pragma: no cover - interface
        """The weight at optimizer step `step`."""
        raise NotImplementedError

    def penalty(self, term: torch.Tensor, step: int) -> torch.Tensor:
        """The scheduled term's contribution to the loss at `step`: beta(step) * term."""
        return self.beta(step) * term

    def logged(self, step: int) -> dict[str, float]:
        """What the engine records at `step` ({"beta": ...} and anything else the schedule has, e.g. capacity)."""
        return {"beta": self.beta(step)}


# --- models --------------------------------------------------------------------------------------
VECTOR, FEATURE_MAP = "vector", "feature map"


def form_of(cls: type) -> str | None:
    """What an encoder produces or a decoder consumes: a vector (B, J) or a feature map (B, D, h, w)."""
    if issubclass(cls, (GridEncoder, GridDecoder)):
        return FEATURE_MAP
    if issubclass(cls, (Encoder, Decoder)):
        return VECTOR
    return None


@dataclass(frozen=True)
class Capabilities:
    """What a model can do; hashing, the CLI, deployments, renderers, pyfunc and metrics ask this, not the kind."""

    continuous: bool = False  # encodes x to a latent vector z (B, J): posterior(), decode(), latent_dim
    discrete: bool = False  # encodes x to code grids per level: encode_codes(), decode_codes(), levels, grids
    sampling: bool = False  # draws new images: from its own prior (continuous) or from trained code priors
    log_likelihood: str | None = None  # "bound" (ELBO, IWAE), "exact", or None (an autoencoder, a VQ model)

    @property
    def latents(self) -> str:
        """"discrete" for code grids, else "continuous": what renderers declare they draw (Renderer.kinds)."""
        return "discrete" if self.discrete else "continuous"


@dataclass(frozen=True)
class Slot:
    """A component a model needs, as the config field that selects it (model.<field>)."""

    family: str  # the component family, e.g. "encoder"
    form: str | None = None  # VECTOR or FEATURE_MAP for encoders and decoders
    required: bool = True
    default: dict | None = None  # the spec used when the field is left out, e.g. {"name": "standard-normal"}
    description: str = ""


@dataclass
class Objective:
    """A model's training objective for one batch: named scalar loss terms and stats.

    The engine's loss is sum_k weights[k] * term_k, with the model's `scheduled` term passed through
    train.beta's schedule first (beta * KL, or gamma * |KL - C|). Terms are logged unweighted.
    """

    terms: dict[str, torch.Tensor]  # scalar loss terms, e.g. reconstruction (nats per image), kl
    weights: dict[str, float] = field(default_factory=dict)  # per-term weight in the loss; 1 when left out
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars logged with the terms


class Model(Component, nn.Module):
    """A model kind (`model.kind` in the config): its options, the components it needs, its capabilities,
    its objective and its prior. Built-in kinds (vae, ae, dae, vqvae, vqvae2) register like any plugin.

    A subclass sets `name`, `Options` (its own fields under `model:`), `slots` (model.<field> -> Slot),
    `capabilities`, optionally `scheduled` (the loss term train.beta weights), and implements `build`,
    `forward` (-> Objective) and `reconstruct`, plus what its capabilities promise (metrics, renderers,
    the pyfunc model and vaeflow.core.codes rely on these; vaeflow.core.testing.check_model checks them):

    - every model: `likelihood` (a Likelihood);
    - continuous: `latent_dim`, `posterior(x)` (with `.mode()`, `.rsample()`), `decode(z)`, `interpolate`,
      `prior` (a LatentPrior); with sampling, `generate(n, generator, temperature)`;
    - log_likelihood "bound": `elbo_terms(x)` and `log_joint_terms(x, k)` (the IWAE bound);
    - discrete: `levels`, `grids`, `codebook_sizes`, `encode_codes(x)`, `decode_codes(codes)`, `codebook_hash()`,
      with `level_names`, `levels_of` and `condition_of` on the class.
    """

    FAMILY = "model"
    slots: ClassVar[dict[str, Slot]] = {}
    capabilities: ClassVar[Capabilities] = Capabilities()
    scheduled: ClassVar[str | None] = None  # the term the beta schedule applies to, e.g. "kl"
    level_names: ClassVar[tuple[str, ...]] = ()  # every code level this kind can have (discrete models)
    watch_only: ClassVar[tuple[str, ...]] = ()  # option paths (e.g. "vq.usage_warning") that never change the weights
    stages: ClassVar[tuple[str, ...]] = ()  # stage plugins (family "stage") this kind adds to the pipeline, after train

    @classmethod
    def levels_of(cls, options) -> tuple[str, ...]:
        """The code levels a model with these options has, in sampling order (discrete models)."""
        return ()

    @classmethod
    def condition_of(cls, level: str) -> str | None:
        """The level whose codes condition this level's prior (None: unconditional)."""
        return None

    @classmethod
    def build(cls, options, make, shape: Shape, config) -> "Model":  # pragma: no cover - interface
        """Instantiate from the validated `model:` section (`options`), the data shape (C, H, W) and the
        whole config; `make(field, *args)` builds the component of a slot with the shapes the model gives it."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live (CPU for a parameter-free model)."""
        first = next(self.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def kind(self) -> str:
        """The registered kind of this model (model.kind)."""
        return self.name

    def state_hash(self) -> str:
        """sha256 over every tensor of the state dict (CPU bytes, sorted by name): this exact trained model."""
        digest = hashlib.sha256()
        for name, value in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest_tensor(digest, value)
        return digest.hexdigest()

    def forward(self, x: torch.Tensor) -> Objective:  # pragma: no cover - interface
        """The training objective on a batch x (B, C, H, W)."""
        raise NotImplementedError

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """E[x | the latents or codes of x]: (B, C, H, W)."""
        raise NotImplementedError

    def health_warnings(self, record: dict) -> dict[str, str]:
        """{topic: message} about the model's health from a training record (e.g. a collapsing codebook)."""
        return {}

    def check_shapes(self, shape: Shape) -> None:
        """Raise a ConfigError naming the component at fault when a 2-image pass gives a wrong shape."""


@dataclass
class StageContext:
    """What a stage's `run` gets from the pipeline: the config, its output folder, its MLflow run and loggers.

    The pipeline (vaeflow.pipelines.pipeline) fills the callables in; a stage never imports MLflow or Prefect itself."""

    cfg: Any  # the run's vaeflow.core.config.Config, as the stage runs it (no progress bar on a worker)
    folder: Path  # workspace/<stage folder>/<key digest>: the stage writes its outputs here, atomically
    log: Any  # a logging.Logger whose lines show in the Prefect UI
    run_id: str  # the stage's MLflow run
    client: Any  # the MlflowClient of this store (for what the callables below do not cover)
    log_metrics: Callable[..., None]  # ({name: number}, step=0) onto the stage's MLflow run
    log_params: Callable[[dict], None]  # {name: value} onto the stage's MLflow run
    log_artifact: Callable[..., None]  # (path, artifact_path=None): a file or a folder onto the stage's MLflow run
    callbacks: Callable[[int], list]  # engine callbacks for a training loop of N epochs: MLflow metrics, Prefect log
    fresh: bool = False  # `--force`: the folder was emptied; compute everything again


class Stage(Component):
    """A pipeline stage (family "stage"): what it reads, what its cache key covers, and how it runs.

    The pipeline is a graph of stages: the common ones (prepare_data, train, train_features, evaluate, render,
    register) and those a model kind names in `Model.stages`, inserted after train. A stage runs as one Prefect
    task and one MLflow run, under a lock on its key. Its key covers its id, the config `sections` it reads,
    `key_parts`, the identity (`Stage.identity`) of each input's result, and the code of the plugins of the `code`
    sections and of the stage itself; an unchanged key is a cache hit. A stage may be expanded into one instance
    per `param` (e.g. train_prior per code level), named `<name>_<param>`; an input naming the stage then gets
    {param: result}. The input `train` is the trained model: train's result, or, after a stage with
    `provides = "model"` (one that refines the model, e.g. fits an ex-post prior into it), that stage's result,
    which has train's keys (run_dir: a folder load_model reads, weights_sha256, sha256).

    `run` returns a JSON-able dict: `sha256` (the identity of what it produced, which dependants' keys use),
    `files` (paths that must still exist for a cache hit to stand) and anything its dependants read."""

    FAMILY = "stage"
    inputs: ClassVar[tuple[str, ...]] = ()  # stages whose results run() gets, by name
    optional: ClassVar[tuple[str, ...]] = ()  # inputs taken only when the graph has them (another kind's stages)
    sections: ClassVar[tuple[str, ...]] = ()  # config sections whose values are in the key
    reads: ClassVar[tuple[str, ...]] = ()  # config sections (or dotted sub-sections) key_parts reads, in part
    code: ClassVar[tuple[str, ...]] = ()  # config sections whose plugins' code and versions are in the key
    folder: ClassVar[str | None] = None  # the workspace sub-folder of its outputs (default: the name)
    heavy: ClassVar[bool] = True  # trains or scans the data: runs in the foreground; False: beside the next stages
    provides: ClassVar[str | None] = None  # "model": its result is a trained model's run dir, like train's
    retries: ClassVar[int] = 0  # retries after a failure that is not a user error

    def __init__(self, param: str | None = None):
        self.param = param

    @property
    def id(self) -> str:
        """The instance's name in the graph: `name`, or `name_param` for an expanded stage."""
        return f"{self.name}_{self.param}" if self.param else self.name

    @classmethod
    def expand(cls, cfg) -> list["Stage"]:
        """The instances of this stage for a config: one by default, or one per level, per fold, ..."""
        return [cls()]

    @classmethod
    def check(cls, cfg, source: str) -> None:
        """Raise vaeflow.core.errors.ConfigError when the config cannot run this stage (before any run starts)."""

    @classmethod
    def skipped(cls, cfg) -> str | None:
        """Why this stage does nothing for this config (e.g. a dataset without labels), or None: it runs. A skipped
        stage's dependants get {"enabled": False, "reason": ...} as its result."""
        return None

    def key_parts(self, cfg, inputs: dict) -> list:
        """What else the cache key covers besides the sections, the inputs' identities and the code."""
        return []

    @staticmethod
    def identity(result: dict):
        """What a dependant's key records of this stage's result."""
        return result.get("sha256")

    def run(self, ctx: StageContext, inputs: dict) -> dict:  # pragma: no cover - interface
        """Compute the stage's outputs into ctx.folder and return its result (see the class docstring)."""
        raise NotImplementedError

    def summary(self, result: dict) -> dict:
        """What the pipeline's result shows of this stage, e.g. {"run_dir": ...}; expanded instances' dicts merge."""
        return {}


@dataclass
class MetricContext:
    """What a metric gets: the model in eval mode, the test split, the eval section and the known factors."""

    model: nn.Module  # a vaeflow.core.interfaces.Model
    images: torch.Tensor  # test images (N, C, H, W) in [0, 1] (cut to eval.max_examples), on the CPU
    config: Any  # vaeflow.core.config.EvalConfig
    factors: torch.Tensor | None = None  # known generative factors (N, K) of the images, if the dataset has them
    factor_names: tuple = ()
    factor_discrete: tuple = ()


class Metric(Component):
    """An evaluation metric (family "metric"): what it needs of a model, and which of its keys are headlines.

    `needs` names Capabilities fields that must be truthy (e.g. ("continuous",), ("log_likelihood",)); evaluate
    runs every registered metric whose needs the model meets and merges the dicts their `compute` returns.
    `headline` keys are printed by evaluate and the CLI; `params` keys are counts or settings, logged as MLflow
    params rather than metrics."""

    FAMILY = "metric"
    needs: ClassVar[tuple[str, ...]] = ()
    headline: ClassVar[tuple[str, ...]] = ()
    params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Options | None = None):
        self.options = options if options is not None else self.Options()

    @classmethod
    def applies(cls, capabilities: Capabilities) -> bool:
        """Whether a model with these capabilities has what this metric needs."""
        return all(getattr(capabilities, need) for need in cls.needs)

    def compute(self, ctx: MetricContext) -> dict:  # pragma: no cover - interface
        """{key: number or list} over ctx.images."""
        raise NotImplementedError


FAMILIES: dict[str, type[Component]] = {
    cls.FAMILY: cls for cls in (Encoder, Decoder, Quantizer, Likelihood, Prior, Dataset, Noise, Renderer,
                                LatentPrior, Model, Schedule, Stage, Metric)
}
HOOKS: dict[str, str] = {  # family -> hook name in vaeflow.core.hookspecs
    "encoder": "register_encoders",
    "decoder": "register_decoders",
    "quantizer": "register_quantizers",
    "likelihood": "register_likelihoods",
    "prior": "register_priors",
    "dataset": "register_datasets",
    "noise": "register_noises",
    "renderer": "register_renderers",
    "latent_prior": "register_latent_priors",
    "model": "register_models",
    "schedule": "register_schedules",
    "stage": "register_stages",
    "metric": "register_metrics",
}
TAGS: dict[str, str] = {"model": "kind", "schedule": "schedule"}  # the config key that selects a plugin, if not `name`
