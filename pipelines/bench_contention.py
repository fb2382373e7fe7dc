"""`vaeflow bench contention`: the total images/s of two trainings that share the machine, against one alone.

Every job is a separate `python -m vaeflow.pipelines.bench_contention worker` process training the `bench train`
model (MLP VAE 784-400-20, Bernoulli, batch 128) through the engine. A job builds its trainer and data, reports
ready, and starts its steps when the parent says go, so the jobs of a variant start together. In one run, round by
round:

- before: what vaeflow did until issue #14: every job takes every usable CPU, and libgomp spins its default 300,000
  times before an idle thread sleeps (GOMP_SPINCOUNT=300000, what it uses when nothing is set);
- after: today's default: each job's share of the CPUs among the jobs running at its start, fixed for the job, and
  vaeflow's bounded spinning (core.cpu);
- each alone; two at once; "staggered": two at once with the counts that result when one job started alone (every
  CPU) and the other started while it ran (its share), which the fixed count leaves oversubscribed; and one job
  beside a busy loop (another process, not a vaeflow job, that keeps one CPU busy: a `pip install`, say);
- and, for the record of why vaeflow does not use it, today's default alone under OMP_WAIT_POLICY=PASSIVE (threads
  that never spin).

A variant's total images/s is the jobs' images over the time all of them trained: from the last job's start, less
the 0.1 s in which a job with an automatic count settles it (core.cpu.SETTLE_SECONDS, paid once per job), to the
first job's end, each job's step count read off its log syncs and interpolated at the ends of that window. The
tail in which one job runs alone does not count. The contention ratio is the pair's total divided by one job alone, both
today's default; the single-job figure is today's default alone divided by the before setting alone. Targets
(issue #14): ratio >= 0.8, single job >= 0.95.
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
from vaeflow.core.cpu import SETTLE_SECONDS, SPIN_COUNT, WAIT_SETTINGS, usable_cpus
from vaeflow.core.errors import VaeflowError

RATIO_TARGET = 0.8
SINGLE_JOB_TARGET = 0.95
LIBGOMP_SPIN_COUNT = 300_000  # what libgomp spins when neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT is set


class Timeline:
    """An engine callback that records (wall time, step) at every log sync."""

    def __init__(self):
        self.points: list[tuple[float, int]] = []

    def on_log(self, step: int, record: dict) -> None:
        """Record the time this sync's step was reached."""
        self.points.append((time.time(), step))


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
        timeline = Timeline()
        trainer = Trainer(cfg, Path(tmp) / "run", train_images=images, callbacks=[timeline])
        print("ready", flush=True)
        if not sys.stdin.readline():  # EOF: the parent died before saying go
            return
        start = time.time()  # wall clock: comparable between the jobs of a pair
        result = trainer.fit()
        end = time.time()
    settle = SETTLE_SECONDS if threads is None else 0.0  # an automatic count waits this long for jobs started together
    print(json.dumps({"start": start, "end": end, "settle": settle, "steps": result.steps,
                      "images": result.steps * BATCH_SIZE,
                      "timeline": [[start, 0], [start + settle, 0]] + timeline.points + [[end, result.steps]],
                      "threads": result.final.get("threads"), "torch_threads_at_end": torch.get_num_threads(),
                      "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                      "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT")}), flush=True)


# a busy loop that ends with its parent (kill -9 included): it checks the parent every 100,000 iterations
BUSY_LOOP = ("import os\nparent = os.getppid()\nprint('busy', flush=True)\nwhile os.getppid() == parent:\n"
             "    for _ in range(100_000):\n        pass\n")


def job_env(setting: dict, slots: Path) -> dict:
    """The environment of a job: this one's, less any OpenMP settings, plus `setting`'s; the jobs' slots in `slots`."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",) + WAIT_SETTINGS}
    env["VAEFLOW_CACHE_DIR"] = str(slots)  # the jobs of this bench count each other, not the user's other runs
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **setting}


def steps_at(timeline: list, t: float) -> float:
    """A job's step count at wall time `t`, interpolated between its (time, step) syncs."""
    for (t0, s0), (t1, s1) in zip(timeline, timeline[1:]):
        if t0 <= t <= t1:
            return s0 + (s1 - s0) * (t - t0) / max(t1 - t0, 1e-9)
    return float(timeline[0][1] if t < timeline[0][0] else timeline[-1][1])


def overlap_img_per_s(jobs: list[dict]) -> tuple[float, float]:
    """The jobs' images per second over the time all of them trained (and that time): from the last job's start
    after its thread count settled to the first job's end, so neither the settle nor the tail in which one job runs
    alone is counted."""
    begin, end = max(j["start"] + j["settle"] for j in jobs), min(j["end"] for j in jobs)
    span = max(end - begin, 1e-9)
    images = sum((steps_at(j["timeline"], end) - steps_at(j["timeline"], begin)) * j["images"] / max(j["steps"], 1)
                 for j in jobs)
    return images / span, span


def run_jobs(steps: int, slots: Path, threads: list[int | None], setting: dict | None = None,
             busy: bool = False) -> dict:
    """Start one job per entry of `threads` together (its fixed count, None: its share), beside a busy loop if
    `busy`; their total images/s over the time all trained (overlap_img_per_s)."""
    cmd = [sys.executable, "-m", "vaeflow.pipelines.bench_contention", "worker", str(steps)]
    procs = [subprocess.Popen(cmd + [str(n) if n else "auto"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=job_env(setting or {}, slots)) for n in threads]
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
    total, span = overlap_img_per_s(jobs)
    per_job = [j["images"] / (j["end"] - j["start"]) for j in jobs]
    for j in jobs:
        del j["timeline"]  # long; the totals above keep what it says
    return {"jobs": len(jobs), "threads": [n or "share" for n in threads], "setting": setting or {},
            "busy_loop": busy, "total_img_per_s": total, "per_job_img_per_s": per_job, "span_s": span,
            "detail": jobs}


def bench_contention(out: str | Path, repeats: int = 3, steps: int = 1000, before_pair_steps: int = 200) -> dict:
    """Measure one job alone, two at once (together and staggered) and one beside a busy loop, before and after, in
    interleaved rounds (and today's default under OMP_WAIT_POLICY=PASSIVE); write the JSON to `out`."""
    if repeats < 1 or steps < 10 or before_pair_steps < 10:
        raise VaeflowError(f"--repeats must be >= 1 and the step counts >= 10, got {repeats}, {steps}, "
                           f"{before_pair_steps}")
    cpus = usable_cpus()
    before = {"GOMP_SPINCOUNT": str(LIBGOMP_SPIN_COUNT)}
    staggered = [cpus, max(1, cpus // 2)]  # the first started alone, the second beside it
    slow = before_pair_steps
    rounds = []
    with tempfile.TemporaryDirectory(prefix="vaeflow-contention-slots-") as tmp:
        slots = Path(tmp)
        for r in range(repeats):
            measured = {
                "before_alone": run_jobs(steps, slots, [cpus], before),
                "after_alone": run_jobs(steps, slots, [None]),
                "after_pair": run_jobs(steps, slots, [None, None]),
                "before_pair": run_jobs(slow, slots, [cpus, cpus], before),
                "after_staggered": run_jobs(steps, slots, staggered),
                "before_staggered": run_jobs(slow, slots, staggered, before),
                "after_beside_busy": run_jobs(steps, slots, [None], busy=True),
                "before_beside_busy": run_jobs(slow, slots, [cpus], before, busy=True),
                "passive_alone": run_jobs(steps, slots, [None], {"OMP_WAIT_POLICY": "PASSIVE"}),
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
        "staggered_vs_alone": median["after_staggered"] / median["after_alone"],
        "staggered_vs_alone_before": median["before_staggered"] / median["before_alone"],
        "beside_busy_vs_alone": median["after_beside_busy"] / median["after_alone"],
        "beside_busy_vs_alone_before": median["before_beside_busy"] / median["before_alone"],
        "passive_vs_default_alone": median["passive_alone"] / median["after_alone"],
        "targets": {"contention_ratio_at_least": RATIO_TARGET, "single_job_at_least": SINGLE_JOB_TARGET,
                    "contention_ratio_met": ratio >= RATIO_TARGET, "single_job_met": single >= SINGLE_JOB_TARGET},
        "total_img_per_s": median,
        "statistic": "median over rounds of each variant's total images/s, over the time all its jobs trained "
                     "(from the last start, after the thread count's settle, to the first end)",
        "repeats": repeats, "steps": steps, "slow_variant_steps": slow,
        "settings": {
            "before": f"every job takes every usable CPU ({cpus}), GOMP_SPINCOUNT={LIBGOMP_SPIN_COUNT} (libgomp's "
                      "default), as vaeflow did before #14",
            "after": f"vaeflow's default: usable CPUs // CPU jobs running at the job's start, fixed for the job; "
                     f"GOMP_SPINCOUNT={SPIN_COUNT} (set by `import vaeflow`)",
            "staggered": f"two jobs with {staggered[0]} and {staggered[1]} threads: the first started alone, the "
                         "second while it ran",
            "busy": "a Python busy loop in another process beside the job (not a vaeflow job: no slot)",
            "passive": "vaeflow's default threads, OMP_WAIT_POLICY=PASSIVE",
        },
        "model": "the `bench train` engine run: MLP VAE 784-400-20, Bernoulli, batch 128, memory loader",
        "rounds": rounds,
    }
    write_text(out, json.dumps(result, indent=2) + "\n")
    return result


def print_summary(result: dict) -> None:
    """A short human table of the report on stderr."""
    m = result["total_img_per_s"]
    rows = [("one job alone", "alone"), ("two jobs at once", "pair"), ("two jobs, staggered", "staggered"),
            ("one job beside a busy loop", "beside_busy")]
    lines = [
        f"vaeflow bench contention: {result['usable_cpus']} usable CPUs, {result['steps']} steps per job, "
        f"median of {result['repeats']} rounds",
        f"  {'':<28}{'before':>10}{'after':>10}   (total img/s)",
        *(f"  {label:<28}{m['before_' + key]:>10.0f}{m['after_' + key]:>10.0f}" for label, key in rows),
        f"  {'one job alone, PASSIVE':<28}{'':>10}{m['passive_alone']:>10.0f}"
        f"   ({result['passive_vs_default_alone']:.2f}x the default)",
        f"  contention ratio (two at once / one alone): before {result['contention_ratio_before']:.2f}, "
        f"after {result['contention_ratio']:.2f} (target >= {RATIO_TARGET})",
        f"  staggered / one alone: before {result['staggered_vs_alone_before']:.2f}, "
        f"after {result['staggered_vs_alone']:.2f}",
        f"  one job alone, after / before: {result['single_job_vs_before']:.3f} (target >= {SINGLE_JOB_TARGET})",
    ]
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        worker(int(sys.argv[2]), None if sys.argv[3] == "auto" else int(sys.argv[3]))
    else:
        sys.exit("usage: python -m vaeflow.pipelines.bench_contention worker STEPS THREADS|auto")
