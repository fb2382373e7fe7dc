"""`vaeflow bench contention`: the total images/s of two trainings that share the machine, against one alone.

Every job is a separate `python -m vaeflow.pipelines.bench_contention worker` process training the `bench train`
model (MLP VAE 784-400-20, Bernoulli, batch 128) through the engine. A job builds its trainer and data, reports
ready, and starts its steps when the parent says go, so the jobs of a pair start together. In one run, round by
round:

- before: what vaeflow did until issue #14: a fixed thread count of every usable CPU for each job;
- after: today's default: each job's share of the CPUs among the running jobs and what other processes keep busy,
  re-counted while it runs (core.cpu);
- each alone, two at once, and one job beside a busy loop (another process, not a vaeflow job, that keeps one CPU
  busy: a `pip install`, say);
- and, for the record of why vaeflow leaves libgomp's waiting policy alone, today's default alone under
  OMP_WAIT_POLICY=PASSIVE (its threads sleep instead of spin).

The contention ratio is the pair's total images/s (both jobs' images over the span from the common start to the
last end) divided by one job alone, both today's default; the single-job figure is today's default alone divided by
the before setting alone. Targets (issue #14): ratio >= 0.8, single job >= 0.95.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vaeflow.core.checkpoint import write_text
from vaeflow.core.cpu import usable_cpus
from vaeflow.core.errors import VaeflowError

RATIO_TARGET = 0.8
SINGLE_JOB_TARGET = 0.95


def worker(steps: int, threads: int | None) -> None:
    """One job: build the bench's engine run, print `ready`, wait for a line on stdin, train, print a JSON line."""
    import math

    import torch

    from vaeflow.core.data import load_split
    from vaeflow.core.engine import Trainer
    from vaeflow.pipelines.bench import BATCH_SIZE, dataset_spec, engine_config

    dataset = dataset_spec(min(steps, 400))
    images = load_split(engine_config(dataset, 1, threads), "train", torch.device("cpu"))  # (N, 1, 28, 28) in [0, 1]
    epochs = math.ceil(steps * BATCH_SIZE / len(images))
    cfg = engine_config(dataset, steps, threads, epochs=epochs)
    with tempfile.TemporaryDirectory(prefix="vaeflow-contention-") as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", train_images=images)
        print("ready", flush=True)
        if not sys.stdin.readline():  # EOF: the parent died before saying go
            return
        start = time.time()  # wall clock: comparable between the jobs of a pair
        result = trainer.fit()
        end = time.time()
    print(json.dumps({"start": start, "end": end, "steps": result.steps, "images": result.steps * BATCH_SIZE,
                      "threads": result.final.get("threads"), "torch_threads_at_end": torch.get_num_threads(),
                      "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                      "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT")}), flush=True)


# a busy loop that ends with its parent (kill -9 included): it checks the parent every 100,000 iterations
BUSY_LOOP = ("import os\nparent = os.getppid()\nprint('busy', flush=True)\nwhile os.getppid() == parent:\n"
             "    for _ in range(100_000):\n        pass\n")


def job_env(setting: dict, slots: Path) -> dict:
    """The environment of a job: this one's, less any OpenMP settings, plus `setting`'s; the jobs' slots in `slots`."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env["VAEFLOW_CACHE_DIR"] = str(slots)  # the jobs of this bench count each other, not the user's other runs
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **setting}


def run_jobs(n: int, steps: int, slots: Path, threads: int | None = None, setting: dict | None = None,
             busy: bool = False) -> dict:
    """Start `n` jobs together (threads: each one's fixed count, None: its share), beside a busy loop if `busy`;
    their images over the span from the first start to the last end."""
    cmd = [sys.executable, "-m", "vaeflow.pipelines.bench_contention", "worker", str(steps),
           str(threads) if threads else "auto"]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=job_env(setting or {}, slots)) for _ in range(n)]
    if busy:
        procs.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True))
    jobs_procs, loop = (procs[:-1], procs[-1]) if busy else (procs, None)
    try:
        if loop is not None and loop.stdout.readline().strip() != "busy":
            raise RuntimeError("the busy loop did not start")
        for p in jobs_procs:
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"a contention job failed to start (said {line!r}, exit {p.wait()})")
        for p in jobs_procs:  # go, as close together as two writes can be
            p.stdin.write("go\n")
            p.stdin.flush()
        jobs = []
        for p in jobs_procs:
            out, _ = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"a contention job exited {p.returncode}")
            jobs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    span = max(j["end"] for j in jobs) - min(j["start"] for j in jobs)
    per_job = [j["images"] / (j["end"] - j["start"]) for j in jobs]
    return {"jobs": n, "threads": threads or "share", "setting": setting or {}, "busy_loop": busy,
            "total_img_per_s": sum(j["images"] for j in jobs) / span,
            "per_job_img_per_s": per_job, "span_s": span, "detail": jobs}


def bench_contention(out: str | Path, repeats: int = 3, steps: int = 1000, before_pair_steps: int = 200) -> dict:
    """Measure one job alone, two at once and one beside a busy loop, before and after, in interleaved rounds (and
    today's default under OMP_WAIT_POLICY=PASSIVE); write the JSON to `out`."""
    if repeats < 1 or steps < 10 or before_pair_steps < 10:
        raise VaeflowError(f"--repeats must be >= 1 and the step counts >= 10, got {repeats}, {steps}, "
                           f"{before_pair_steps}")
    cpus = usable_cpus()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="vaeflow-contention-slots-") as tmp:
        slots = Path(tmp)
        for r in range(repeats):
            measured = {
                "before_alone": run_jobs(1, steps, slots, threads=cpus),
                "after_alone": run_jobs(1, steps, slots),
                "after_pair": run_jobs(2, steps, slots),
                "before_pair": run_jobs(2, before_pair_steps, slots, threads=cpus),
                "after_beside_busy": run_jobs(1, steps, slots, busy=True),
                "before_beside_busy": run_jobs(1, before_pair_steps, slots, threads=cpus, busy=True),
                "passive_alone": run_jobs(1, steps, slots, setting={"OMP_WAIT_POLICY": "PASSIVE"}),
            }
            rounds.append(measured)
            print(f"round {r + 1}/{repeats}: " + ", ".join(f"{k} {v['total_img_per_s']:.0f}"
                                                           for k, v in measured.items()) + " img/s", file=sys.stderr)
    median = {k: statistics.median(r[k]["total_img_per_s"] for r in rounds) for k in rounds[0]}
    ratio = median["after_pair"] / median["after_alone"]
    single = median["after_alone"] / median["before_alone"]
    result = {
        "benchmark": "vaeflow bench contention",
        "usable_cpus": cpus,
        "contention_ratio": ratio,
        "contention_ratio_before": median["before_pair"] / median["before_alone"],
        "single_job_vs_before": single,
        "beside_busy_vs_alone": median["after_beside_busy"] / median["after_alone"],
        "beside_busy_vs_alone_before": median["before_beside_busy"] / median["before_alone"],
        "passive_vs_default_alone": median["passive_alone"] / median["after_alone"],
        "targets": {"contention_ratio_at_least": RATIO_TARGET, "single_job_at_least": SINGLE_JOB_TARGET,
                    "contention_ratio_met": ratio >= RATIO_TARGET, "single_job_met": single >= SINGLE_JOB_TARGET},
        "total_img_per_s": median,
        "statistic": "median over rounds of each variant's total images/s",
        "repeats": repeats, "steps": steps, "slow_variant_steps": before_pair_steps,
        "settings": {
            "before": f"train.num_threads = every usable CPU ({cpus}), as vaeflow did before #14",
            "after": "vaeflow's default: usable CPUs // running CPU jobs, less what other processes keep busy",
            "busy": "a Python busy loop in another process beside the job (not a vaeflow job: no slot)",
            "passive": "vaeflow's default threads, OMP_WAIT_POLICY=PASSIVE",
            "openmp": "libgomp's default waiting (OMP_WAIT_POLICY, GOMP_SPINCOUNT unset) except in passive",
        },
        "model": "the `bench train` engine run: MLP VAE 784-400-20, Bernoulli, batch 128, memory loader",
        "rounds": rounds,
    }
    write_text(out, json.dumps(result, indent=2) + "\n")
    return result


def print_summary(result: dict) -> None:
    """A short human table of the report on stderr."""
    m = result["total_img_per_s"]
    lines = [
        f"vaeflow bench contention: {result['usable_cpus']} usable CPUs, {result['steps']} steps per job, "
        f"median of {result['repeats']} rounds",
        f"  {'':<28}{'before':>10}{'after':>10}   (total img/s)",
        f"  {'one job alone':<28}{m['before_alone']:>10.0f}{m['after_alone']:>10.0f}",
        f"  {'two jobs at once':<28}{m['before_pair']:>10.0f}{m['after_pair']:>10.0f}",
        f"  {'one job beside a busy loop':<28}{m['before_beside_busy']:>10.0f}{m['after_beside_busy']:>10.0f}",
        f"  {'one job alone, PASSIVE':<28}{'':>10}{m['passive_alone']:>10.0f}"
        f"   ({result['passive_vs_default_alone']:.2f}x the default policy)",
        f"  contention ratio (two at once / one alone): before {result['contention_ratio_before']:.2f}, "
        f"after {result['contention_ratio']:.2f} (target >= {RATIO_TARGET})",
        f"  one job alone, after / before: {result['single_job_vs_before']:.3f} (target >= {SINGLE_JOB_TARGET})",
    ]
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        worker(int(sys.argv[2]), None if sys.argv[3] == "auto" else int(sys.argv[3]))
    else:
        sys.exit("usage: python -m vaeflow.pipelines.bench_contention worker STEPS THREADS|auto")
