"""The openvino backend runs the ONNX engines: fp32 gives ONNX Runtime's images; bf16 (where the
CPU has bf16 units) computes in bf16 and stays close; options it does not have are clear errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ldm_deploy import Pipeline
from ldm_deploy.engine import backends
from ldm_deploy.errors import UserError

openvino = pytest.importorskip("openvino", reason="the openvino backend's tests need OpenVINO (in the test extra)")

KW = dict(seed=6, steps=4, width=96, height=64, sampler="dpmpp_2m_karras", output_type="np", progress=False,
          num_images=2, negative_prompt="fog")


def has_bf16() -> bool:
    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.fixture(scope="module")
def ov_fp32(engine_dirs):
    return Pipeline.load(engine_dirs["tiny-sd1"], backend="openvino")


def test_fp32_gives_onnxruntime_images(ov_fp32, pipelines):
    ours = ov_fp32("a windmill by a canal", **KW)
    np.testing.assert_allclose(ours, pipelines["tiny-sd1"]("a windmill by a canal", **KW), atol=1e-4, rtol=0)


def test_fp32_img2img_gives_onnxruntime_images(ov_fp32, pipelines):
    from PIL import Image

    ramp = np.linspace(0, 255, 64 * 96 * 3).reshape(64, 96, 3).astype(np.uint8)
    init = Image.fromarray(ramp)
    kw = KW | {"init_image": init, "strength": 0.6}
    np.testing.assert_allclose(ov_fp32("a windmill", **kw), pipelines["tiny-sd1"]("a windmill", **kw),
                               atol=1e-4, rtol=0)
    mask = np.zeros((64, 96), np.uint8)
    mask[10:50, 20:70] = 255  # inpainting: the kept part put back after every step
    kw = KW | {"init_image": init, "mask": mask}
    np.testing.assert_allclose(ov_fp32("a windmill", **kw), pipelines["tiny-sd1"]("a windmill", **kw),
                               atol=1e-4, rtol=0)


@pytest.mark.skipif(not has_bf16(), reason="this CPU has no bf16 arithmetic (Intel AMX or AVX512-BF16)")
def test_bf16_computes_in_bf16_and_stays_close(engine_dirs, ov_fp32):
    bf16 = Pipeline.load(engine_dirs["tiny-sd1"], backend="openvino", precision="bf16")
    a, b = bf16("a windmill by a canal", **KW), ov_fp32("a windmill by a canal", **KW)
    diff = float(np.abs(a - b).max())
    assert 0 < diff < 0.05  # not fp32 (the hint took effect), yet the same picture


def test_options_it_lacks_are_clear_errors(engine_dirs):
    with pytest.raises(UserError, match="unknown precision 'fp16'"):
        backends.create("openvino", precision="fp16")
    with pytest.raises(UserError, match="the torch backend has no option 'threads'"):
        backends.create("torch", threads=2)


def test_ldm_run_on_openvino(engine_dirs, tmp_path):
    out = tmp_path / "mill.png"
    run = [sys.executable, "-m", "ldm_deploy.cli.run", "a windmill", "--engine", str(engine_dirs["tiny-sd1"]),
           "--backend", "openvino", "--threads", "2", "--steps", "3", "--width", "64", "--height", "64",
           "--seed", "1", "--out", str(out), "-q"]
    for extra in ([], ["--static-shapes"]):
        done = subprocess.run(run + extra, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert out.stat().st_size > 0
        out.unlink()
    wrong = subprocess.run(run[:-3] + ["--backend", "onnxruntime", "--precision", "bf16", "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "--precision is a choice of the openvino backend" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_static_shapes_give_onnxruntime_images_and_recompile_per_size(engine_dirs, pipelines, caplog):
    """Static shapes: each component compiled for its call's exact sizes, and again when they
    change (another image size, guidance off); the images stay ONNX Runtime's."""
    import logging

    caplog.set_level(logging.INFO)
    ov = Pipeline.load(engine_dirs["tiny-sd1"], backend="openvino", static_shapes=True)
    ort = pipelines["tiny-sd1"]
    for kw in (KW, KW | {"width": 64, "height": 96, "num_images": 1, "guidance": 0}):
        np.testing.assert_allclose(ov("a windmill by a canal", **kw), ort("a windmill by a canal", **kw),
                                   atol=1e-4, rtol=0)
    compiles = caplog.text.count("unet_step: compiling for this call's sizes")
    assert compiles == 2  # once per size: none for the steps in between
    ov("a windmill by a canal", **KW)
    assert caplog.text.count("unet_step: compiling for this call's sizes") == 3  # back to the first size


def test_capture_plan_replays_the_pipelines_own_loops(ov_fp32, monkeypatch):
    """The CUDA-graph loop plan (capture.loop_plan), replayed on host arenas that start as garbage
    (copies in, each step at its planned places, copies out), leaves every buffer as running the
    steps one by one does, for the bindings the pipeline really makes (OpenVINO's buffers are numpy
    arrays): UniPC's three rotating x0 buffers, inpainting's per-step image latents, an edited
    prompt's per-step text, shared zero noise and per-step noise."""
    from ldm_deploy.engine.backends.capture import loop_plan

    recorded = []
    real = type(ov_fp32.backend).run_steps
    monkeypatch.setattr(type(ov_fp32.backend), "run_steps",
                        lambda self, c, runs, key, on_step: (recorded.append(runs), real(self, c, runs, key, on_step)))
    mask = np.zeros((64, 96), np.uint8)
    mask[:, 40:] = 255
    init = np.linspace(0, 1, 64 * 96 * 3).reshape(64, 96, 3)
    for kw in (dict(sampler="unipc", steps=6), dict(sampler="euler_a", steps=4, init_image=init, mask=mask),
               dict(sampler="heun", steps=3, prompt_weighting=True)):
        ov_fp32("a [cat:dog:0.5]", seed=1, width=96, height=64, output_type="np", progress=False, **kw)

    def step(inputs: dict) -> dict:  # a stand-in for the U-Net step that reads every input
        mix = sum(float(np.asarray(v, np.float64).mean()) * (i + 1) for i, (_, v) in enumerate(sorted(inputs.items())))
        x = inputs["latents"]
        return {"latents_out": (0.5 * x + np.float32(mix)).astype(np.float32),
                "state_out": (x + 0.25 * inputs["state"] + 0.125 * inputs.get("state2", 0)).astype(np.float32)}

    for runs in recorded:
        want = {id(a): np.array(a) for r in runs for a in [*r.inputs.values(), *r.outputs.values()]}
        for r in runs:  # one by one, on copies
            out = step({k: want[id(v)] for k, v in r.inputs.items()})
            for k, v in r.outputs.items():
                want[id(v)][...] = out[k]
        plan = loop_plan(runs, lambda a: a.nbytes)
        arenas = {name: np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8) for name, size in plan.arenas.items()}
        buffers = list({id(a): a for r in runs for a in [*r.inputs.values(), *r.outputs.values()]}.values())
        got = [np.array(a) for a in buffers]

        def view(place, like):
            return arenas[place.arena][place.offset:place.offset + like.nbytes].view(like.dtype).reshape(like.shape)

        for i, place, n in plan.copy_in:
            view(place, got[i])[...] = got[i]
        for r, places in zip(runs, plan.steps):
            out = step({k: view(places[k], v).copy() for k, v in r.inputs.items()})
            for k, v in r.outputs.items():
                view(places[k], v)[...] = out[k]
        for place, i, n in plan.copy_out:
            got[i][...] = view(place, got[i])
        for a, g in zip(buffers, got):
            if any(a is v for r in runs for v in r.outputs.values()):
                np.testing.assert_array_equal(g, want[id(a)])
    assert any("state2" in r.inputs for runs in recorded for r in runs)
    assert len({id(r.inputs["image_latents"]) for r in recorded[1]}) == 4  # one per step: a table
