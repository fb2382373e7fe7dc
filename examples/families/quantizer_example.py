"""The VQ-VAE quantizer at its smallest (van den Oord et al. 2017, arXiv:1711.00937, eq. 3): the nearest code,
a codebook and a commitment loss, and the straight-through gradient."""
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vaeflow.core.bounds import MAX_CODES
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Options, Quantizer, QuantizerOutput


class MinimalVQ(Quantizer):
    """z_e (B, D, h, w) -> the nearest of K learned code vectors."""

    name = "minimal-vq"

    class Options(Options):
        codebook_size: int = Field(64, gt=0, le=MAX_CODES, description="K, the number of code vectors")
        commitment: float = Field(0.25, ge=0, description="beta, the weight of ||z_e - sg[e]||^2")

    def __init__(self, options, embedding_dim):
        super().__init__(options, embedding_dim)
        self.embedding = nn.Embedding(self.codebook_size, embedding_dim)  # (K, D)

    @property
    def codebook(self):
        return self.embedding.weight

    def forward(self, z_e):
        flat = z_e.permute(0, 2, 3, 1).flatten(0, 2)  # (B*h*w, D)
        indices = torch.cdist(flat, self.codebook).argmin(1).view(z_e.shape[0], *z_e.shape[2:])  # (B, h, w)
        e = self.lookup(indices)  # (B, D, h, w)
        losses = {"codebook": F.mse_loss(e, z_e.detach()),
                  "commitment": self.options.commitment * F.mse_loss(z_e, e.detach())}
        p = torch.bincount(indices.flatten(), minlength=self.codebook_size).float() / indices.numel()  # (K,)
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum()).detach()
        return QuantizerOutput(z_e + (e - z_e).detach(), indices, losses, {"perplexity": perplexity})


@hookimpl
def register_quantizers(register):
    register(MinimalVQ)
