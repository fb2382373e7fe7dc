"""A reconstruction error map: the mean absolute error |x - reconstruct(x)| per pixel over held-out images, scaled
to [0, 1] by its maximum and written as one PNG. Every model reconstructs, so it draws both kinds."""
import torch
from pydantic import Field

from vaeflow.core.bounds import MAX_GRID
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.images import save_grid
from vaeflow.core.interfaces import Options, Renderer


class ErrorMap(Renderer):
    """error_map.png: bright where the model reconstructs badly."""

    name = "error-map"
    kinds = ("continuous", "discrete")

    class Options(Options):
        images: int = Field(64, gt=0, le=MAX_GRID, description="how many held-out images, drawn with the render seed")

    @torch.no_grad()
    def render(self, ctx):
        pick = torch.randperm(len(ctx.images), generator=torch.Generator().manual_seed(ctx.seed))
        x = ctx.images[pick[: self.options.images]].to(ctx.model.device)  # (N, C, H, W)
        error = (x - ctx.model.reconstruct(x)).abs().mean(0)  # (C, H, W)
        return [save_grid((error / error.max().clamp_min(1e-8))[None], ctx.out_dir / "error_map.png", nrow=1)]


@hookimpl
def register_renderers(register):
    register(ErrorMap)
