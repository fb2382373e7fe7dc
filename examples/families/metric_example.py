"""Latent kurtosis: the excess kurtosis E[(m - E m)^4] / Var(m)^2 - 3 of each posterior mean m = E_q[z_j] over the
test split. Near 0 for a Gaussian-looking aggregate posterior; large for a unit that fires on few images."""
import torch

from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Metric, Options


class LatentKurtosis(Metric):
    """Keys: latent_kurtosis (one value per latent dimension) and latent_kurtosis_mean."""

    name = "latent-kurtosis"
    needs = ("continuous",)  # a latent vector per image: posterior(x).mode() is (B, J)
    headline = ("latent_kurtosis_mean",)

    class Options(Options):
        pass

    @torch.no_grad()
    def compute(self, ctx):
        m = torch.cat([ctx.model.posterior(b.to(ctx.model.device)).mode().double().cpu()
                       for b in ctx.images.split(ctx.config.batch_size)])  # (N, J)
        d = m - m.mean(0)  # (N, J)
        kurtosis = d.pow(4).mean(0) / d.pow(2).mean(0).pow(2).clamp_min(1e-24) - 3  # (J,)
        return {"latent_kurtosis": kurtosis.tolist(), "latent_kurtosis_mean": kurtosis.mean().item()}


@hookimpl
def register_metrics(register):
    register(LatentKurtosis)
