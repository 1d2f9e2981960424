"""`ldm-serve` as a user starts it: it listens, answers, and on SIGTERM finishes and exits 0;
its mistakes are one line and exit 2."""

from __future__ import annotations

import queue
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
from serve_http import call

from ldm_deploy.cli.serve import main

SERVE = [sys.executable, "-m", "ldm_deploy.cli.serve"]


def test_serves_then_stops_on_sigterm(engine_dirs):
    proc = subprocess.Popen([*SERVE, "--engine", str(engine_dirs["tiny-sd1"]), "--port", "0", "--no-verify",
                             "--vae-tile-size", "32"], stderr=subprocess.PIPE, text=True)  # (tiles of the 128 px images)
    lines = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, proc.stderr), lines.put(None)], daemon=True).start()
    try:
        seen = []
        while not any("serving" in line for line in seen):
            seen.append(lines.get(timeout=120))  # a server that never starts fails here, not hangs
        url = re.search(r"http://[\d.]+:\d+", "".join(seen)).group(0)
        status, answer, _ = call(url + "/sdapi/v1/txt2img", "POST", {"prompt": "a cat", "steps": 2, "seed": 1})
        assert status == 200 and len(answer["images"]) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    while (line := lines.get(timeout=60)) is not None:  # to the end of its log
        seen.append(line)
    log = "".join(seen)
    assert "stopped after 1 requests" in log and "POST /sdapi/v1/txt2img 200" in log


@pytest.mark.parametrize("args,match", [
    (["--api-auth", "nopassword"], "USER:PASS"), (["--port", "70000"], "--port"), (["--queue-size", "0"], "queue-size"),
    (["--engine", "/nonexistent"], "nonexistent"),
    (["--styles-file", "/nonexistent/styles.csv"], "cannot read the styles file /nonexistent/styles.csv"),
])
def test_mistakes(args, match, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm-serve: error:") and match in err and "Traceback" not in err


def test_port_in_use(engine_dirs, capsys, caplog):
    """Said before the engine loads (minutes for a large one)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--engine", str(engine_dirs["tiny-sd1"]), "--port", str(port), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err
    assert "loaded" not in caplog.text + err


def test_model_options_with_engines_are_refused(engine_dirs, capsys):
    engines = ["--engine", str(engine_dirs["tiny-sd1"]), "--engine", str(engine_dirs["tiny-sd2"])]
    assert main([*engines, "--lora", "x.safetensors"]) == 2
    assert "--lora" in capsys.readouterr().err


def test_a_bad_vae_tile_is_said(engine_dirs, capsys):
    assert main(["--engine", str(engine_dirs["tiny-sd1"]), "--port", "0", "--no-verify", "--vae-tiling",
                 "--vae-tile-size", "20"]) == 2
    err = capsys.readouterr().err
    assert "the VAE tile size must be a whole number of pixels, a multiple of 32" in err and "Traceback" not in err


def test_a_damaged_default_engine_is_said(engine_dirs, tmp_path, capsys):
    import shutil

    engine = shutil.copytree(engine_dirs["tiny-sd1"], tmp_path / "engine")
    data = (engine / "unet_step.onnx").read_bytes()
    (engine / "unet_step.onnx").write_bytes(data[: len(data) // 2])
    assert main(["--engine", str(engine), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "ldm-serve: error: the engine tiny-sd1 cannot be loaded" in err and "truncated" in err
    assert "as it starts" in err and "Traceback" not in err and err.count("cannot be loaded") == 1  # (said once)
