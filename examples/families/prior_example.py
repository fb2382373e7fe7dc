"""The simplest code prior: an independent categorical per grid position, p(codes) = prod_i softmax(theta_i)[c_i].
It is causal because the logits ignore the codes; a conditioning code grid is ignored as well."""
import torch
from torch import nn

from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Options, Prior


class PositionalCategorical(Prior):
    """Learned logits theta (K, h, w), the same for every batch element."""

    name = "positional-categorical"

    class Options(Options):
        pass

    def __init__(self, options, codebook_size, grid, condition=None):
        super().__init__(options, codebook_size, grid, condition)
        self.logits = nn.Parameter(torch.zeros(codebook_size, *self.grid))  # (K, h, w)

    def forward(self, codes, condition=None):
        return self.logits.expand(len(codes), -1, -1, -1)  # (B, K, h, w)


@hookimpl
def register_priors(register):
    register(PositionalCategorical)
