"""`vaeflow bench vq-quality`: the VQ-VAE-2 quality report against the issue's bars.

Runs the whole VQ-VAE-2 pipeline through Prefect (tracked and registered in MLflow), then the
continuous conv VAE for the same number of epochs through the VAE pipeline up to evaluation,
and compares them on the same test images:

- code usage of each level over the test set (bar: >= 0.8), with the stricter perplexity / K and
  the per-batch usage EMA of the last training epoch beside it;
- test reconstruction MSE, VQ-VAE-2 vs conv VAE (bar: VQ below), over the same 28x28 pixels (the VQ
  model's padded reconstructions are cropped back);
- top-prior NLL on held-out codes (bar: <= 0.6 log2 K bits per code);
- the prior sample grid, copied next to the JSON for a human to look at (it is also logged in MLflow).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from vaeflow.core.checkpoint import read_metrics, write_text
from vaeflow.core.config import load_config

USAGE_BAR, PRIOR_BAR = 0.8, 0.6


def bench_vq_quality(out: str | Path, config: str | Path, baseline: str | Path) -> dict:
    """Run both pipelines, compare, write the JSON report and the sample grid next to it."""
    from vaeflow.pipelines.pipeline import pipeline

    out = Path(out)
    cfg = load_config(config)
    t0 = time.perf_counter()
    vq = pipeline(str(config))
    vq_seconds = time.perf_counter() - t0
    epochs = cfg.train.epochs
    t0 = time.perf_counter()
    vae = pipeline(str(baseline), [f"train.epochs={epochs}", "eval.iwae_k=1", "eval.max_examples=null"], "evaluate")
    vae_seconds = time.perf_counter() - t0
    m_vq = json.loads(Path(vq["eval"]).read_text())
    m_vae = json.loads(Path(vae["eval"]).read_text())
    vq_mse_crop = cropped_mse(vq["run_dir"], vae["data"]["folder"])
    k_top = m_vq["top_codebook_size"]
    levels = cfg.model.levels
    last_epoch = read_metrics(vq["run_dir"])[-1]  # the training batches' codebook health at the end
    figures = {
        "epochs": epochs,
        "test_examples": m_vq["examples"],
        "vq_mse_padded_32": m_vq["mse"], "vq_mse": vq_mse_crop, "vae_mse": m_vae["mse"],
        "vae_examples": m_vae["examples"],
        **{f"{level}_usage": m_vq[f"{level}_usage"] for level in levels},
        **{f"{level}_perplexity": m_vq[f"{level}_perplexity"] for level in levels},
        **{f"{level}_perplexity_over_k": m_vq[f"{level}_perplexity"] / m_vq[f"{level}_codebook_size"] for level in levels},
        **{f"train_{level}_usage_ema_last_epoch_mean": last_epoch[f"{level}/usage_ema"] for level in levels},
        **{f"prior_{level}_nll_bits_per_code": m_vq[f"prior_{level}_nll_bits_per_code"] for level in levels},
        **{f"prior_{level}_accuracy": m_vq[f"prior_{level}_accuracy"] for level in levels},
        "top_codebook_size": k_top, "prior_top_bar_bits": PRIOR_BAR * m_vq["prior_top_uniform_bits_per_code"],
        **{k.replace("/", "_"): m_vq[k] for k in ("quality/fid", "quality/kid", "quality/kid_std", "quality/samples",
                                                  "quality/real_train_fid", "quality/feature_net",
                                                  "quality/feature_net_accuracy") if k in m_vq},
    }
    bars = {
        "usage_ge_0.8_all_levels": all(m_vq[f"{level}_usage"] >= USAGE_BAR for level in levels),
        "vq_mse_below_vae": vq_mse_crop < m_vae["mse"],
        "top_prior_nll_le_0.6_log2K": m_vq["prior_top_nll_bits_per_code"] <= figures["prior_top_bar_bits"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    images = {}
    for name, source in (("samples", vq["samples"][0]), ("reconstructions", Path(vq["eval"]).with_name("reconstructions.png"))):
        dest = out.with_name(f"{out.stem}-{name}.png")
        shutil.copyfile(source, dest)
        images[name] = str(dest)
    result = {
        "config": str(config), "baseline": str(baseline), "figures": figures, "bars": bars, "images": images,
        "wall_seconds_this_invocation": {"vq_pipeline": vq_seconds, "vae_pipeline": vae_seconds,
                                         "note": "cached stages cost nothing here; see the stage runs in MLflow"},
        "stages": {"vq": vq["stages"], "vae": vae["stages"]},
        "mlflow_run_ids": {"vq": vq["mlflow_run_id"], "vae": vae["mlflow_run_id"]},
        "registered": {k: vq["model"][k] for k in ("name", "version", "model_uri")} | {
            "priors": {lvl: p["model_uri"] for lvl, p in vq["model"]["priors"].items()}},
    }
    write_text(out, json.dumps(result, indent=2) + "\n")
    return result


def cropped_mse(vq_run_dir: str, vae_data_folder: str) -> float:
    """Test MSE of the VQ model over the baseline's own pixels: its padded reconstructions cropped back to
    the baseline's image size (28x28 in 32x32), so zero padding does not flatter the comparison."""
    import torch

    from vaeflow.core.checkpoint import load_model
    from vaeflow.core.data import pad
    from vaeflow.core.interfaces import to_unit_float
    from vaeflow.core.manifest import load_prepared

    model, cfg = load_model(vq_run_dir)
    baseline = to_unit_float(load_prepared(vae_data_folder)["test"])  # (N, C, h, w), the VAE's test images
    h, w = baseline.shape[-2:]
    images = pad(baseline, cfg.data.pad_to)  # (N, C, H, W), the VQ model's input
    top, left = (images.shape[-2] - h) // 2, (images.shape[-1] - w) // 2
    sq = 0.0
    for batch, target in zip(images.split(500), baseline.split(500)):
        recon = model.reconstruct(batch)[..., top:top + h, left:left + w]  # (B, C, h, w)
        sq += float((recon - target).pow(2).sum())
    return sq / baseline.numel()


def print_summary(result: dict) -> None:
    """The comparison and the bars, one line each."""
    f, bars = result["figures"], result["bars"]
    print(f"epochs {f['epochs']}, {f['test_examples']} test images")
    print(f"test MSE on the 28x28 pixels: VQ-VAE-2 {f['vq_mse']:.5f} vs conv VAE {f['vae_mse']:.5f} "
          f"({'below' if bars['vq_mse_below_vae'] else 'NOT below'}); VQ on the padded 32x32: {f['vq_mse_padded_32']:.5f}")
    for key in sorted(k for k in f if k.endswith("_usage") and not k.startswith("train_")):
        level = key.removesuffix("_usage")
        print(f"{level}: {f[key]:.1%} of the codebook used on the test set; perplexity / K "
              f"{f[level + '_perplexity_over_k']:.1%}; batch usage EMA over the last epoch "
              f"{f['train_' + key + '_ema_last_epoch_mean']:.1%}")
    print(f"top prior: {f['prior_top_nll_bits_per_code']:.3f} bits/code (bar {f['prior_top_bar_bits']:.2f}, "
          f"uniform {f['prior_top_bar_bits'] / PRIOR_BAR:.2f})")
    if "prior_bottom_nll_bits_per_code" in f:
        print(f"bottom prior: {f['prior_bottom_nll_bits_per_code']:.3f} bits/code")
    if "quality_fid" in f:
        print(f"prior samples: FID-style {f['quality_fid']:.1f} (real training images {f['quality_real_train_fid']:.1f}) "
              f"with {f['quality_feature_net']} ({f['quality_feature_net_accuracy']:.1%} accuracy)")
    for name, ok in bars.items():
        print(f"{'PASS' if ok else 'FAIL'} {name}")
    print(f"sample grid: {result['images']['samples']} (look at it)")
