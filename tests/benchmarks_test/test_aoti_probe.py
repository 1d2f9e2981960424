"""benchmarks.aoti_probe on the CPU, where AOTInductor works: a setting's toy package compiles,
loads and matches eager, and the report says so."""

from __future__ import annotations

import json

import pytest

from benchmarks import aoti_probe


def test_a_working_setting_reports_ok(tmp_path):
    out = tmp_path / "probe.json"
    assert aoti_probe.main(["--json", str(out), "--device", "cpu", "--settings", "same-process"]) == 0
    report = json.loads(out.read_text())
    result = report["settings"]["same-process"]
    assert result["outcome"] == "ok" and result["compiled"] and result["exit"] == 0
    assert report["environment"]["torch"].startswith("2.")


def test_unknown_setting_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        aoti_probe.main(["--json", str(tmp_path / "j"), "--settings", "warp-speed"])
