"""`vaeflow bench disentanglement`: β-VAE on shapes at several β, same budget; MIG, SAP and DCI per β.

Each β runs the VAE pipeline up to render (prepare_data -> train -> evaluate || render), so the
scores are logged by the evaluate stage and the traversals by the render stage of its MLflow run.
The table and one traversal grid per β are written next to the JSON.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vaeflow.core.checkpoint import write_text

BUDGET = ["data.dataset.n_train=10000", "data.dataset.n_test=2000", "train.epochs=10", "eval.max_examples=2000",
          "eval.iwae_k=10", "train.progress=false"]


def bench_disentanglement(out: str | Path, config: str | Path, betas: list[float]) -> dict:
    """Run the pipeline once per β with the same budget; collect the disentanglement scores and traversals."""
    from vaeflow.pipelines.pipeline import pipeline

    out = Path(out)
    rows = []
    for beta in betas:
        tag = f"{beta:g}".replace(".", "p")
        sets = BUDGET + [f"train.beta.value={beta}", f"tracking.model_name=beta-vae-shapes-b{tag}"]
        result = pipeline(str(config), sets)  # evaluate and render (and register) each beta
        metrics = json.loads(Path(result["eval"]).read_text())
        traversal = next(p for p in result["images"] if p.endswith("traversal/traversal.png"))
        dest = out.with_name(f"{out.stem}-traversal-beta{tag}.png")
        shutil.copyfile(traversal, dest)
        rows.append({
            "beta": beta, "mig": metrics["disentanglement/mig"], "sap": metrics["disentanglement/sap"],
            "dci_disentanglement": metrics["disentanglement/dci_disentanglement"],
            "mig_per_factor": {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("disentanglement/mig/")},
            "neg_elbo_nats": metrics["neg_elbo_nats"], "kl_nats": metrics["kl_nats"],
            "active_units": metrics["active_units"], "mse": metrics["mse"],
            "traversal": str(dest), "mlflow_run_id": result["mlflow_run_id"], "stages": result["stages"],
        })
    result = {"config": str(config), "budget": BUDGET, "rows": rows}
    write_text(out, json.dumps(result, indent=2) + "\n")
    return result


def print_summary(result: dict) -> None:
    """One line per β."""
    print(f"{'beta':>5} {'MIG':>6} {'SAP':>6} {'DCI-D':>6} {'-ELBO':>8} {'KL':>6} {'active':>6}")
    for r in result["rows"]:
        print(f"{r['beta']:>5g} {r['mig']:6.3f} {r['sap']:6.3f} {r['dci_disentanglement']:6.3f} "
              f"{r['neg_elbo_nats']:8.1f} {r['kl_nats']:6.1f} {r['active_units']:>6}")
