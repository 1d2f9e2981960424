"""ldm-bench end to end on a tiny engine and its source model: one repeat, real processes, valid
JSON with every stage and ratio, a PNG chart. No timing is asserted: only that it was measured."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.stats import STAGES
from ldm_deploy.cli import bench as bench_cli


def test_cli_measures_ours_and_diffusers_and_writes_json_and_chart(engine_dirs, model_dirs, tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = bench_cli.main([
        "--engine", str(engine_dirs["tiny-sd1"]), "--model", str(model_dirs["tiny-sd1"]),
        "--width", "64", "--height", "64", "--steps", "2", "--warmup-steps", "1", "--repeats", "1",
        "--threads", "1", "--json", str(out_json), "--chart", str(out_png),
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err

    results = json.loads(out_json.read_text())
    assert results["schema"] == "ldm-bench/1"
    assert results["baseline"] == "diffusers"
    assert results["config"]["repeats"] == 1 and results["config"]["threads"] == 1
    for name in ("ours", "diffusers"):
        c = results["contenders"][name]
        assert list(c["stages"]) == list(STAGES)
        for stat in c["stages"].values():
            assert stat["n"] >= 1 and stat["min"] <= stat["median"] <= stat["max"] and stat["median"] > 0
        assert c["stages"]["unet_step"]["n"] == 2  # one sample per step of the one timed call
        assert math.isfinite(c["overhead"]["seconds"]["median"])
        assert c["images_per_s"] > 0 and c["load_s"] > 0 and c["peak_rss_bytes"] > 2**20
        assert c["samples"]["runs"][0]["end_to_end"] == c["stages"]["end_to_end"]["median"]
    ratios = results["ratios"]["ours"]
    assert set(STAGES) <= set(ratios) and all(ratios[s] > 0 for s in STAGES)
    assert ratios["peak_rss_bytes"] > 0
    assert results["unet_flops_per_step"] > 0 and results["ceiling"]["flops_per_s"] > 0
    assert results["machine"]["logical_cpus"] >= 1

    with Image.open(out_png) as im:
        assert im.format == "PNG" and im.width > 800 and im.height > 300
    assert "ours vs diffusers: end to end" in captured.out
    assert "peak RSS" in captured.out


def test_cli_refuses_bad_input_before_measuring(tmp_path, capsys):
    code = bench_cli.main(["--contenders", "ours,diffusers", "--model", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "ldm-bench: error: contender 'ours' needs --engine" in err
    assert "Traceback" not in err
    code = bench_cli.main(["--contenders", "diffusers", "--model", str(tmp_path), "--json", str(tmp_path / "no" / "x.json")])
    assert code == 2 and "does not exist" in capsys.readouterr().err

    for flag, path, message in [("--json", str(tmp_path), "is a folder; give a file name"),
                                ("--chart", str(tmp_path / "c.txt"), "charts are written as .png, .svg, .pdf")]:
        code = bench_cli.main(["--contenders", "diffusers", "--model", str(tmp_path), flag, path])
        assert code == 2 and message in capsys.readouterr().err



def test_a_size_outside_the_engines_range_is_refused_before_measuring(engine_dirs, model_dirs, capsys):
    code = bench_cli.main(["--engine", str(engine_dirs["tiny-sd1"]), "--model", str(model_dirs["tiny-sd1"]),
                           "--width", "2048", "--height", "64", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--width 2048 is outside this engine's range" in err and "diffusers" not in err


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="writes into Linux's /proc, which no one can")
def test_an_unwritable_chart_folder_is_refused_before_measuring(tmp_path, capsys):
    code = bench_cli.main(["--contenders", "diffusers", "--model", str(tmp_path), "--chart", "/proc/c.png"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write --chart /proc/c.png" in err and "Traceback" not in err


def test_console_script_is_installed_and_answers_help():
    out = subprocess.run([sys.executable, "-m", "ldm_deploy.cli.bench", "--help"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0 and "--engine" in out.stdout and "--chart" in out.stdout


def test_our_contender_never_imports_torch():
    """Its process's peak RSS must be the runtime's own, not torch's."""
    code = ("import sys, benchmarks.child, benchmarks.ours, ldm_deploy.engine.pipeline; "
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=bench_cli.benchmarks_root())
    assert out.stdout.split() == ["False", "False"]


def test_gpu_suite_script_parses():
    script = bench_cli.benchmarks_root() / "benchmarks" / "gpu_suite.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_rounds_take_turns_and_pool_the_samples(engine_dirs, model_dirs, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    code = bench_cli.main([
        "--engine", str(engine_dirs["tiny-sd1"]), "--contenders", "ours",  # (the baseline: the only one)
        "--width", "64", "--height", "64", "--steps", "2", "--warmup-steps", "1", "--repeats", "1",
        "--rounds", "2", "--threads", "1", "--json", str(out_json),
        "--sampler", "dpmpp_2s_a",  # (no diffusers contender has it: ours alone, as its refusal advises)
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "== ours (round 2/2)" in captured.err
    results = json.loads(out_json.read_text())
    c = results["contenders"]["ours"]
    assert results["baseline"] == "ours" and len(c["samples"]["runs"]) == 2  # one timed call per round
    assert c["stages"]["unet_step"]["n"] == 6  # two steps per call, three U-Net calls, two rounds


def test_warmup_0_and_guidance_1_are_said_and_unused_negatives_left_out(engine_dirs, tmp_path, capsys):
    """--warmup 0 times the first call (said); at guidance 1 the default negative prompt, which
    would do nothing (and be warned about), is left out."""
    out_json = tmp_path / "bench.json"
    code = bench_cli.main(["--engine", str(engine_dirs["tiny-sd1"]), "--contenders", "ours", "--width", "64",
                           "--height", "64", "--steps", "1", "--repeats", "1", "--warmup", "0", "--guidance", "1",
                           "--threads", "1", "--json", str(out_json)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "--warmup 0 times each contender's first call" in err and "negative prompt has no effect" not in err
    assert json.loads(out_json.read_text())["config"]["negative_prompt"] == ""


def test_pool_joins_samples_and_keeps_the_highest_peak():
    from benchmarks.bench import pool

    a = {"runs": [{"end_to_end": 1.0}], "unet_step": [0.1], "peak_rss_bytes": 5, "load_s": 2.0}
    b = {"runs": [{"end_to_end": 2.0}], "unet_step": [0.2], "peak_rss_bytes": 7, "load_s": 9.0}
    pooled = pool(a, b)
    assert pooled["runs"] == a["runs"] + b["runs"] and pooled["unet_step"] == [0.1, 0.2]
    assert pooled["peak_rss_bytes"] == 7 and pooled["load_s"] == 2.0
    assert pool(a, {"error": "exit code 1"}) == {"error": "exit code 1"}
