"""benchmarks.torch_variants on the CPU: each variant exported or loaded once, timed, and its
image compared with the default engine's."""

from __future__ import annotations

import json

import pytest

from benchmarks import torch_variants


def test_variants_are_timed_and_give_the_default_image(model_dirs, tmp_path):
    out = tmp_path / "variants.json"
    code = torch_variants.main(["--model", str(model_dirs["tiny-sd1"]), "--work", str(tmp_path / "work"),
                                "--json", str(out), "--device", "cpu", "--size", "64", "--steps", "2",
                                "--repeats", "1", "--variants", "channels-last"])  # default goes first
    report = json.loads(out.read_text())
    assert code == 0 and list(report["variants"]) == ["default", "channels-last"]
    variant = report["variants"]["channels-last"]
    assert variant["export_flags"] == ["--channels-last"] and variant["median_s"] > 0
    assert variant["vs_default"] == pytest.approx(variant["median_s"] / report["variants"]["default"]["median_s"])
    assert variant["image_vs_default"]["max_abs"] < 1e-4  # the same arithmetic, in another layout
    assert (tmp_path / "work" / "engine-channels-last" / "manifest.json").is_file()


def test_unknown_variant_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        torch_variants.main(["--model", "m", "--work", str(tmp_path), "--json", str(tmp_path / "j"),
                             "--variants", "warp-speed"])


def test_variants_combine_with_plus():
    flags, options = torch_variants.variant("compiled+channels-last")
    assert flags == ("--channels-last",) and options == {"compile": True}
    assert torch_variants.engine_name(flags) == "engine-channels-last"


def test_failed_and_timed_out_exports_are_reported(model_dirs, tmp_path):
    """An export that fails, or runs out of --timeout, becomes its variant's error (the run
    goes on and says so in its exit code); no export process is left behind."""
    out = tmp_path / "variants.json"
    code = torch_variants.main(["--model", str(tmp_path / "no-such-model"), "--work", str(tmp_path / "a"),
                                "--json", str(out), "--device", "cpu", "--variants", "default"])
    assert code == 1 and "export failed" in json.loads(out.read_text())["variants"]["default"]["error"]
    code = torch_variants.main(["--model", str(model_dirs["tiny-sd1"]), "--work", str(tmp_path / "b"),
                                "--json", str(out), "--device", "cpu", "--variants", "default", "--timeout", "1"])
    report = json.loads(out.read_text())
    assert code == 1 and report["variants"]["default"]["error"] == "export did not finish in 1 s"
