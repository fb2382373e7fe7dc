"""Shared test data of this package's tests."""

import pytest


@pytest.fixture
def tiny_config() -> dict:
    """A small config on vaeflow's generated `shapes` dataset, with this package's model kind and encoder."""
    return {
        "data": {"dataset": {"name": "shapes", "image_size": 32, "n_train": 64, "n_test": 16}},
        "model": {"kind": "rae", "latent_dim": 4, "latent_weight": 0.1,
                  "encoder": {"name": "residual-mlp", "width": 32},
                  "decoder": {"name": "mlp", "hidden": [32]}, "likelihood": {"name": "bernoulli"}},
    }
