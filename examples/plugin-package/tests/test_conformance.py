"""This package's own tests: vaeflow's conformance kit (vaeflow.core.testing) on its encoder, its model kind and its latent
prior.

Run them where the package is installed next to vaeflow: `pytest tests/`.
"""

from vaeflow.core import testing


def test_residual_mlp_encoder_conforms():
    testing.check_plugin("encoder", "residual-mlp", options={"width": 32, "depth": 2})


def test_rae_model_kind_conforms(tiny_config):
    testing.check_plugin("model", "rae", config=tiny_config)


def test_gmm_latent_prior_conforms():
    for covariance in ("full", "diag"):
        testing.check_plugin("latent_prior", "gmm", options={"components": 3, "covariance": covariance})
