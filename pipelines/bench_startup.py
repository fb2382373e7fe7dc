"""`vaeflow bench startup`: how long each CLI command takes to start, and what it imports.

Each command runs in a fresh process (the installed `vaeflow` script), `repeats` times, interleaved; the figure is the
median wall time to exit. `-X importtime` of one more run gives the top-level modules it imported, so the table says
whether torch, mlflow or prefect were paid for. `vaeflow plugins` is timed twice: with its listing cache warm (the
usual case) and cold (an empty cache folder, as after an install or an edit of a plugin).
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

from vaeflow.core.files import write_text

HEAVY = ("torch", "mlflow", "prefect")
COMMANDS = {  # name -> (arguments, whether the plugin listing cache starts empty)
    "vaeflow --help": (["--help"], False),
    "vaeflow --version": (["--version"], False),
    "vaeflow plugins (cache warm)": (["plugins"], False),
    "vaeflow plugins (cache cold)": (["plugins"], True),
    "vaeflow config validate vae-shapes-tiny": (["config", "validate", "vae-shapes-tiny"], False),
    "vaeflow run --help": (["run", "--help"], False),
}


def script() -> str:
    """The `vaeflow` console script beside this interpreter."""
    return str(Path(sys.executable).parent / "vaeflow")


def wall(args: list[str], env: dict) -> float:
    """Seconds from spawn to exit of `vaeflow ARGS` (it must succeed)."""
    t0 = time.perf_counter()
    subprocess.run([script(), *args], env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def heavy_imports(args: list[str], env: dict) -> list[str]:
    """Which of torch, mlflow and prefect `vaeflow ARGS` imports (python -X importtime)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", script(), *args], env=env, check=True,
                          capture_output=True, text=True)
    names = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return [h for h in HEAVY if h in names]


def bench_startup(out: str | Path, repeats: int = 5) -> dict:
    """Median start-to-exit seconds and heavy imports of each command; writes the JSON to `out`."""
    with tempfile.TemporaryDirectory() as tmp:
        warm_cache, cold_root = Path(tmp) / "warm", Path(tmp) / "cold"
        base = {**os.environ, "VAEFLOW_CACHE_DIR": str(warm_cache)}
        wall(["plugins"], base)  # fill the warm cache once
        times: dict[str, list[float]] = {name: [] for name in COMMANDS}
        for i in range(repeats):
            for name, (args, cold) in COMMANDS.items():
                env = {**base, "VAEFLOW_CACHE_DIR": str(cold_root / f"{i}")} if cold else base
                times[name].append(wall(args, env))
        rows = {}
        for name, (args, cold) in COMMANDS.items():
            env = {**base, "VAEFLOW_CACHE_DIR": str(cold_root / "imports")} if cold else base
            rows[name] = {"median_s": round(statistics.median(times[name]), 3),
                          "runs_s": [round(t, 3) for t in times[name]], "imports": heavy_imports(args, env)}
    result = {"benchmark": "vaeflow bench startup", "repeats": repeats, "python": sys.version.split()[0],
              "cpu_count": os.cpu_count(), "commands": rows}
    write_text(out, json.dumps(result, indent=2) + "\n")
    return result


def print_summary(result: dict) -> None:
    """One line per command: median seconds and what it imported."""
    for name, row in result["commands"].items():
        print(f"{name:<44} {row['median_s']:6.2f} s   imports: {', '.join(row['imports']) or 'none of torch/mlflow/prefect'}")
