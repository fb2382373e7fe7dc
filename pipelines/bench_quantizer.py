"""Quantizer benchmark: forward+backward milliseconds and peak extra memory of `vq` and `vq-ema` against a floor.

All four implementations quantize the same z_e (B, D, h, w) with N = B*h*w vectors against the same K codes, in
one process, interleaved repeat by repeat (the order rotating each repeat) so that machine noise hits them alike:

- vq, vq-ema: the plugins in training mode (EMA step, usage tracking and restart bookkeeping included), loss =
  sum of their losses + (quantized * g).sum(), then backward.
- floor: the bare distance matrix and argmin, ``torch.addmm(||e||^2, z, E^T, alpha=-2).argmin(1)``, no backward;
  the least any nearest-code search must do.
- broadcast: the textbook ``(z[:, None] - E[None]).pow(2).sum(-1).argmin(1)`` (an (N, K, D) temporary), then a
  straight-through estimator, the commitment loss and backward; slow, so it runs fewer repeats.

The report holds medians, every raw value, the ratios, the targets with pass/fail, and the allocator settings and
thread counts the numbers were measured under.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from vaeflow.core.checkpoint import write_text
from vaeflow.plugins.quantizers import EMAVQ, VQ

SEED = 0
BROADCAST_REPEATS = 2  # the (N, K, D) reference takes seconds a call at the default sizes
TARGET_VQ_EMA_OVER_FLOOR = 1.5  # at most
TARGET_BROADCAST_OVER_VQ_EMA = 40.0  # at least
IMPLEMENTATIONS = ("vq", "vq-ema", "floor", "broadcast")


def grid_shape(n: int, d: int) -> tuple[int, int, int, int]:
    """z_e shape (B, D, h, w) with B*h*w = n and the largest square grid h = w <= 32 that divides n."""
    side = next(s for s in (32, 16, 8, 4, 2, 1) if n % (s * s) == 0)
    return n // (side * side), d, side, side


def _sync(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock time covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], None], device: torch.device) -> float:
    """Wall-clock milliseconds of one call of fn, kernels included."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def peak_extra_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes of tensors allocated by one call of fn above what was live before it.

    CUDA: torch.cuda.max_memory_allocated. CPU: torch.profiler with profile_memory=True, as the maximum of the
    running sum of the allocation and free events (in bytes) of the exported trace, in time order.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory(prefix="vaeflow-bench-") as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    deltas = sorted((e["ts"], e["args"]["Bytes"]) for e in events if e.get("name") == "[memory]")
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


def implementations(n: int, k: int, d: int, device: torch.device
                    ) -> tuple[dict[str, Callable[[], None]], Callable[[], None]]:
    """One forward+backward (or the floor's forward) per implementation, on shared z_e (B, D, h, w) and codes,
    and a reset() that drops the gradients they leave behind."""
    generator = torch.Generator().manual_seed(SEED)
    shape = grid_shape(n, d)
    z_e = torch.randn(shape, generator=generator).to(device).requires_grad_()  # (B, D, h, w)
    g = torch.randn(shape, generator=generator).to(device)  # (B, D, h, w) upstream gradient
    b, _, h, w = shape
    torch.manual_seed(SEED)
    quantizers = {cls.name: cls(cls.Options(codebook_size=k), d).to(device).train() for cls in (VQ, EMAVQ)}

    def train_step(name: str) -> Callable[[], None]:
        quantizer = quantizers[name]

        def step() -> None:
            out = quantizer(z_e)
            loss = sum(out.losses.values()) + (out.quantized * g).sum()
            loss.backward()

        return step

    train_step("vq-ema")()  # first call: k-means initialises the codebook the floor and broadcast share
    codebook = quantizers["vq-ema"].codebook.detach().clone()  # (K, D)
    flat_fixed = z_e.detach().permute(0, 2, 3, 1).reshape(n, d).contiguous()  # (N, D), the floor's input
    beta = quantizers["vq-ema"].options.commitment

    @torch.no_grad()
    def floor() -> None:
        torch.addmm(codebook.pow(2).sum(1), flat_fixed, codebook.t(), alpha=-2.0).argmin(1)  # (N, K) -> (N,)

    def broadcast() -> None:
        flat = z_e.permute(0, 2, 3, 1).reshape(n, d)  # (N, D)
        with torch.no_grad():  # argmin has no gradient anyway
            indices = (flat[:, None] - codebook[None]).pow(2).sum(-1).argmin(1)  # (N, K, D) -> (N,)
        codes = codebook[indices]  # (N, D)
        quantized = flat + (codes - flat).detach()  # straight-through
        loss = beta * F.mse_loss(flat, codes) + (quantized.view(b, h, w, d).permute(0, 3, 1, 2) * g).sum()
        loss.backward()

    def reset() -> None:
        """Drop the gradients of the previous call (outside what is timed and measured)."""
        z_e.grad = None
        quantizers["vq"].zero_grad(set_to_none=True)

    fns = {"vq": train_step("vq"), "vq-ema": train_step("vq-ema"), "floor": floor, "broadcast": broadcast}
    return fns, reset


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or the platform's machine type where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def malloc_settings() -> dict[str, str]:
    """The glibc allocator settings in the environment (MALLOC_*, GLIBC_TUNABLES); {} means glibc defaults."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}


def bench_quantizer(out: str | Path, n: int = 32768, k: int = 512, d: int = 64, repeats: int = 5,
                    threads: int | None = None, device: str = "cpu") -> dict:
    """Time and measure the four implementations at N vectors, K codes, D dims; write the JSON report to `out`."""
    dev = torch.device(device)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        load_before = os.getloadavg()
        fns, reset = implementations(n, k, d, dev)
        for fn in fns.values():  # warm-up: one unrecorded call each (vq-ema had its k-means call already)
            reset()
            fn()
        broadcast_repeats = min(repeats, BROADCAST_REPEATS)
        raw: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
        for r in range(repeats):
            order = IMPLEMENTATIONS[r % 4:] + IMPLEMENTATIONS[:r % 4]  # rotate who goes first
            for name in order:
                if name == "broadcast" and r >= broadcast_repeats:
                    continue
                reset()
                raw[name].append(round(time_ms(fns[name], dev), 4))
        memory = {}
        for name in IMPLEMENTATIONS:
            reset()
            memory[name] = peak_extra_bytes(fns[name], dev)
        load_after = os.getloadavg()
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)

    median = {name: statistics.median(values) for name, values in raw.items()}
    ratios = {
        "vq_ema_over_floor": median["vq-ema"] / median["floor"],
        "vq_over_floor": median["vq"] / median["floor"],
        "broadcast_over_vq_ema": median["broadcast"] / median["vq-ema"],
    }
    memory_max = 4 * n * k * 4
    b, _, h, w = grid_shape(n, d)
    result = {
        "benchmark": "quantizer forward+backward (vaeflow bench_quantizer)",
        "config": {
            "n": n, "k": k, "d": d, "z_e_shape": [b, d, h, w], "dtype": "float32", "mode": "training",
            "repeats": repeats, "broadcast_repeats": broadcast_repeats,
            "order": "interleaved repeat by repeat, starting implementation rotating each repeat",
            "loss": "sum(out.losses.values()) + (quantized * g).sum(), then backward (floor: forward only)",
            "quantizer_options": "defaults (K = k, beta 0.25, decay 0.99, restart_after 100, euclidean)",
            "warmup": "one unrecorded call of each implementation before timing; the first vq and vq-ema calls "
                      "(k-means initialisation of the codebook) are excluded; floor and broadcast use vq-ema's "
                      "k-means codebook",
            "broadcast": "distances under torch.no_grad (argmin has no gradient), straight-through, commitment "
                         f"loss, backward; run {broadcast_repeats} of the {repeats} repeats, being slow",
        },
        "environment": {
            "torch": torch.__version__, "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
            "threads": used_threads, "interop_threads": torch.get_num_interop_threads(),
            "cpu_count": os.cpu_count(), "malloc_env": malloc_settings(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
            "python": platform.python_version(),
        },
        "median_ms": median,
        "raw_ms": raw,
        "ratios": ratios,
        "memory_method": (
            "torch.cuda.max_memory_allocated minus memory_allocated before the call" if dev.type == "cuda" else
            "torch.profiler(profile_memory=True) on one call after the timings: maximum of the running sum of its "
            "[memory] allocation/free events (bytes of tensors from the c10 CPU allocator, in time order); counts "
            "every tensor the call allocates, gradients included, nothing live before it"),
        "peak_extra_bytes": memory,
        "targets": {
            "vq_ema_over_floor_max": TARGET_VQ_EMA_OVER_FLOOR,
            "broadcast_over_vq_ema_min": TARGET_BROADCAST_OVER_VQ_EMA,
            "peak_extra_bytes_max": memory_max, "peak_extra_bytes_formula": "4 * N * K * 4 bytes",
        },
        "pass": {
            "vq_ema_over_floor": ratios["vq_ema_over_floor"] <= TARGET_VQ_EMA_OVER_FLOOR,
            "broadcast_over_vq_ema": ratios["broadcast_over_vq_ema"] >= TARGET_BROADCAST_OVER_VQ_EMA,
            "vq_ema_peak_extra_bytes": memory["vq-ema"] <= memory_max,
            "vq_peak_extra_bytes": memory["vq"] <= memory_max,
        },
        "notes": [
            "The floor allocates a fresh (N, K) float32 distance matrix every call; glibc hands blocks that large "
            "back to the OS when freed and page-faults them in again on the next call, and that cost is part of the "
            "floor. vq and vq-ema write distances chunk by chunk into one reused (rows, K) buffer of at most "
            "4 MiB on the CPU, so they can come out below the floor.",
            "The machine may be shared; load_average_before/after show how busy it was.",
        ],
    }
    write_text(out, json.dumps(result, indent=2) + "\n")
    return result


def print_summary(result: dict) -> None:
    """Print medians, ratios against their targets, and peak extra memory."""
    env, cfg = result["environment"], result["config"]
    print(f"quantizer bench: N={cfg['n']} K={cfg['k']} D={cfg['d']} on {env['device']} "
          f"({env['threads']} threads, torch {env['torch']}, malloc env {env['malloc_env'] or 'default'})")
    for name in IMPLEMENTATIONS:
        mib = result["peak_extra_bytes"][name] / 2**20
        runs = len(result["raw_ms"][name])
        print(f"  {name:<10} {result['median_ms'][name]:>10.2f} ms median of {runs}   peak extra {mib:>9.1f} MiB")
    targets, passed = result["targets"], result["pass"]
    ratios = result["ratios"]
    print(f"  vq-ema / floor     {ratios['vq_ema_over_floor']:.3f} (target <= {targets['vq_ema_over_floor_max']}: "
          f"{'pass' if passed['vq_ema_over_floor'] else 'FAIL'})")
    print(f"  vq / floor         {ratios['vq_over_floor']:.3f}")
    print(f"  broadcast / vq-ema {ratios['broadcast_over_vq_ema']:.1f} (target >= "
          f"{targets['broadcast_over_vq_ema_min']}: {'pass' if passed['broadcast_over_vq_ema'] else 'FAIL'})")
    limit = targets["peak_extra_bytes_max"] / 2**20
    print(f"  peak extra memory <= {limit:.1f} MiB: vq-ema {'pass' if passed['vq_ema_peak_extra_bytes'] else 'FAIL'}, "
          f"vq {'pass' if passed['vq_peak_extra_bytes'] else 'FAIL'}")
