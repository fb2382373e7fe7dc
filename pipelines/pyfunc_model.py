"""The MLflow `python_function` model of a vaeflow VAE, logged as code (nothing is pickled).

    model = mlflow.pyfunc.load_model("models:/NAME@champion")
    recon = model.predict(images)                             # (N, C, H, W) floats in [0, 1]
    z = model.predict(images, params={"output": "latent"})    # (N, latent_dim) posterior means
                                                              # VQ: (N, sum h*w) code indices, top level first

`images` is a float32 array (N, C, H, W) in [0, 1] (the signature enforces it). The weights and
config travel as the `model_dir` artifact and are rebuilt through vaeflow's plugin registry.
"""

from __future__ import annotations

import mlflow
import numpy as np


class VaeflowPyfunc(mlflow.pyfunc.PythonModel):
    """Reconstructions or latents from a vaeflow model."""

    def load_context(self, context) -> None:
        """Rebuild the model from the logged weights and config."""
        from vaeflow.core.checkpoint import load_model

        self.model, self.cfg = load_model(context.artifacts["model_dir"])

    def predict(self, context, model_input, params: dict | None = None) -> np.ndarray:
        """images (N, C, H, W) in [0, 1] -> reconstructions (N, C, H, W) or latents (N, J)."""
        import torch

        from vaeflow.core.model import data_shape

        if isinstance(model_input, dict) and len(model_input) == 1:  # a named tensor input
            model_input = next(iter(model_input.values()))
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        shape = data_shape(self.cfg)
        x = x.view(-1, *shape)  # (N, C, H, W)
        output = (params or {}).get("output", "reconstruction")
        with torch.no_grad():
            if output == "latent" and self.model.capabilities.discrete:  # code indices, levels in the model's order
                codes = self.model.encode_codes(x)
                return torch.cat([codes[level].flatten(1) for level in self.model.levels], 1).numpy()  # (N, sum h*w)
            if output == "latent":
                return self.model.posterior(x).mode().numpy()  # (N, J)
            if output == "reconstruction":
                return self.model.reconstruct(x).numpy()  # (N, C, H, W)
        raise ValueError(f"params.output must be 'reconstruction' or 'latent', got {output!r}")


mlflow.models.set_model(VaeflowPyfunc())
