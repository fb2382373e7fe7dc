"""A spatial broadcast decoder (Watters et al. 2019, arXiv:1901.07017): z tiled over the image grid, with x and y
coordinate channels appended, then 3x3 convolutions to the likelihood parameters."""
import torch
from pydantic import Field
from torch import nn

from vaeflow.core.bounds import MAX_WIDTH
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Decoder, Options


class SpatialBroadcast(Decoder):
    """z (B, J) -> likelihood parameters (B, P, H, W)."""

    name = "spatial-broadcast"

    class Options(Options):
        channels: int = Field(32, gt=0, le=MAX_WIDTH, description="channels of the hidden convolutions")

    def __init__(self, options, latent_dim, out_shape):
        super().__init__(options, latent_dim, out_shape)
        p, h, w = out_shape
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys]))  # (2, H, W)
        c = options.channels
        self.net = nn.Sequential(nn.Conv2d(latent_dim + 2, c, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, p, 1))

    def forward(self, z):
        b, (_, h, w) = len(z), self.out_shape
        tiled = z[:, :, None, None].expand(b, -1, h, w)  # (B, J, H, W)
        return self.net(torch.cat([tiled, self.coords.expand(b, -1, -1, -1)], dim=1))  # (B, P, H, W)


@hookimpl
def register_decoders(register):
    register(SpatialBroadcast)
