"""Built-in model kinds, registered through `register_models` like any third-party model.

- vae: Kingma & Welling 2014, "Auto-Encoding Variational Bayes" (arXiv:1312.6114): a diagonal Gaussian
  posterior q(z|x), a continuous prior p(z) (model.prior, N(0, I) by default), loss -log p(x|z) + beta * KL;
- ae, dae: the plain and the denoising autoencoder (Vincent et al. 2008): a point posterior, loss -log p(x|z);
- vqvae: van den Oord et al. 2017, "Neural Discrete Representation Learning" (arXiv:1711.00937);
- vqvae2: Razavi et al. 2019, "Generating Diverse High-Fidelity Images with VQ-VAE-2" (arXiv:1906.00446).

VQ-VAE-2, for a 32x32 input with strides [4, 2]:

    x (B, C, 32, 32) -> bottom encoder (stride 4) -> h_b (B, F, 8, 8)
    h_b -> top encoder (stride 2) -> h_t (B, F, 4, 4) -> 1x1 -> top quantizer -> e_t (B, D, 4, 4)
    e_t -> top decoder (stride 2) -> (B, D, 8, 8), joined to h_b -> 1x1 -> bottom quantizer -> e_b (B, D, 8, 8)
    [upsample(e_t), e_b] (B, 2D, 8, 8) -> decoder (stride 4) -> likelihood parameters (B, P, 32, 32)

Levels are named top first: ("top", "bottom"); a one-level VQ-VAE has the single level "top", whose prior is
unconditional. Grid sizes follow from the input size and the strides.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Annotated, ClassVar, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from vaeflow.core.bounds import MAX_LATENT, MAX_SIDE, MAX_WIDTH
from vaeflow.core.codes import eval_mode
from vaeflow.core.distributions import DiagonalGaussian, PointPosterior
from vaeflow.core.errors import ConfigError
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import (
    FEATURE_MAP, VECTOR, Capabilities, Model, Objective, Options, QuantizerOutput, Shape, Slot,
)

STANDARD_NORMAL = {"name": "standard-normal"}


# --- continuous latents: vae, ae, dae -------------------------------------------------------------
class ContinuousOptions(Options):
    """Options of a model with a latent vector."""

    latent_dim: int = Field(gt=0, le=MAX_LATENT, description="J, the number of latent dimensions")


CONTINUOUS_SLOTS = {
    "encoder": Slot("encoder", VECTOR, description="x -> posterior parameters (B, 2J) for a vae, (B, J) otherwise"),
    "decoder": Slot("decoder", VECTOR, description="z (B, J) -> likelihood parameters"),
    "likelihood": Slot("likelihood", description="p(x|z) on the pixels"),
    "prior": Slot("latent_prior", required=False, default=STANDARD_NORMAL,
                  description="p(z): the KL, the samples and the IWAE bound use it"),
}


class VAE(Model):
    """A variational autoencoder: loss -log p(x|z) + beta * KL(q(z|x) || p(z)), z drawn by reparameterization."""

    name = "vae"
    Options = ContinuousOptions
    slots = CONTINUOUS_SLOTS
    capabilities = Capabilities(continuous=True, sampling=True, log_likelihood="bound")
    scheduled = "kl"
    variational: ClassVar[bool] = True  # q(z|x) is a distribution and the ELBO is defined

    def __init__(self, encoder, decoder, likelihood, prior, latent_dim: int, noise=None):
        super().__init__()
        self.encoder, self.decoder, self.likelihood, self.prior = encoder, decoder, likelihood, prior
        self.latent_dim, self.noise = latent_dim, noise
        if prior is not None:
            prior.bind(self)  # a prior defined through q(z|x) (the VampPrior) reaches the encoder and data shape

    @classmethod
    def build(cls, options, make, shape: Shape, config) -> "VAE":
        """Encoder to 2J (mean, log-variance) or J outputs, decoder from J, likelihood on the data shape."""
        likelihood = make("likelihood", shape)
        param_shape = (likelihood.param_channels(shape[0]), shape[1], shape[2])
        j = options.latent_dim
        encoder = make("encoder", shape, 2 * j if cls.variational else j)
        decoder = make("decoder", j, param_shape)
        noise = make("noise") if "noise" in cls.slots else None
        model = cls(encoder, decoder, likelihood, make("prior", j), j, noise)
        model.param_shape = param_shape
        return model

    def posterior(self, x: torch.Tensor) -> DiagonalGaussian | PointPosterior:
        """q(z|x) for x (B, C, H, W)."""
        params = self.encoder(x)  # (B, 2J) for a VAE, (B, J) for an AE
        return DiagonalGaussian(params) if self.variational else PointPosterior(params)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, J) -> likelihood parameters (B, P, H, W)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> Objective:
        """One training pass: corrupt (dae), encode, sample z, decode, score the clean x."""
        return Objective(self.elbo_pass(x)[0])

    def elbo_pass(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], DiagonalGaussian | PointPosterior,
                                                   torch.Tensor]:
        """The training terms reconstruction (and kl), the posterior and its draw z (B, J): what a kind that adds a
        term to the VAE's objective (InfoVAE's MMD, FactorVAE's TC) builds on."""
        x_in = self.noise(x) if (self.noise is not None and self.training) else x
        q = self.posterior(x_in)
        z = q.rsample()  # (B, J)
        log_px = self.likelihood.log_prob(x, self.decode(z))  # (B,)
        terms = {"reconstruction": -log_px.mean()}  # nats per image
        if self.variational:
            terms["kl"] = self.prior.kl(q, z).mean()
        return terms, q, z

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z = mode of q(z|x)]: (B, C, H, W)."""
        return self.likelihood.mean(self.decode(self.posterior(x).mode()))

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """z ~ p(z) at temperature T (CPU-seeded), decoded to the likelihood mean: (n, C, H, W)."""
        z = self.prior.sample(n, generator, temperature).to(self.device)  # (n, J)
        return self.likelihood.mean(self.decode(z))

    @torch.no_grad()
    def interpolate(self, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Decode (1-t) z_a + t z_b for t in [0, 1], z the posterior modes: (B, steps, C, H, W)."""
        z_a, z_b = self.posterior(x_a).mode(), self.posterior(x_b).mode()  # (B, J)
        t = torch.linspace(0, 1, steps, device=z_a.device).view(1, steps, 1)  # (1, S, 1)
        z = torch.lerp(z_a.unsqueeze(1), z_b.unsqueeze(1), t)  # (B, S, J)
        images = self.likelihood.mean(self.decode(z.flatten(0, 1)))  # (B*S, C, H, W)
        return images.view(x_a.shape[0], steps, *images.shape[1:])

    @torch.no_grad()
    def elbo_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(log p(x|z) by one posterior sample (B,), KL (B,), KL per dimension (B, J) or None)."""
        q = self.posterior(x)
        z = q.rsample()  # (B, J)
        log_px = self.likelihood.log_prob(x, self.decode(z))  # (B,)
        kl_dims = self.prior.kl_per_dim(q)  # (B, J) or None
        return log_px, (kl_dims.sum(1) if kl_dims is not None else self.prior.kl(q, z)), kl_dims

    @torch.no_grad()
    def log_joint_terms(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """log p(x|z_i) + log p(z_i) - log q(z_i|x) for k posterior samples: (k, B), without gradients."""
        return self.log_weights(x, k)

    def log_weights(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The importance log-weights log p(x, z_i) - log q(z_i|x), z_i ~ q(z|x) reparameterized: (k, B)."""
        q = self.posterior(x)
        z = q.rsample(k)  # (k, B, J)
        params = self.decode(z.flatten(0, 1))  # (k*B, P, H, W)
        log_px = self.likelihood.log_prob_samples(x, params.view(k, x.shape[0], *params.shape[1:]))  # (k, B)
        return log_px + self.prior.log_prob(z) - q.log_prob(z)

    def check_shapes(self, shape: Shape) -> None:
        """Run a 2-image forward pass and check every output shape, naming the component at fault."""
        x = torch.zeros(2, *shape)
        with eval_mode(self), torch.no_grad():
            try:
                p = self.encoder(x)
            except RuntimeError as exc:
                raise ConfigError([("model.encoder", f"does not accept images of shape {shape}: {exc}")]) from None
            want = (2, self.encoder.out_features)
            if tuple(p.shape) != want:
                raise ConfigError([("model.encoder", f"returned {tuple(p.shape)}, expected {want}")])
            try:
                out = self.decoder(torch.zeros(2, self.latent_dim))
            except RuntimeError as exc:
                raise ConfigError([("model.decoder", f"cannot decode latent_dim={self.latent_dim}: {exc}")]) from None
            if tuple(out.shape) != (2, *self.param_shape):
                raise ConfigError([("model.decoder", f"returned {tuple(out.shape)}, but the likelihood needs "
                                    f"{(2, *self.param_shape)} for data of shape {shape}")])


class AE(VAE):
    """A plain autoencoder: z = encoder(x), loss -log p(x|z); samples decode z ~ p(z), which it never fitted."""

    name = "ae"
    capabilities = Capabilities(continuous=True, sampling=True, log_likelihood=None)
    scheduled = None
    variational = False


class DAE(AE):
    """A denoising autoencoder (Vincent et al. 2008): encodes a corrupted x~ (model.noise), scores the clean x."""

    name = "dae"
    slots = {**CONTINUOUS_SLOTS, "noise": Slot("noise", description="the input corruption, e.g. {name: gaussian, "
                                                                       "std: 0.3}")}


# --- discrete latents: vqvae, vqvae2 --------------------------------------------------------------
HEALTH_STATS = ("perplexity", "usage", "usage_ema", "dead_codes")


class VQOptions(Options):
    """The discrete-latent architecture: levels and widths."""

    embedding_dim: int = Field(64, gt=0, le=MAX_WIDTH, description="D, the width of each codebook vector")
    hidden_channels: int = Field(128, gt=0, le=MAX_WIDTH, description="width of the encoder feature maps")
    strides: Optional[list[Annotated[int, Field(gt=0, le=MAX_SIDE)]]] = Field(
        None, min_length=1, max_length=2,
        description="[bottom] or [bottom, top]: the bottom level's stride from the input, then the top's from the "
                    "bottom (null: [4] for vqvae, [4, 2] for vqvae2, as in Razavi et al. 2019)",
    )
    usage_warning: float = Field(0.2, ge=0, le=1, description="warn when a level's usage EMA falls below this fraction")


class VQModelOptions(Options):
    """Options of a VQ model: its architecture under model.vq."""

    LEVELS: ClassVar[int] = 1
    vq: VQOptions = Field(
        default_factory=VQOptions, title="VQ architecture", description="levels and widths of a VQ model")

    @model_validator(mode="after")
    def _level_count(self):
        levels = self.LEVELS
        if self.vq.strides is not None and len(self.vq.strides) != levels:
            raise ValueError(f"this model has {levels} level(s), so model.vq.strides needs {levels} "
                             f"entr{'y' if levels == 1 else 'ies'}, got {self.vq.strides}")
        return self


class VQ2ModelOptions(VQModelOptions):
    """Options of a two-level VQ model."""

    LEVELS: ClassVar[int] = 2


def vq_grids(shape: Shape, strides: list[int]) -> dict[str, tuple[int, int]]:
    """Code grid per level from the input size and the strides; a ConfigError when they do not divide."""
    _, height, width = shape
    names = ("top",) if len(strides) == 1 else ("bottom", "top")
    grids, total = {}, 1
    for name, stride in zip(names, strides):
        total *= stride
        if height % total or width % total:
            pad = ((max(height, width) + total - 1) // total) * total
            raise ConfigError([("model.vq.strides", f"{strides} give a total stride of {total} at the {name} level, "
                                f"which does not divide the {height}x{width} input; set data.pad_to: {pad} "
                                f"or use smaller strides")])
        grids[name] = (height // total, width // total)
    return {level: grids[level] for level in ("top", "bottom") if level in grids}


class VQVAE(Model):
    """A one-level VQ-VAE: a feature-map encoder, a codebook quantizer, a feature-map decoder; its samples come
    from an autoregressive prior trained on its codes."""

    name = "vqvae"
    Options = VQModelOptions
    slots = {
        "encoder": Slot("encoder", FEATURE_MAP, description="x -> a feature map at the level's stride"),
        "decoder": Slot("decoder", FEATURE_MAP, description="code vectors (B, D, h, w) -> likelihood parameters"),
        "likelihood": Slot("likelihood", description="p(x|codes) on the pixels"),
        "quantizer": Slot("quantizer", description="codebook quantizer, used at every level"),
    }
    capabilities = Capabilities(discrete=True, sampling=True, log_likelihood=None)
    level_names = ("top", "bottom")
    watch_only = ("vq.usage_warning",)  # only decides when to warn
    stages = ("extract_codes", "train_prior", "sample")  # plugins/stages.py: codes, a prior per level, samples

    def __init__(self, encoders: dict, decoder, quantizers: dict, likelihood, embedding_dim: int,
                 grids: dict[str, tuple[int, int]], top_decoder=None, usage_warning: float = 0.0):
        super().__init__()
        self.levels = tuple(quantizers)  # ("top",) or ("top", "bottom")
        self.encoders = nn.ModuleDict(encoders)  # level -> GridEncoder
        self.quantizers = nn.ModuleDict(quantizers)
        self.decoder, self.top_decoder, self.likelihood = decoder, top_decoder, likelihood
        self.grids, self.embedding_dim, self.usage_warning = grids, embedding_dim, usage_warning
        hidden = encoders["top"].out_features
        if len(self.levels) == 2:
            ratio = grids["bottom"][0] // grids["top"][0]
            self.pre_quantize = nn.ModuleDict({
                "top": nn.Conv2d(hidden, embedding_dim, 1),
                "bottom": nn.Conv2d(hidden + embedding_dim, embedding_dim, 1),
            })
            # the top codes upsampled to the bottom grid for the decoder (Razavi et al. 2019, fig. 2a)
            self.upsample_top = nn.ConvTranspose2d(embedding_dim, embedding_dim, 2 * ratio, stride=ratio,
                                                   padding=ratio // 2)
        else:
            self.pre_quantize = nn.ModuleDict({"top": nn.Conv2d(hidden, embedding_dim, 1)})

    @classmethod
    def levels_of(cls, options) -> tuple[str, ...]:
        """("top",) for one level, ("top", "bottom") for two: top first, the order priors are sampled in."""
        return ("top", "bottom")[: options.LEVELS]

    @classmethod
    def condition_of(cls, level: str) -> str | None:
        """The bottom prior is conditioned on the top codes; the top prior on nothing."""
        return "top" if level == "bottom" else None

    @classmethod
    def strides_of(cls, options) -> list[int]:
        """[bottom] or [bottom, top] strides, defaults filled in."""
        return options.vq.strides or ([4] if options.LEVELS == 1 else [4, 2])

    @classmethod
    def build(cls, options, make, shape: Shape, config) -> "VQVAE":
        """Encoders, decoders and quantizers per level, at the grids the strides give."""
        strides = cls.strides_of(options)
        grids = vq_grids(shape, strides)
        hidden, dim = options.vq.hidden_channels, options.vq.embedding_dim
        likelihood = make("likelihood", shape)
        param_shape = (likelihood.param_channels(shape[0]), shape[1], shape[2])
        if options.LEVELS == 1:
            encoders = {"top": make("encoder", shape, hidden, strides[0])}
            decoder = make("decoder", dim, param_shape, strides[0])
            quantizers = {"top": make("quantizer", dim)}
            top_decoder = None
        else:
            hb, wb = grids["bottom"]
            encoders = {"bottom": make("encoder", shape, hidden, strides[0]),
                        "top": make("encoder", (hidden, hb, wb), hidden, strides[1])}
            top_decoder = make("decoder", dim, (dim, hb, wb), strides[1])
            decoder = make("decoder", 2 * dim, param_shape, strides[0])
            quantizers = {"top": make("quantizer", dim), "bottom": make("quantizer", dim)}
        model = cls(encoders, decoder, quantizers, likelihood, dim, grids, top_decoder,
                    options.vq.usage_warning)
        model.param_shape = param_shape
        return model

    @property
    def codebook_sizes(self) -> dict[str, int]:
        """K per level."""
        return {level: self.quantizers[level].codebook_size for level in self.levels}

    def quantize(self, x: torch.Tensor) -> dict[str, QuantizerOutput]:
        """Encode and quantize x (B, C, H, W) at every level, top first."""
        if len(self.levels) == 1:
            return {"top": self.quantizers["top"](self.pre_quantize["top"](self.encoders["top"](x)))}
        h_bottom = self.encoders["bottom"](x)  # (B, F, hb, wb)
        h_top = self.encoders["top"](h_bottom)  # (B, F, ht, wt)
        top = self.quantizers["top"](self.pre_quantize["top"](h_top))  # quantized (B, D, ht, wt)
        joined = torch.cat([self.top_decoder(top.quantized), h_bottom], dim=1)  # (B, D + F, hb, wb)
        bottom = self.quantizers["bottom"](self.pre_quantize["bottom"](joined))  # quantized (B, D, hb, wb)
        return {"top": top, "bottom": bottom}

    def decode_quantized(self, quantized: dict[str, torch.Tensor]) -> torch.Tensor:
        """Code vectors per level -> likelihood parameters (B, P, H, W)."""
        if len(self.levels) == 1:
            return self.decoder(quantized["top"])
        joined = torch.cat([self.upsample_top(quantized["top"]), quantized["bottom"]], dim=1)  # (B, 2D, hb, wb)
        return self.decoder(joined)

    def decode_codes(self, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        """Code indices per level (B, h, w) -> likelihood parameters (B, P, H, W)."""
        return self.decode_quantized({level: self.quantizers[level].lookup(codes[level]) for level in self.levels})

    def forward(self, x: torch.Tensor) -> Objective:
        """Reconstruction per image, plus each level's VQ losses (already weighted) and codebook health."""
        outs = self.quantize(x)
        params = self.decode_quantized({level: out.quantized for level, out in outs.items()})  # (B, P, H, W)
        terms = {"reconstruction": -self.likelihood.log_prob(x, params).mean()}  # nats per image
        terms.update({f"{level}/{name}": value for level, out in outs.items() for name, value in out.losses.items()})
        stats = {f"{level}/{name}": out.stats[name] for level, out in outs.items() for name in HEALTH_STATS
                 if name in out.stats}
        # The paper's scale: reconstruction per dimension, so the commitment beta means what it means there.
        return Objective(terms, weights={"reconstruction": 1.0 / x[0].numel()}, stats=stats)

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Code indices per level: x (B, C, H, W) -> {level: (B, h, w) int64}; never updates the codebooks."""
        with eval_mode(self):
            return {level: out.indices for level, out in self.quantize(x).items()}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | codes of x]: (B, C, H, W); never updates the codebooks."""
        with eval_mode(self):
            outs = self.quantize(x)
            return self.likelihood.mean(self.decode_quantized({level: o.quantized for level, o in outs.items()}))

    def codebook_hash(self) -> str:
        """sha256 over every level's codebook (K, D) as float32 bytes: the code space priors are trained on.

        Computed from a CPU copy of each quantizer, so any normalisation in `codebook` gives the same
        bytes whichever device the model sits on."""
        digest = hashlib.sha256()
        for level in self.levels:
            book = copy.deepcopy(self.quantizers[level]).cpu().float().codebook.detach().contiguous()  # (K, D)
            digest.update(level.encode() + str(tuple(book.shape)).encode() + book.numpy().tobytes())
        return digest.hexdigest()

    def health_warnings(self, record: dict) -> dict[str, str]:
        """{topic: message} for levels whose usage EMA fell below the configured fraction."""
        out = {}
        for level in self.levels:
            usage = record.get(f"{level}/usage_ema")
            if usage is not None and usage < self.usage_warning:
                out[f"{level}/usage"] = (
                    f"codebook usage of the {level} level is {usage:.1%} of {self.quantizers[level].codebook_size} "
                    f"codes (below model.vq.usage_warning={self.usage_warning:.0%}): the codebook is collapsing; "
                    f"consider kmeans_init, restart_after, or a smaller codebook_size")
        return out

    def check_shapes(self, shape: Shape) -> None:
        """A 2-image forward pass in eval mode; a wrong grid or output shape names the component at fault."""
        with eval_mode(self), torch.no_grad():
            try:
                outs = self.quantize(torch.zeros(2, *shape))
                params = self.decode_quantized({level: o.quantized for level, o in outs.items()})
            except RuntimeError as exc:
                raise ConfigError([("model", f"the {self.kind} does not fit images of shape {shape}: {exc}")]) from None
        for level, out in outs.items():
            if tuple(out.indices.shape) != (2, *self.grids[level]):
                raise ConfigError([("model.quantizer", f"the {level} codes have shape {tuple(out.indices.shape[1:])}, "
                                    f"expected the grid {self.grids[level]}")])
        if tuple(params.shape) != (2, *self.param_shape):
            raise ConfigError([("model.decoder", f"returned {tuple(params.shape)}, but the likelihood needs "
                                f"{(2, *self.param_shape)}")])


class VQVAE2(VQVAE):
    """A two-level VQ-VAE-2: top and bottom codes, the bottom prior conditioned on the top codes."""

    name = "vqvae2"
    Options = VQ2ModelOptions


@hookimpl
def register_models(register):
    """Register the built-in model kinds."""
    for cls in (VAE, AE, DAE, VQVAE, VQVAE2):
        register(cls)
