"""The quantizer benchmark at tiny sizes: the report's structure and its internal consistency (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from vaeflow.pipelines.bench_quantizer import IMPLEMENTATIONS, bench_quantizer, grid_shape, print_summary


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One tiny run: (returned dict, the JSON written to disk)."""
    out = tmp_path_factory.mktemp("bench") / "quantizer.json"
    result = bench_quantizer(out, n=512, k=16, d=8, repeats=1)
    return result, json.loads(out.read_text())


def test_report_is_written_and_has_every_section(report):
    result, written = report
    assert written == result
    assert {"config", "environment", "median_ms", "raw_ms", "ratios", "memory_method", "peak_extra_bytes",
            "targets", "pass", "notes"} <= set(written)
    assert written["config"]["z_e_shape"] == [2, 8, 16, 16]  # B*h*w = 512
    assert (written["config"]["n"], written["config"]["k"], written["config"]["d"]) == (512, 16, 8)
    env = written["environment"]
    assert {"torch", "device", "threads", "malloc_env"} <= set(env) and env["device"] == "cpu"
    assert isinstance(written["memory_method"], str) and written["memory_method"]


def test_every_implementation_has_raw_values_and_their_median(report):
    _, written = report
    assert set(written["raw_ms"]) == set(written["median_ms"]) == set(written["peak_extra_bytes"]) \
        == set(IMPLEMENTATIONS)
    for name in IMPLEMENTATIONS:
        raw = written["raw_ms"][name]
        assert len(raw) == 1 and all(v > 0 for v in raw)
        assert written["median_ms"][name] == pytest.approx(sorted(raw)[len(raw) // 2])
        assert isinstance(written["peak_extra_bytes"][name], int) and written["peak_extra_bytes"][name] >= 0
    assert written["config"]["broadcast_repeats"] == 1


def test_ratios_are_ratios_of_the_reported_medians(report):
    _, written = report
    median, ratios = written["median_ms"], written["ratios"]
    assert ratios["vq_ema_over_floor"] == pytest.approx(median["vq-ema"] / median["floor"], rel=1e-12)
    assert ratios["vq_over_floor"] == pytest.approx(median["vq"] / median["floor"], rel=1e-12)
    assert ratios["broadcast_over_vq_ema"] == pytest.approx(median["broadcast"] / median["vq-ema"], rel=1e-12)


def test_pass_flags_follow_the_targets(report):
    _, written = report
    targets, passed, ratios = written["targets"], written["pass"], written["ratios"]
    assert targets["peak_extra_bytes_max"] == 4 * 512 * 16 * 4
    assert passed["vq_ema_over_floor"] == (ratios["vq_ema_over_floor"] <= targets["vq_ema_over_floor_max"])
    assert passed["broadcast_over_vq_ema"] == (ratios["broadcast_over_vq_ema"] >= targets["broadcast_over_vq_ema_min"])
    memory, limit = written["peak_extra_bytes"], targets["peak_extra_bytes_max"]
    assert passed["vq_ema_peak_extra_bytes"] == (memory["vq-ema"] <= limit)
    assert passed["vq_peak_extra_bytes"] == (memory["vq"] <= limit)


def test_broadcast_memory_holds_the_n_k_d_temporary(report):
    _, written = report
    assert written["peak_extra_bytes"]["broadcast"] >= 512 * 16 * 8 * 4  # (N, K, D) float32, an independent bound


def test_grid_shape_covers_n():
    for n in (1, 512, 1000, 32768):
        b, d, h, w = grid_shape(n, 3)
        assert b * h * w == n and d == 3 and h == w


def test_print_summary(report, capsys):
    print_summary(report[0])
    text = capsys.readouterr().out
    assert "vq-ema / floor" in text and "broadcast" in text
