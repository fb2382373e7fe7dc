"""Discrete-latent models: VQ-VAE (van den Oord et al. 2017) and VQ-VAE-2 (Razavi et al. 2019), from plugins.

VQ-VAE-2, for a 32x32 input with strides [4, 2]:

    x (B, C, 32, 32) -> bottom encoder (stride 4) -> h_b (B, F, 8, 8)
    h_b -> top encoder (stride 2) -> h_t (B, F, 4, 4) -> 1x1 -> top quantizer -> e_t (B, D, 4, 4)
    e_t -> top decoder (stride 2) -> (B, D, 8, 8), joined to h_b -> 1x1 -> bottom quantizer -> e_b (B, D, 8, 8)
    [upsample(e_t), e_b] (B, 2D, 8, 8) -> decoder (stride 4) -> likelihood parameters (B, P, 32, 32)

Levels are named top first: ("top", "bottom"); a one-level VQ-VAE has the single level "top",
whose prior is unconditional. Grid sizes follow from the input size and the strides.
"""

from __future__ import annotations

import copy
import hashlib
from contextlib import contextmanager

import torch
from torch import nn

from core.config import VQ_KINDS, Config
from core.errors import ConfigError
from core.interfaces import GridDecoder, GridEncoder, Likelihood, Quantizer, QuantizerOutput, Shape
from core.model import ModelOutput, component_options
from core.registry import Registry, get_registry

HEALTH_STATS = ("perplexity", "usage", "usage_ema", "dead_codes")


class VQVAE(nn.Module):
    """A one-level VQ-VAE or a two-level VQ-VAE-2 with a likelihood on the pixels."""

    variational = False

    def __init__(self, kind: str, encoders: dict[str, GridEncoder], decoder: GridDecoder,
                 quantizers: dict[str, Quantizer], likelihood: Likelihood, embedding_dim: int,
                 grids: dict[str, tuple[int, int]], top_decoder: GridDecoder | None = None,
                 usage_warning: float = 0.0):
        super().__init__()
        self.kind, self.levels = kind, tuple(quantizers)  # ("top",) or ("top", "bottom")
        self.encoders = nn.ModuleDict(encoders)  # level -> GridEncoder
        self.quantizers = nn.ModuleDict(quantizers)
        self.decoder, self.top_decoder, self.likelihood = decoder, top_decoder, likelihood
        self.grids, self.embedding_dim, self.usage_warning = grids, embedding_dim, usage_warning
        hidden = encoders["top"].out_features
        if kind == "vqvae2":
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

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live."""
        return next(self.parameters()).device

    @property
    def codebook_sizes(self) -> dict[str, int]:
        """K per level."""
        return {level: self.quantizers[level].codebook_size for level in self.levels}

    def quantize(self, x: torch.Tensor) -> dict[str, QuantizerOutput]:
        """Encode and quantize x (B, C, H, W) at every level, top first."""
        if self.kind == "vqvae":
            return {"top": self.quantizers["top"](self.pre_quantize["top"](self.encoders["top"](x)))}
        h_bottom = self.encoders["bottom"](x)  # (B, F, hb, wb)
        h_top = self.encoders["top"](h_bottom)  # (B, F, ht, wt)
        top = self.quantizers["top"](self.pre_quantize["top"](h_top))  # quantized (B, D, ht, wt)
        joined = torch.cat([self.top_decoder(top.quantized), h_bottom], dim=1)  # (B, D + F, hb, wb)
        bottom = self.quantizers["bottom"](self.pre_quantize["bottom"](joined))  # quantized (B, D, hb, wb)
        return {"top": top, "bottom": bottom}

    def decode_quantized(self, quantized: dict[str, torch.Tensor]) -> torch.Tensor:
        """Code vectors per level -> likelihood parameters (B, P, H, W)."""
        if self.kind == "vqvae":
            return self.decoder(quantized["top"])
        joined = torch.cat([self.upsample_top(quantized["top"]), quantized["bottom"]], dim=1)  # (B, 2D, hb, wb)
        return self.decoder(joined)

    def decode_codes(self, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        """Code indices per level (B, h, w) -> likelihood parameters (B, P, H, W)."""
        return self.decode_quantized({level: self.quantizers[level].lookup(codes[level]) for level in self.levels})

    def forward(self, x: torch.Tensor) -> ModelOutput:
        """Reconstruction log-likelihood per image, plus each level's VQ losses and codebook health."""
        outs = self.quantize(x)
        params = self.decode_quantized({level: out.quantized for level, out in outs.items()})  # (B, P, H, W)
        log_likelihood = self.likelihood.log_prob(x, params)  # (B,)
        losses = {f"{level}/{name}": value for level, out in outs.items() for name, value in out.losses.items()}
        stats = {f"{level}/{name}": out.stats[name] for level, out in outs.items() for name in HEALTH_STATS
                 if name in out.stats}
        # The paper's scale: reconstruction per dimension, so the commitment beta means what it means there.
        return ModelOutput(log_likelihood, torch.zeros_like(log_likelihood), params, losses=losses, stats=stats,
                           reconstruction_weight=1.0 / x[0].numel())

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Code indices per level: x (B, C, H, W) -> {level: (B, h, w) int64}; never updates the codebooks."""
        with _eval_mode(self):
            return {level: out.indices for level, out in self.quantize(x).items()}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | codes of x]: (B, C, H, W); never updates the codebooks."""
        with _eval_mode(self):
            outs = self.quantize(x)
            return self.likelihood.mean(self.decode_quantized({level: o.quantized for level, o in outs.items()}))

    def generate(self, *args, **kwargs):
        """A VQ model has no Gaussian prior: sampling needs its trained code priors (core.vq.sample_images)."""
        raise ConfigError([("model.kind", f"a {self.kind} samples from its trained code priors, not from N(0, I); "
                            "use a registered model with its priors (`vaeflow generate --model models:/NAME@champion`)"
                            " or pass --prior for each level")])

    def interpolate(self, *args, **kwargs):
        """Interpolation of a VQ model goes through its code space, not a Gaussian latent: not available here."""
        raise ConfigError([("model.kind", f"a {self.kind} has discrete codes, so there is no latent line to walk; "
                            "use `vaeflow generate` with its priors, or `vaeflow evaluate` for reconstructions")])

    def codebook_hash(self) -> str:
        """sha256 over every level's codebook (K, D) as float32 bytes: the code space priors are trained on.

        Computed from a CPU copy of each quantizer, so any normalisation in `codebook` gives the same
        bytes whichever device the model sits on."""
        digest = hashlib.sha256()
        for level in self.levels:
            book = copy.deepcopy(self.quantizers[level]).cpu().float().codebook.detach().contiguous()  # (K, D)
            digest.update(level.encode() + str(tuple(book.shape)).encode() + book.numpy().tobytes())
        return digest.hexdigest()

    def state_hash(self) -> str:
        """sha256 over every tensor of the state dict (CPU bytes, sorted by name): this exact stage-1 model."""
        digest = hashlib.sha256()
        for name, value in sorted(self.state_dict().items()):
            value = value.detach().cpu().contiguous()
            digest.update(name.encode() + str(value.dtype).encode() + str(tuple(value.shape)).encode())
            digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
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


@contextmanager
def _eval_mode(module: nn.Module):
    """Eval mode inside the block, the previous mode after it."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


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


def build_vq_model(cfg: Config, shape: Shape, registry: Registry | None = None) -> VQVAE:
    """Instantiate a VQ-VAE or VQ-VAE-2 from the config's encoder, decoder, quantizer and likelihood plugins."""
    registry = registry or get_registry()
    m = cfg.model
    assert m.kind in VQ_KINDS
    if cfg.train.beta.schedule != "constant":
        raise ConfigError([("train.beta", f"a {m.kind} has no KL term, so beta schedules do not apply; remove train.beta")])
    grids = vq_grids(shape, m.strides)
    hidden, dim = m.vq.hidden_channels, m.vq.embedding_dim

    def make(field: str, base: type, *args):
        spec = getattr(m, field)
        cls = registry.get(field, spec.name).cls
        if not issubclass(cls, base):
            grid = [n for n in registry.names(field) if issubclass(registry.get(field, n).cls, base)]
            raise ConfigError([(f"model.{field}", f"{spec.name!r} maps to a vector, but kind={m.kind} needs a "
                                f"feature-map {field}; choose one of: {', '.join(grid) or 'none installed'}")])
        try:
            return cls(component_options(cls, spec), *args)
        except (ValueError, RuntimeError) as exc:
            raise ConfigError([(f"model.{field}", f"{spec.name}: {exc}")]) from None

    likelihood = make("likelihood", Likelihood, shape)
    param_shape = (likelihood.param_channels(shape[0]), shape[1], shape[2])
    if m.kind == "vqvae":
        encoders = {"top": make("encoder", GridEncoder, shape, hidden, m.strides[0])}
        decoder = make("decoder", GridDecoder, dim, param_shape, m.strides[0])
        quantizers = {"top": make("quantizer", Quantizer, dim)}
        top_decoder = None
    else:
        hb, wb = grids["bottom"]
        encoders = {"bottom": make("encoder", GridEncoder, shape, hidden, m.strides[0]),
                    "top": make("encoder", GridEncoder, (hidden, hb, wb), hidden, m.strides[1])}
        top_decoder = make("decoder", GridDecoder, dim, (dim, hb, wb), m.strides[1])
        decoder = make("decoder", GridDecoder, 2 * dim, param_shape, m.strides[0])
        quantizers = {"top": make("quantizer", Quantizer, dim), "bottom": make("quantizer", Quantizer, dim)}
    model = VQVAE(m.kind, encoders, decoder, quantizers, likelihood, dim, grids, top_decoder, m.vq.usage_warning)
    _check_shapes(model, shape, param_shape)
    return model


def _check_shapes(model: VQVAE, shape: Shape, param_shape: Shape) -> None:
    """A 2-image forward pass in eval mode; a wrong grid or output shape names the component at fault."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                outs = model.quantize(torch.zeros(2, *shape))
                params = model.decode_quantized({level: o.quantized for level, o in outs.items()})
            except RuntimeError as exc:
                raise ConfigError([("model", f"the {model.kind} does not fit images of shape {shape}: {exc}")]) from None
        for level, out in outs.items():
            if tuple(out.indices.shape) != (2, *model.grids[level]):
                raise ConfigError([("model.quantizer", f"the {level} codes have shape {tuple(out.indices.shape[1:])}, "
                                    f"expected the grid {model.grids[level]}")])
        if tuple(params.shape) != (2, *param_shape):
            raise ConfigError([("model.decoder", f"returned {tuple(params.shape)}, but the likelihood needs "
                                f"{(2, *param_shape)}")])
    finally:
        model.train(was_training)


@torch.no_grad()
def sample_codes(priors: dict, n: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Ancestral sampling, top then bottom conditioned on the top: {level: (n, h, w)}; same seed, same codes."""
    generator = torch.Generator().manual_seed(seed)
    codes = {"top": priors["top"].sample(n, None, temperature, top_k, generator)}
    if "bottom" in priors:
        codes["bottom"] = priors["bottom"].sample(n, codes["top"], temperature, top_k, generator)
    return codes


@torch.no_grad()
def sample_images(model: VQVAE, priors: dict, n: int, temperature: float = 1.0, top_k: int | None = None,
                  seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """Codes from the priors, decoded to the likelihood mean: (n, C, H, W)."""
    missing = [level for level in model.levels if level not in priors]
    if missing:
        raise ConfigError([("prior", f"the {model.kind} needs a prior for every level; missing: {', '.join(missing)}")])
    codes = sample_codes(priors, n, temperature, top_k, seed)
    images = [model.likelihood.mean(model.decode_codes({k: v[i:i + batch_size] for k, v in codes.items()}))
              for i in range(0, n, batch_size)]
    return torch.cat(images)
