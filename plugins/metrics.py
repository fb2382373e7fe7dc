"""Built-in evaluation metrics, run by vaeflow.core.metrics.evaluate on the test split of every model they apply to.

- `latent` (latent vectors): reconstruction error of the posterior mode, active units (Burda et al. 2016, sec. 5.2),
  and, when the model bounds log p(x), the negative ELBO (Kingma & Welling 2014) and the IWAE bound (Burda et al.
  2016), all in one pass over the data: the IWAE's k decodes per image dominate, so the cheap parts share its loop.
- `codebook` (code grids): reconstruction through encode_codes/decode_codes and per-level codebook health: usage,
  dead codes, perplexity (van den Oord et al. 2017; Razavi et al. 2019).
- `disentanglement` (latent vectors, on a split with known factors): MIG (Chen et al. 2018), SAP (Kumar et al.
  2018) and DCI (Eastwood & Williams 2018) of the posterior means (see vaeflow.core.disentanglement).

A third-party metric registers the same way, through `register_metrics`.
"""

from __future__ import annotations

import math

import torch

from vaeflow.core.disentanglement import disentanglement_scores
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Metric, MetricContext, Options
from vaeflow.core.metrics import LN2, bits_per_dim, iwae_log_likelihood


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]: 10 log10(1 / mse), inf for a perfect reconstruction."""
    return 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")


class Latent(Metric):
    """Reconstruction, active units and, for a model with a bound on log p(x), the ELBO and the IWAE bound.

    Keys: mse, psnr (the posterior mode decoded to the likelihood's mean); active_units, unit_variance (per unit
    Cov_x E_q[z_j], unbiased), latent_dim, active_threshold; with capabilities.log_likelihood also neg_elbo_nats,
    neg_elbo_bits_per_dim, reconstruction_nats, kl_nats, iwae_k, iwae_nll_nats, iwae_nll_bits_per_dim, and
    kl_per_dim when the prior has a closed-form KL per dimension."""

    name = "latent"
    needs = ("continuous",)
    headline = ("neg_elbo_nats", "neg_elbo_bits_per_dim", "iwae_nll_nats", "iwae_nll_bits_per_dim", "mse", "psnr",
                "active_units")
    params = ("latent_dim", "active_threshold", "iwae_k")

    class Options(Options):
        pass

    @torch.no_grad()
    def compute(self, ctx: MetricContext) -> dict:
        """One pass over ctx.images (N, C, H, W) in batches of eval.batch_size."""
        model, cfg, images = ctx.model, ctx.config, ctx.images
        n, dims = len(images), images[0].numel()
        sums = {"neg_elbo": 0.0, "reconstruction": 0.0, "kl": 0.0, "iwae": 0.0, "sq_err": 0.0}
        means, kl_dims = [], torch.zeros(model.latent_dim, dtype=torch.float64)
        device, bounded = model.device, model.capabilities.log_likelihood is not None
        for batch in images.split(cfg.batch_size):
            batch = batch.to(device)  # (B, C, H, W)
            q = model.posterior(batch)
            means.append(q.mode().double().cpu())  # E_q[z]: (B, J)
            recon = model.likelihood.mean(model.decode(q.mode()))  # (B, C, H, W)
            sums["sq_err"] += (recon - batch).pow(2).sum().item()
            if bounded:
                log_px, kl, kd = model.elbo_terms(batch)  # (B,), (B,), (B, J) or None
                sums["reconstruction"] -= log_px.sum().item()
                sums["kl"] += kl.sum().item()
                sums["neg_elbo"] += (kl - log_px).sum().item()
                if kd is None:
                    kl_dims = None
                elif kl_dims is not None:
                    kl_dims += kd.double().sum(0).cpu()
                sums["iwae"] -= iwae_log_likelihood(model, batch, cfg.iwae_k).sum().item()
        mse = sums["sq_err"] / (n * dims)
        mu = torch.cat(means)  # (N, J)
        unit_var = mu.var(dim=0, unbiased=True) if n > 1 else torch.zeros(model.latent_dim)  # Cov_x E_q[z_j]: (J,)
        out = {
            "mse": mse, "psnr": psnr(mse),
            "active_units": int((unit_var > cfg.active_threshold).sum()),
            "latent_dim": model.latent_dim, "active_threshold": cfg.active_threshold,
            "unit_variance": unit_var.tolist(),
        }
        if bounded:
            neg_elbo, iwae = sums["neg_elbo"] / n, sums["iwae"] / n
            out.update({
                "neg_elbo_nats": neg_elbo, "neg_elbo_bits_per_dim": bits_per_dim(neg_elbo, dims),
                "reconstruction_nats": sums["reconstruction"] / n, "kl_nats": sums["kl"] / n,
                "iwae_k": cfg.iwae_k, "iwae_nll_nats": iwae, "iwae_nll_bits_per_dim": bits_per_dim(iwae, dims),
            })
            if kl_dims is not None:  # the prior has a closed-form KL per dimension
                out["kl_per_dim"] = (kl_dims / n).tolist()
        return out


class Codebook(Metric):
    """Reconstruction and per-level codebook health, through the discrete contract only (encode_codes,
    decode_codes, codebook_sizes), so a third-party discrete kind needs no VQ internals.

    Keys: mse, psnr, reconstruction_nats, reconstruction_bits_per_dim (-log p(x | decode_codes(codes))); per
    level: <level>_usage (fraction of codes used), <level>_dead_codes, <level>_perplexity (exp of the code
    entropy), <level>_code_entropy_bits, <level>_codebook_size."""

    name = "codebook"
    needs = ("discrete",)
    headline = ("mse", "psnr", "top_usage", "top_perplexity", "bottom_usage", "bottom_perplexity")
    params = ("top_codebook_size", "bottom_codebook_size")

    class Options(Options):
        pass

    @torch.no_grad()
    def compute(self, ctx: MetricContext) -> dict:
        """One pass over ctx.images (N, C, H, W) in batches of eval.batch_size."""
        model, images = ctx.model, ctx.images
        n, dims = len(images), images[0].numel()
        sq_err, nll = 0.0, 0.0
        counts = {level: torch.zeros(k, dtype=torch.long) for level, k in model.codebook_sizes.items()}  # (K,)
        for batch in images.split(ctx.config.batch_size):
            batch = batch.to(model.device)  # (B, C, H, W)
            codes = model.encode_codes(batch)  # {level: (B, h, w)}
            params = model.decode_codes(codes)  # (B, P, H, W)
            sq_err += (model.likelihood.mean(params) - batch).pow(2).sum().item()
            nll -= model.likelihood.log_prob(batch, params).sum().item()
            for level, indices in codes.items():
                counts[level] += torch.bincount(indices.flatten().cpu(), minlength=len(counts[level]))
        mse = sq_err / (n * dims)
        out = {"mse": mse, "psnr": psnr(mse),
               "reconstruction_nats": nll / n, "reconstruction_bits_per_dim": bits_per_dim(nll / n, dims)}
        for level, c in counts.items():
            p = c.double() / c.sum()  # (K,) code frequencies
            entropy = float(-(p[p > 0] * p[p > 0].log()).sum())  # nats
            out.update({f"{level}_usage": float((c > 0).double().mean()), f"{level}_dead_codes": int((c == 0).sum()),
                        f"{level}_perplexity": math.exp(entropy), f"{level}_code_entropy_bits": entropy / LN2,
                        f"{level}_codebook_size": len(c)})
        return out


class Disentanglement(Metric):
    """MIG, SAP and DCI of the posterior means against the split's known factors, under `disentanglement/` keys
    (see vaeflow.core.disentanglement.disentanglement_scores); nothing without factors or with eval.disentanglement off.

    When the scores cannot be computed (e.g. too few examples for a held-out split) the only key is
    `disentanglement_error`, saying why, and the other metrics stand."""

    name = "disentanglement"
    needs = ("continuous",)
    headline = ("disentanglement/mig", "disentanglement/sap", "disentanglement/dci_disentanglement")

    class Options(Options):
        pass

    @torch.no_grad()
    def compute(self, ctx: MetricContext) -> dict:
        """Posterior means (N, J) of ctx.images against ctx.factors (N, K)."""
        if ctx.factors is None or not ctx.config.disentanglement:
            return {}
        model = ctx.model
        try:
            means = torch.cat([model.posterior(b.to(model.device)).mode().cpu()
                               for b in ctx.images.split(ctx.config.batch_size)])  # (N, J)
            scores = disentanglement_scores(means, ctx.factors[: len(means)], list(ctx.factor_names),
                                            list(ctx.factor_discrete))
        except ValueError as exc:  # e.g. too few examples for a held-out split: say why, keep the other metrics
            return {"disentanglement_error": str(exc)}
        return {f"disentanglement/{k}": v for k, v in scores.items()}


@hookimpl
def register_metrics(register):
    """Register the built-in metrics."""
    for cls in (Latent, Codebook, Disentanglement):
        register(cls)
