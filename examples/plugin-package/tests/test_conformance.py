"""This package's own tests: vaeflow's conformance kit (core.testing) on its encoder and its model kind.

Run them where the package is installed next to vaeflow: `pytest tests/`.
"""

from pathlib import Path

from core import testing
from core.config import load_config

TINY = {  # a small config on vaeflow's generated `shapes` dataset, with this package's model kind and encoder
    "data": {"dataset": {"name": "shapes", "image_size": 32, "n_train": 64, "n_test": 16}},
    "model": {"kind": "rae", "latent_dim": 4, "latent_weight": 0.1, "encoder": {"name": "residual-mlp", "width": 32},
              "decoder": {"name": "mlp", "hidden": [32]}, "likelihood": {"name": "bernoulli"}},
}


def test_residual_mlp_encoder_conforms():
    testing.check_plugin("encoder", "residual-mlp", options={"width": 32, "depth": 2})


def test_rae_model_kind_conforms():
    testing.check_plugin("model", "rae", config=TINY)
