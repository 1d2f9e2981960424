"""The terminal table and the headline: formatting only, on made-up results."""

from __future__ import annotations

from benchmarks.report import (
    fmt_bytes, fmt_checks, fmt_ratio, fmt_seconds, fmt_stat, format_table, one_line, render,
)
from benchmarks.stats import STAGES
from benchmarks.suite_summary import summarize_json


def test_units():
    assert fmt_seconds(0.0123) == "12.3 ms"
    assert fmt_seconds(81.6) == "81.60 s"
    assert fmt_seconds(None) == "-"
    assert fmt_bytes(4.7 * 2**30) == "4.70 GiB"
    assert fmt_ratio(0.6512) == "0.65x"
    assert fmt_ratio(None) == "-"
    assert fmt_stat({"median": 2.0, "spread": 0.034}) == "2.00 s ±3%"


def test_checks_show_the_worst_error_and_any_failure():
    good = {"unet": {"rel_err": 1e-3, "finite": True, "ok": True},
            "vae_decode": {"rel_err": 4e-3, "finite": True, "ok": True}}
    assert fmt_checks(good) == "max 4.0e-03 ok"
    bad = good | {"text_encoder": {"rel_err": float("nan"), "finite": False, "ok": False}}
    assert fmt_checks(bad) == "max inf FAILED"
    assert fmt_checks({}) == "-"


def test_table_columns_line_up():
    out = format_table(["stage", "ours"], [["unet step", "2.50 s"], ["end to end", "53.00 s"]])
    lines = out.splitlines()
    assert lines[0] == "stage       ours"
    assert lines[1] == "----------  -------"
    assert lines[3].index("53.00 s") == lines[0].index("ours")


def contender(label, scale, rss):
    return {
        "label": label,
        "stages": {s: {"median": scale * (i + 1), "min": scale, "max": scale * (i + 2), "n": 3, "spread": 0.01}
                   for i, s in enumerate(STAGES)},
        "overhead": {"seconds": {"median": 0.05}, "fraction": {"median": 0.004}},
        "images_per_s": 1 / (5 * scale), "load_s": 3.0, "peak_rss_bytes": rss,
        "utilisation": {"unet_flops_per_s": 1.2e11, "fraction_of_ceiling": 0.6},
    }


def results():
    return {
        "config": {"width": 256, "height": 256, "steps": 20, "guidance": 7.5, "sampler": "dpmpp_2m_karras",
                   "batch": 1, "device": "cpu", "threads": 2, "repeats": 3},
        "baseline": "diffusers",
        "contenders": {
            "ours": contender("ldm-deploy onnxruntime fp32", 1.0, 3 * 2**30),
            "diffusers": contender("diffusers fp32 eager", 2.0, 4 * 2**30),
            "compile:max-autotune": {"error": "timed out after 300 s (time budget)"},
        },
        "ratios": {"ours": {s: 0.5 for s in STAGES} | {"peak_rss_bytes": 0.75, "load_s": 1.0,
                                                        "images_per_s": 2.0, "device_peak_bytes": None}},
    }


def test_render_has_headline_table_ratios_and_failures():
    out = render(results())
    assert out.splitlines()[0].startswith("ldm-bench: 256x256, 20 steps, guidance 7.5, dpmpp_2m_karras, batch 1, cpu, 2 threads")
    assert "ours vs diffusers: end to end 0.50x the time (2.00x as fast), peak RSS 0.75x" in out
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "ours/diffusers" in rows["stage"]
    assert rows["loop (20 steps)"].split()[-1] == "0.50x"
    assert "runtime overhead" in rows and "50.0 ms (0.4%)" in rows["runtime overhead"]
    assert "U-Net FLOP/s (of matmul peak)" in out and "120 GFLOP/s (60%)" in out
    assert "device memory peak" not in out  # no contender has one: the row is left out
    assert "compile:max-autotune: not measured: timed out after 300 s" in out


def test_render_without_a_measured_baseline_still_lists_the_rest():
    r = results()
    r["contenders"]["diffusers"] = {"error": "exit code 1: ImportError"}
    r["ratios"] = {}
    out = render(r)
    assert "ours/diffusers" not in out
    assert "diffusers: not measured: exit code 1" in out
    assert "ldm-deploy onnxruntime fp32" in out


def test_one_line_summaries_for_logs_that_may_be_cut_short():
    r = results()
    assert one_line("ours", r["contenders"]["ours"]) == (
        "ours: unet step 2.00 s, end to end 5.00 s, peak RSS 3.00 GiB")
    assert one_line("compile:max-autotune", r["contenders"]["compile:max-autotune"]) == (
        "compile:max-autotune: not measured: timed out after 300 s (time budget)")


def test_suite_summary_tabulates_a_report_it_does_not_own():
    data = {"device": "NVIDIA H200", "dtype": "fp16",
            "rows": [{"name": "sd1 self 4096x40", "us": 181.74, "shape": [2, 8, 4096, 40], "extra": {"a": 1}},
                     {"name": "sd1 cross 4096x40", "us": 12.1, "shape": [2, 8, 4096, 40], "extra": {}}]}
    out = summarize_json(data).splitlines()
    assert out[:2] == ["device: NVIDIA H200", "dtype: fp16"]
    assert out[3].split() == ["name", "us", "shape"]  # nested dicts are left out of the table
    assert out[5].split() == ["sd1", "self", "4096x40", "181.7", "2x8x4096x40"]
