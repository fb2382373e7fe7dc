"""The continuous-latent model: encoder -> posterior -> decoder -> likelihood, assembled from plugins."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from core.config import VQ_KINDS, Config
from core.distributions import DiagonalGaussian, PointPosterior, standard_normal_log_prob
from core.errors import ConfigError
from core.interfaces import Decoder, Encoder, Likelihood, Noise, Shape
from core.registry import Registry, get_registry


@dataclass
class ModelOutput:
    """Per-example terms of one forward pass, each (B,)."""

    log_likelihood: torch.Tensor  # log p(x | z), z ~ q(z|x)
    kl: torch.Tensor  # KL(q(z|x) || p(z)), closed form
    params: torch.Tensor  # likelihood parameters (B, P, H, W)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # further weighted scalar terms (VQ losses)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars logged with the losses
    reconstruction_weight: float = 1.0  # weight of -log p(x|z) in the training loss (1/dims for VQ models)


class VAE(nn.Module):
    """A VAE (Kingma & Welling 2014), or with kind ae/dae a plain or denoising autoencoder."""

    def __init__(
        self, encoder: Encoder, decoder: Decoder, likelihood: Likelihood, latent_dim: int,
        kind: str = "vae", noise: Noise | None = None,
    ):
        super().__init__()
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.latent_dim, self.kind, self.noise = latent_dim, kind, noise

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live (CPU for a parameter-free model)."""
        first = next(self.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def variational(self) -> bool:
        """True when q(z|x) is a distribution and the ELBO is defined."""
        return self.kind == "vae"

    def posterior(self, x: torch.Tensor) -> DiagonalGaussian | PointPosterior:
        """q(z|x) for x (B, C, H, W)."""
        params = self.encoder(x)  # (B, 2J) for a VAE, (B, J) for an AE
        return DiagonalGaussian(params) if self.variational else PointPosterior(params)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, J) -> likelihood parameters (B, P, H, W)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        """One training pass: corrupt (dae), encode, sample z, decode, score the clean x."""
        x_in = self.noise(x) if (self.noise is not None and self.training) else x
        q = self.posterior(x_in)
        params = self.decode(q.rsample())  # (B, P, H, W)
        return ModelOutput(self.likelihood.log_prob(x, params), q.kl(), params)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z = mode of q(z|x)]: (B, C, H, W)."""
        return self.likelihood.mean(self.decode(self.posterior(x).mode()))

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Option 1: z ~ N(0, T^2 I), decoded to the likelihood mean: (n, C, H, W)."""
        z = temperature * torch.randn(n, self.latent_dim, generator=generator).to(self.device)  # (n, J), CPU-seeded
        return self.likelihood.mean(self.decode(z))

    @torch.no_grad()
    def interpolate(self, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Option 2: decode (1-t) z_a + t z_b for t in [0, 1], z the posterior modes: (B, steps, C, H, W)."""
        z_a, z_b = self.posterior(x_a).mode(), self.posterior(x_b).mode()  # (B, J)
        t = torch.linspace(0, 1, steps, device=z_a.device).view(1, steps, 1)  # (1, S, 1)
        z = torch.lerp(z_a.unsqueeze(1), z_b.unsqueeze(1), t)  # (B, S, J)
        images = self.likelihood.mean(self.decode(z.flatten(0, 1)))  # (B*S, C, H, W)
        return images.view(x_a.shape[0], steps, *images.shape[1:])

    @torch.no_grad()
    def log_joint_terms(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """log p(x|z_i) + log p(z_i) - log q(z_i|x) for k posterior samples: (k, B)."""
        q = self.posterior(x)
        z = q.rsample(k)  # (k, B, J)
        params = self.decode(z.flatten(0, 1))  # (k*B, P, H, W)
        x_rep = x.expand(k, *x.shape).flatten(0, 1)  # (k*B, C, H, W)
        log_px = self.likelihood.log_prob(x_rep, params).view(k, -1)  # (k, B)
        return log_px + standard_normal_log_prob(z) - q.log_prob(z)


def data_shape(cfg: Config, registry: Registry | None = None) -> Shape:
    """(C, H, W) the model sees: the dataset's shape after data.pad_to."""
    registry = registry or get_registry()
    ds = registry.get("dataset", cfg.data.dataset.name).cls
    shape = ds(component_options(ds, cfg.data.dataset)).shape
    if cfg.data.pad_to is not None:
        c, h, w = shape
        if cfg.data.pad_to < max(h, w):
            raise ConfigError([("data.pad_to", f"{cfg.data.pad_to} is smaller than the images ({h}x{w})")])
        shape = (c, cfg.data.pad_to, cfg.data.pad_to)
    return shape


def component_options(cls: type, spec) -> object:
    """The plugin's own Options instance from a validated config spec (drops the `name` tag)."""
    return cls.Options.model_validate(spec.model_dump(exclude={"name"}))


def build_model(cfg: Config, shape: Shape | None = None, registry: Registry | None = None):
    """Instantiate the model the config describes (a VAE, or a VQ model via core.vq); shape errors are ConfigErrors."""
    registry = registry or get_registry()
    shape = shape or data_shape(cfg, registry)
    m = cfg.model
    if m.kind in VQ_KINDS:
        from core.vq import build_vq_model  # core.vq builds on this module

        return build_vq_model(cfg, shape, registry)
    if m.kind == "dae" and m.noise is None:
        raise ConfigError([("model.noise", "kind=dae needs a noise plugin, e.g. {name: gaussian, std: 0.3}")])
    if m.kind != "dae" and m.noise is not None:
        raise ConfigError([("model.noise", f"noise only applies to kind=dae, but kind={m.kind}")])

    def make(field: str, *args):
        spec = getattr(m, field)
        cls = registry.get(field, spec.name).cls
        try:
            return cls(component_options(cls, spec), *args)
        except (ValueError, RuntimeError) as exc:
            raise ConfigError([(f"model.{field}", f"{spec.name}: {exc}")]) from None

    likelihood = make("likelihood", shape)
    param_shape = (likelihood.param_channels(shape[0]), shape[1], shape[2])
    encoder = make("encoder", shape, 2 * m.latent_dim if m.kind == "vae" else m.latent_dim)
    decoder = make("decoder", m.latent_dim, param_shape)
    noise = None
    if m.noise is not None:
        ncls = registry.get("noise", m.noise.name).cls
        noise = ncls(component_options(ncls, m.noise))
    model = VAE(encoder, decoder, likelihood, m.latent_dim, m.kind, noise)
    check_shapes(model, shape, param_shape)
    return model


def check_shapes(model: VAE, shape: Shape, param_shape: Shape) -> None:
    """Run a 2-image forward pass and check every output shape, naming the component at fault."""
    x = torch.zeros(2, *shape)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                p = model.encoder(x)
            except RuntimeError as exc:
                raise ConfigError([("model.encoder", f"does not accept images of shape {shape}: {exc}")]) from None
            want = (2, model.encoder.out_features)
            if tuple(p.shape) != want:
                raise ConfigError([("model.encoder", f"returned {tuple(p.shape)}, expected {want}")])
            try:
                out = model.decoder(torch.zeros(2, model.latent_dim))
            except RuntimeError as exc:
                raise ConfigError([("model.decoder", f"cannot decode latent_dim={model.latent_dim}: {exc}")]) from None
            if tuple(out.shape) != (2, *param_shape):
                raise ConfigError([("model.decoder", f"returned {tuple(out.shape)}, but the likelihood needs "
                                    f"{(2, *param_shape)} for data of shape {shape}")])
    finally:
        model.train(was_training)
