"""An example third-party vaeflow plugin package: an encoder (`residual-mlp`, in `encoder.py`), a model kind of its
own (`rae`, the regularized autoencoder, in `rae.py`), and the pipeline stage that kind adds (`fit_gmm`, the ex-post
Gaussian mixture, in `gmm.py`) with that mixture as a latent prior (`gmm`, also in `gmm.py`), which becomes the prior
of the model the pipeline registers. Each module is one entry point in the `vaeflow` group."""

__version__ = "0.1.0"
