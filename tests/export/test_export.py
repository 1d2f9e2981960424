"""ldm-export: what the engine directory holds, and that it appears whole or not at all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from ldm_deploy.engine.manifest import COMPONENTS, FORMAT_VERSION, read_manifest, sha256_file
from ldm_deploy.engine.spec import component_specs
from ldm_deploy.export import onnx_export
from ldm_deploy.export.build import export_engine
from ldm_deploy.export.config import ExportConfig


def test_manifest_records_model_facts(engine_dirs):
    m1 = read_manifest(engine_dirs["tiny-sd1"])
    m2 = read_manifest(engine_dirs["tiny-sd2"])
    assert m1.format_version == FORMAT_VERSION
    assert (m1.model.family, m1.model.prediction_type, m1.model.text_width) == ("sd1", "epsilon", 32)
    assert (m2.model.family, m2.model.prediction_type, m2.model.text_width) == ("sd2", "v_prediction", 48)
    assert m1.model.vae_scaling_factor == pytest.approx(0.18215)
    assert m1.model.noise_schedule.steps_offset == 1 and m1.model.noise_schedule.beta_schedule == "scaled_linear"
    assert m1.dims["latent_height"].to_list() == [8, 16, 64]  # 64..512 px, tuned for 128
    assert m1.dims["cfg"].to_list() == [1, 2, 2]
    assert m1.backend == "onnxruntime" and m1.precision == "fp32"
    assert {"torch", "diffusers", "onnx", "ldm_deploy"} <= set(m1.tools)
    assert m1.tokenizer_pad_id == 49407 and m2.tokenizer_pad_id == 0  # SD 2 pads with "!"
    for comp in COMPONENTS + ("tokenizer",):
        for name, rec in m1.files[comp].items():
            assert sha256_file(engine_dirs["tiny-sd1"] / name) == rec["sha256"]


def test_onnx_graphs_follow_the_specs(engine_dirs):
    m = read_manifest(engine_dirs["tiny-sd1"])
    specs = component_specs(m.model.facts)
    for comp in COMPONENTS:
        g = onnx.load(str(engine_dirs["tiny-sd1"] / f"{comp}.onnx"), load_external_data=False).graph
        spec = specs[comp]
        assert [i.name for i in g.input] == [t.name for t in spec.inputs]
        assert [o.name for o in g.output] == [t.name for t in spec.outputs]
        for vi, t in zip(list(g.input) + list(g.output), spec.inputs + spec.outputs):
            dims = vi.type.tensor_type.shape.dim
            for axis, want in enumerate(t.shape):
                if isinstance(want, int):
                    assert dims[axis].dim_value == want, (comp, t.name, axis)
                else:
                    assert dims[axis].dim_param, (comp, t.name, axis)  # symbolic


def test_tokenizer_matches_transformers(engine_dirs, model_dirs, caplog):
    from transformers import CLIPTokenizer

    from ldm_deploy.engine.tokenizer import PromptTokenizer

    long = "a photo of an astronaut riding a horse, highly detailed, " * 8 + "on the moon"
    prompts = ["a photo of an astronaut", "", "Héllo  WORLD!! (masterpiece:1.2)", long]
    for p in ("tiny-sd1", "tiny-sd2"):
        ref = CLIPTokenizer.from_pretrained(model_dirs[p] / "tokenizer")
        ours = PromptTokenizer(engine_dirs[p] / "tokenizer.json", 77)
        want = ref(prompts, padding="max_length", max_length=77, truncation=True).input_ids
        assert ours(prompts)[0][:, 0].tolist() == want  # one chunk: cut as diffusers cuts
    assert "chunks of 75 tokens" in caplog.text and "this engine takes 1" in caplog.text and "moon" in caplog.text


def test_large_graphs_use_one_external_data_file(model_dirs, tmp_path, monkeypatch):
    # Lower the 2 GiB protobuf limit so that a tiny model takes the large-model path.
    monkeypatch.setattr(onnx_export, "PROTO_LIMIT", 1000)
    out = export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "e", ExportConfig(min_size=64, max_size=128))
    m = read_manifest(out)
    assert set(m.files["unet_step"]) == {"unet_step.onnx", "unet_step.onnx.data"}
    from ldm_deploy import Pipeline

    images = Pipeline.load(out)("x", steps=1, width=64, height=64, seed=0, output_type="np", progress=False)
    assert images.shape == (1, 64, 64, 3)


def test_weights_in_files_of_their_own_are_gathered_into_one(tmp_path):
    """What the exporter writes for graphs over 2 GiB: each tensor in a file of its own (one of
    them a Constant node's value). Gathered into one data file, the graph computes the same."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    c = rng.standard_normal((32,)).astype(np.float32) * 100
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(c, "c")),
         helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "c"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])], [numpy_helper.from_array(w, "w")])
    raw = tmp_path / "raw"
    raw.mkdir()
    onnx.save_model(helper.make_model(graph), str(raw / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True)
    assert len(list(raw.iterdir())) == 3  # the graph, w, c

    model = onnx.load(str(raw / "m.onnx"), load_external_data=False)
    assert onnx_export.weight_bytes(model.graph, raw) == w.nbytes + c.nbytes
    out = tmp_path / "out"
    out.mkdir()
    onnx_export.gather_weights(model.graph, raw, out / "m.onnx.data")
    onnx.save_model(model, str(out / "m.onnx"))
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert (out / "m.onnx.data").stat().st_size == w.nbytes + c.nbytes

    x = rng.standard_normal((2, 64)).astype(np.float32)
    got = ort.InferenceSession(str(out / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ w + c, rtol=1e-5, atol=1e-4)


def test_failed_export_leaves_nothing(model_dirs, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export.torch.onnx, "export", boom)
    with pytest.raises(KeyboardInterrupt):
        export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "e", ExportConfig())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_export_process_leaves_nothing(signum, code, model_dirs, tmp_path):
    """Ctrl-C, or SIGTERM (kill, timeout, docker stop), in the middle of a real ldm-export run."""
    out = tmp_path / "engine"
    p = subprocess.Popen(
        [sys.executable, "-m", "ldm_deploy.cli.export", "--model", str(model_dirs["tiny-sd1"]), "--out", str(out)],
        stderr=subprocess.PIPE, text=True,
        # A shell without job control starts background jobs with SIGINT ignored, and Python then
        # never raises KeyboardInterrupt: give the child the default disposition, as a terminal does.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # Wait until it is exporting components, then interrupt.
    for line in p.stderr:
        if "tracing to ONNX" in line:
            break
    time.sleep(0.2)
    p.send_signal(signum)
    rest = p.stderr.read()
    assert p.wait(timeout=60) == code
    assert "Traceback" not in rest
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="the partial directories' locks are POSIX's flock")
def test_a_killed_exports_partial_directory_is_removed_by_the_next(tmp_path):
    """SIGKILL leaves a partial directory no handler removes; the next export of that --out removes
    those whose lock no process holds, and no other: a running export's (its lock held, here by
    this process: any machine's or container's on a shared disk), one without a lock file (older),
    another --out's."""
    import fcntl

    from ldm_deploy.export.engine_dir import LOCK, staging_dir

    names = ("killed", "running", "older", "other")
    folders = {k: tmp_path / (".engine2.partial-1" if k == "other" else f".engine.partial-{k}") for k in names}
    for key, folder in folders.items():
        folder.mkdir()
        if key != "older":
            (folder / LOCK).write_text("")
    with open(folders["running"] / LOCK) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with staging_dir(tmp_path / "engine", force=False) as tmp:
            assert (tmp / LOCK).is_file()  # its own, held while it writes
            (tmp / "manifest.json").write_text("{}")
    assert {p.name for p in tmp_path.iterdir()} == {"engine"} | {folders[k].name for k in names if k != "killed"}
    assert [p.name for p in (tmp_path / "engine").iterdir()] == ["manifest.json"]  # the lock left behind


def children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from Linux's /proc")
def test_interrupted_parallel_torch_export_stops_its_workers(model_dirs, tmp_path):
    """Ctrl-C while torch components compile in worker processes: the workers are stopped, not
    left compiling, and nothing is written."""
    out = tmp_path / "engine"
    p = subprocess.Popen(
        [sys.executable, "-m", "ldm_deploy.cli.export", "--model", str(model_dirs["tiny-sd1"]), "--out", str(out),
         "--backend", "torch", "--jobs", "2", "--no-img2img", "--min-size", "64", "--max-size", "128"],
        stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in p.stderr:
        if "at a time, each in its own process" in line:
            break
    deadline = time.monotonic() + 60
    while len(workers := children(p.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # the workers are loading the model or compiling
    p.send_signal(signal.SIGINT)  # to the parent alone, as `kill -INT` does
    rest = p.stderr.read()
    assert p.wait(timeout=60) != 0
    assert "Traceback" not in rest
    assert "compiled in" not in rest  # no worker went on to finish its component (each takes 10 s+)
    deadline = time.monotonic() + 15  # terminated processes take a moment to go
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert workers and not any(alive(w) for w in workers)
    assert list(tmp_path.iterdir()) == []


def test_manifest_is_plain_json(engine_dirs):
    d = json.loads((engine_dirs["tiny-sd1"] / "manifest.json").read_text())
    assert d["format_version"] == FORMAT_VERSION and d["tokenizer"]["file"] == "tokenizer.json"


def test_heartbeat_logs_while_a_long_step_runs(caplog):
    import logging

    from ldm_deploy.export.build import heartbeat

    with caplog.at_level(logging.INFO, logger="ldm_deploy.export.build"):
        with heartbeat("unet_step: still working", every=0.05):
            time.sleep(0.3)
        beats = caplog.text.count("unet_step: still working")
        time.sleep(0.15)
    assert beats >= 3
    assert caplog.text.count("unet_step: still working") == beats  # stops with the block


def test_inpainting_model_exports_its_vae_encoder_and_other_conditioned_models_are_refused(tmp_path, caplog):
    """An inpainting U-Net (2C + 1 channels in) is exported with the mask inputs and its VAE
    encoder even under --no-img2img (every step needs the masked image's latents); a U-Net of
    other channels (a depth model's 5) is named and refused."""
    import logging

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ldm_deploy.errors import ModelSourceError
    from ldm_deploy.export import random_model
    from ldm_deploy.export.source import load_source

    folder = random_model.make_random_model(tmp_path / "inpainting", "tiny-sd1", seed=2, inpainting=True)
    with caplog.at_level(logging.WARNING):
        out = export_engine(str(folder), tmp_path / "engine", ExportConfig(min_size=64, max_size=64, img2img=False))
    assert "exporting its VAE encoder despite --no-img2img" in caplog.text
    manifest = read_manifest(out)
    assert "vae_encoder" in manifest.files and manifest.model.inpainting
    assert [t.name for t in manifest.specs()["unet_step"].inputs][-2:] == ["mask", "image_latents"]

    torch.manual_seed(0)
    depth = tmp_path / "depth"
    unet = UNet2DConditionModel(**{**random_model.unet_config("tiny-sd1"), "in_channels": 5})
    random_model.save_diffusers_folder(depth, unet, AutoencoderKL(**random_model.vae_config("tiny-sd1")),
                                       CLIPTextModel(random_model.text_config("tiny-sd1")),
                                       random_model.tokenizer("tiny-sd1"), random_model.PRESETS["tiny-sd1"]["scheduler"])
    with pytest.raises(ModelSourceError, match="takes 5 channels but the VAE makes 4.*depth models are not"):
        load_source(str(depth))
