"""`vaeflow bench vq-quality`: the VQ-VAE-2 quality report against the issue's bars.

Runs the whole VQ-VAE-2 pipeline through Prefect (tracked and registered in MLflow), then the
continuous conv VAE for the same number of epochs through the VAE pipeline up to evaluation,
and compares them on the same test images:

- code usage of each level over the test set (bar: >= 0.8);
- test reconstruction MSE, VQ-VAE-2 vs conv VAE (bar: VQ below);
- top-prior NLL on held-out codes (bar: <= 0.6 log2 K bits per code);
- the prior sample grid, copied next to the JSON for a human to look at (it is also logged in MLflow).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from core.checkpoint import read_metrics, write_text
from core.config import load_config

USAGE_BAR, PRIOR_BAR = 0.8, 0.6


def bench_vq_quality(out: str | Path, config: str | Path, baseline: str | Path) -> dict:
    """Run both pipelines, compare, write the JSON report and the sample grid next to it."""
    from pipelines.flows import evaluate_flow
    from pipelines.vq_flows import vqvae2_pipeline

    out = Path(out)
    cfg = load_config(config)
    t0 = time.perf_counter()
    vq = vqvae2_pipeline(str(config))
    vq_seconds = time.perf_counter() - t0
    epochs = cfg.train.epochs
    t0 = time.perf_counter()
    vae = evaluate_flow(str(baseline), [f"train.epochs={epochs}", "eval.iwae_k=1", "eval.max_examples=null"])
    vae_seconds = time.perf_counter() - t0
    m_vq = json.loads(Path(vq["eval"]).read_text())
    m_vae = json.loads(Path(vae["eval"]).read_text())
    k_top = m_vq["top_codebook_size"]
    levels = cfg.model.levels
    last_epoch = read_metrics(vq["run_dir"])[-1]  # the training batches' codebook health at the end
    figures = {
        "epochs": epochs,
        "test_examples": m_vq["examples"],
        "vq_mse": m_vq["mse"], "vae_mse": m_vae["mse"], "vae_examples": m_vae["examples"],
        **{f"{level}_usage": m_vq[f"{level}_usage"] for level in levels},
        **{f"{level}_perplexity": m_vq[f"{level}_perplexity"] for level in levels},
        **{f"train_{level}_usage_ema": last_epoch[f"{level}/usage_ema"] for level in levels},
        **{f"prior_{level}_nll_bits_per_code": m_vq[f"prior_{level}_nll_bits_per_code"] for level in levels},
        **{f"prior_{level}_accuracy": m_vq[f"prior_{level}_accuracy"] for level in levels},
        "top_codebook_size": k_top, "prior_top_bar_bits": PRIOR_BAR * m_vq["prior_top_uniform_bits_per_code"],
    }
    bars = {
        "usage_ge_0.8_all_levels": all(m_vq[f"{level}_usage"] >= USAGE_BAR for level in levels),
        "vq_mse_below_vae": m_vq["mse"] < m_vae["mse"],
        "top_prior_nll_le_0.6_log2K": m_vq["prior_top_nll_bits_per_code"] <= figures["prior_top_bar_bits"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    images = {}
    for name, source in (("samples", vq["images"][0]), ("reconstructions", Path(vq["eval"]).with_name("reconstructions.png"))):
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


def print_summary(result: dict) -> None:
    """The comparison and the bars, one line each."""
    f, bars = result["figures"], result["bars"]
    print(f"epochs {f['epochs']}, {f['test_examples']} test images")
    print(f"test MSE: VQ-VAE-2 {f['vq_mse']:.5f} vs conv VAE {f['vae_mse']:.5f} "
          f"({'below' if bars['vq_mse_below_vae'] else 'NOT below'})")
    for key in sorted(k for k in f if k.endswith("_usage") and not k.startswith("train_")):
        print(f"{key}: {f[key]:.1%} of the codebook used on the test set, "
              f"{f['train_' + key + '_ema']:.1%} per training batch (EMA) at the end")
    print(f"top prior: {f['prior_top_nll_bits_per_code']:.3f} bits/code (bar {f['prior_top_bar_bits']:.2f}, "
          f"uniform {f['prior_top_bar_bits'] / PRIOR_BAR:.2f})")
    if "prior_bottom_nll_bits_per_code" in f:
        print(f"bottom prior: {f['prior_bottom_nll_bits_per_code']:.3f} bits/code")
    for name, ok in bars.items():
        print(f"{'PASS' if ok else 'FAIL'} {name}")
    print(f"sample grid: {result['images']['samples']} (look at it)")
