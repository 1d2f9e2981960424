"""The torch backend on the CPU: an AOTInductor engine of the tiny SD 1.x model must give the
ONNX Runtime engine's and diffusers' images; and the pure parts of the CUDA-graph plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TEST_CONFIG
from ldm_deploy.engine.backends import Run
from ldm_deploy.engine.backends.capture import buffers, slots
from ldm_deploy.engine.manifest import read_manifest
from ldm_deploy.engine.spec import DimRange, component_specs, ModelFacts
from ldm_deploy.errors import InvalidRequest, UserError
from ldm_deploy.export.build import export_engine
from ldm_deploy.export.config import ExportConfig
from ldm_deploy.export.torch_export import dynamic_shapes, export_dims


def small_config(**options) -> ExportConfig:
    """A torch export of the tiny model at 64..128 px, txt2img only: what most tests here need."""
    return ExportConfig(backend="torch", min_size=64, max_size=128, opt_size=64, max_batch=2, img2img=False,
                        **options)


def assert_same_image(engine, pipelines, prompt: str, seed: int, **load_options) -> None:
    """`engine` (loaded with `load_options`) gives the ONNX Runtime engine's image at 64 px."""
    from ldm_deploy import Pipeline

    kw = dict(seed=seed, steps=3, width=64, height=64, sampler="euler", output_type="np", progress=False)
    np.testing.assert_allclose(Pipeline.load(engine, **load_options)(prompt, **kw), pipelines["tiny-sd1"](prompt, **kw),
                               atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def torch_engine(model_dirs, tmp_path_factory):
    from dataclasses import replace

    # Two components at a time, each in its own process (the parallel path; auto would pick
    # one at a time on a 2-core machine). Every test below then checks what it produced.
    out = tmp_path_factory.mktemp("torch") / "tiny-sd1"
    return export_engine(str(model_dirs["tiny-sd1"]), out, replace(TEST_CONFIG, backend="torch", jobs=2))


@pytest.fixture(scope="module")
def torch_pipe(torch_engine):
    from ldm_deploy import Pipeline

    return Pipeline.load(torch_engine)


def test_manifest_of_a_torch_engine(torch_engine):
    m = read_manifest(torch_engine)
    assert m.backend == "torch" and m.precision == "fp32"
    assert m.build["device"] == "cpu" and set(m.build["modes"].values()) == {"aoti"}
    assert m.size_multiple == 16  # 8 px per latent x 2: the tiny U-Net downsamples once
    assert set(m.files["unet_step"]) == {"unet_step.pt2"}


@pytest.mark.parametrize("sampler, prompt", [
    ("euler_a", "a cat on a mat"), ("dpmpp_2m_karras", "a cat on a mat"),
    ("euler", "a cat on a mat by the fire in a house on a hill " * 9),  # 126 tokens: two chunks, 154 keys
])
def test_torch_engine_matches_onnxruntime(torch_pipe, pipelines, sampler, prompt):
    kw = dict(seed=3, steps=4, width=128, height=64, sampler=sampler, output_type="np", progress=False,
              num_images=2, negative_prompt="blurry")
    ours = torch_pipe(prompt, **kw)
    onnx = pipelines["tiny-sd1"](prompt, **kw)
    np.testing.assert_allclose(ours, onnx, atol=1e-4, rtol=0)


def test_torch_engine_matches_diffusers(torch_pipe, model_dirs, torch_noise):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(model_dirs["tiny-sd1"], safety_checker=None,
                                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
    latents = torch.randn((1, 4, 8, 16), generator=torch.Generator().manual_seed(1))
    want = ref("a red house", num_inference_steps=5, height=64, width=128, latents=latents.clone(),
               output_type="np").images
    got = torch_pipe("a red house", steps=5, height=64, width=128, sampler="dpmpp_2m", latents=latents.numpy(),
                     output_type="np", progress=False)
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)


def test_torch_engine_img2img_matches_onnxruntime(torch_pipe, pipelines):
    from PIL import Image

    init = Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8))
    kw = dict(init_image=init, strength=0.5, seed=1, steps=4, output_type="np", progress=False)
    np.testing.assert_allclose(torch_pipe("x", **kw), pipelines["tiny-sd1"]("x", **kw), atol=1e-4, rtol=0)


def test_torch_engines_inpaint_as_onnxruntime(torch_pipe, pipelines, model_dirs, tmp_path):
    """A mask through the torch engine's U-Net step: the kept part put back (the AOTInductor
    engine of the text-to-image model), and an inpainting U-Net's 9 channels (exported programs)."""
    from PIL import Image

    from ldm_deploy import Pipeline
    from ldm_deploy.export.random_model import make_random_model

    init = Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8))
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 24:80] = 255
    kw = dict(init_image=init, mask=mask, seed=1, steps=4, sampler="euler_a", output_type="np", progress=False)
    np.testing.assert_allclose(torch_pipe("x", **kw), pipelines["tiny-sd1"]("x", **kw), atol=1e-4, rtol=0)

    folder = make_random_model(tmp_path / "inpainting", "tiny-sd1", seed=1, inpainting=True)
    ours = Pipeline.load(export_engine(str(folder), tmp_path / "torch", small_config(aoti=False)))
    onnx = Pipeline.load(export_engine(str(folder), tmp_path / "onnx", ExportConfig(min_size=64, max_size=128)))
    np.testing.assert_allclose(ours("x", **kw), onnx("x", **kw), atol=1e-4, rtol=0)


def test_torch_engine_needs_sizes_its_unet_divides(torch_pipe):
    with pytest.raises(InvalidRequest, match="multiple of 16"):
        torch_pipe("x", width=72, height=64)


def test_export_dims_make_latent_sides_multiples():
    ranges = {"batch": DimRange(1, 1, 4), "cfg": DimRange(1, 2, 2), "latent_height": DimRange(32, 64, 128),
              "latent_width": DimRange(32, 64, 128)}
    dims = export_dims(ranges, 8)  # SD 1.5: 64 px sides = 8 latent px (three downsamplings)
    spec = component_specs(ModelFacts(4, 77, 768))["vae_encoder"]
    images, sample_noise = dynamic_shapes(spec, dims)[:2]
    # images are (B, 3, 8 * 8 * blocks, ...): the exporter sees both factors
    assert str(images[2]) == str(dims["latent_height"] * 8)
    assert set(images) == {0, 2, 3} and set(sample_noise) == {0, 2, 3}
    assert dynamic_shapes(spec, dims)[3] is None  # start_coeffs: static (2,)


def test_graph_slots_name_buffers_by_first_use():
    a, b, c, d = (torch.zeros(1) for _ in range(4))
    runs = [Run({"x": a, "n": c}, {"y": b}), Run({"x": b, "n": d}, {"y": a})]
    assert slots(runs) == (("x", 0), ("n", 1), ("y", 2), ("x", 2), ("n", 3), ("y", 0))
    assert [id(t) for t in buffers(runs)] == [id(a), id(c), id(b), id(d)]
    # Same structure with other tensors: same key, so a captured graph is reused.
    e, f, g, h = (torch.zeros(1) for _ in range(4))
    assert slots([Run({"x": e, "n": g}, {"y": f}), Run({"x": f, "n": h}, {"y": e})]) == slots(runs)


@pytest.mark.parametrize("kw,message", [
    (dict(device="cuda"), "apply to --backend torch"),
    (dict(backend="torch", precision="fp16"), "fp16 engines need --device cuda"),
    (dict(backend="torch", attention="flash9"), "unknown attention for --backend torch"),
    (dict(attention="triton"), "unknown attention for --backend onnxruntime"),
    (dict(jobs=2), "--jobs applies to --backend torch"),
    (dict(backend="torch", jobs=-1), "give a number of processes"),
    (dict(aoti=False), "--no-aoti applies to --backend torch"),
    (dict(channels_last=True), "--channels-last / --fuse-qkv apply to --backend torch"),
    (dict(fuse_qkv=True), "--channels-last / --fuse-qkv apply to --backend torch"),
])
def test_export_option_combinations(kw, message):
    with pytest.raises(UserError, match=message):
        ExportConfig(**kw)


def test_measured_defaults_differ_by_device():
    """Channels-last and torch.compile are on by default for CUDA torch engines (measured faster
    on an H100, benchmarks/RESULTS.md) and off on the CPU; either can be set explicitly."""
    from ldm_deploy.engine.backends.torch import compiles

    assert ExportConfig(backend="torch", device="cuda").nhwc
    assert not ExportConfig(backend="torch", device="cuda", channels_last=False).nhwc
    assert not ExportConfig(backend="torch").nhwc and ExportConfig(backend="torch", channels_last=True).nhwc
    assert not ExportConfig().nhwc and not ExportConfig(backend="tensorrt", channels_last=False).nhwc
    assert compiles(None, "cuda") and not compiles(None, "cpu")
    assert compiles(True, "cpu") and not compiles(False, "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_export_without_a_gpu_is_a_clear_error(model_dirs, tmp_path):
    with pytest.raises(UserError, match="sees no CUDA GPU"):
        export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "e", ExportConfig(backend="torch", device="cuda"))
    assert not (tmp_path / "e").exists()


def test_static_torch_engine(model_dirs, pipelines, tmp_path):
    """--static-shapes on a torch engine: one size, one image per pass, guidance on or off (cfg
    keeps 1..2); the same images as the dynamic ONNX Runtime engine; any other size is a clear
    error. (Its programs run as exported: the fixed shapes are the export's. AOTInductor's
    compile of a package is tested on torch_engine's dynamic shapes; of fixed ones, not here: it
    took another 100 s of C++.)"""
    from ldm_deploy import Pipeline
    from ldm_deploy.export.tensorrt_build import TensorRTOptions

    config = small_config(tensorrt=TensorRTOptions(static_shapes=True), aoti=False)
    m = read_manifest(export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "e", config))
    assert m.dims == {"batch": DimRange(1, 1, 1), "cfg": DimRange(1, 2, 2), "latent_height": DimRange(8, 8, 8),
                      "latent_width": DimRange(8, 8, 8), "text_chunks": DimRange(1, 1, 1)}
    pipe = Pipeline.load(tmp_path / "e")
    kw = dict(seed=4, steps=3, width=64, height=64, sampler="euler", output_type="np", progress=False)
    for guidance in (7.5, 1.0):
        np.testing.assert_allclose(pipe("a red kite", guidance=guidance, **kw),
                                   pipelines["tiny-sd1"]("a red kite", guidance=guidance, **kw), atol=1e-4, rtol=0)
    with pytest.raises(InvalidRequest, match="outside this engine's range"):
        pipe("a red kite", **(kw | {"width": 128}))
    # Two images from a one-image engine: two passes, the same images as one batch of two.
    np.testing.assert_allclose(pipe("a red kite", num_images=2, **kw),
                               pipelines["tiny-sd1"]("a red kite", num_images=2, **kw), atol=1e-4, rtol=0)


def test_aoti_failure_falls_back_to_the_exported_program(model_dirs, pipelines, tmp_path, monkeypatch, caplog):
    """Where AOTInductor cannot compile a component, the engine keeps its exported program, says
    so in the manifest and the log, and still gives the same images."""
    def fail(*args, **kwargs):
        raise RuntimeError("injected compile failure")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fail)
    config = small_config(jobs=1)  # in this process, where the patch is
    out = export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "e", config)
    m = read_manifest(out)
    assert set(m.build["modes"].values()) == {"exported"}
    assert "failed to compile (RuntimeError: injected compile failure)" in caplog.text

    assert_same_image(out, pipelines, "a boat", seed=2)
    assert "exported programs run uncompiled" in caplog.text


def test_a_package_that_fails_its_test_run_is_not_shipped(tmp_path, monkeypatch, caplog):
    """Each compiled package runs once in a process of its own before the engine keeps it; one
    that cannot (here: its file damaged after compiling) is replaced by the exported program."""
    from ldm_deploy.engine.spec import ComponentSpec, DimRange, Sym, TensorSpec
    from ldm_deploy.export.torch_export import export_component

    compile_package = torch._inductor.aoti_compile_and_package

    def damaged(program, package_path, **kwargs):
        compile_package(program, package_path=package_path, **kwargs)
        with open(package_path, "r+b") as f:
            f.write(b"not a zip" * 64)
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", damaged)
    rows = (Sym("batch"), 8)
    spec = ComponentSpec("toy", inputs=(TensorSpec("x", "float32", rows),), outputs=(TensorSpec("y", "float32", rows),))
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval()
    path = tmp_path / "toy.pt2"
    mode = export_component(module, spec, (torch.randn(2, 8),), path, {"batch": DimRange(1, 2, 4)}, 1)
    assert mode == "exported"
    assert "toy: the AOTInductor package failed while loading it" in caplog.text
    x = torch.randn(3, 8)
    assert torch.allclose(torch.export.load(str(path)).module()(x), module(x))


def test_test_run_outcomes_read_as_sentences():
    from ldm_deploy.export.aoti_check import describe

    assert describe(0, "loading\ncalling\nchecking\nok\n", "") is None
    assert describe(-11, "loading\ncalling\n", "Fatal Python error") == "crashed (SIGSEGV) while running it"
    assert describe(-6, "loading\n", "") == "crashed (SIGABRT) while loading it"
    assert describe(3, "loading\ncalling\nchecking\n", "output 0 differs from the eager program by 3e-01\n") == (
        "failed while comparing its outputs: output 0 differs from the eager program by 3e-01")
    assert describe(1, "", "") == "failed while starting (exit 1)"
    assert describe(-11, "loading\ncase=at_the_trace_size calling\nchecking\ncase=at_the_smallest_size_one_image calling\n",
                    "") == "crashed (SIGSEGV) while running it at the smallest size one image"
    assert describe(-11, "loading\ncalling\nchecking\nok\n", "") == "crashed (SIGSEGV) while exiting, after a correct run"


def test_no_aoti_engine_runs_eager_and_compiled(model_dirs, pipelines, tmp_path, caplog, monkeypatch):
    """`--no-aoti`: the engine holds exported programs (an export of seconds), says so in its
    manifest, and gives the ONNX Runtime engine's images both eagerly (the default on the CPU)
    and with torch.compile of each component (compile=True, `ldm-run --torch-compile`, the
    default on CUDA). torch.compile runs with the aot_eager backend here: Dynamo and AOTAutograd
    trace each component as on CUDA, without Inductor's C++ build of their kernels (two minutes
    on our CPUs), which the AOTInductor engines above already check."""
    import logging

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: real_compile(module, backend="aot_eager", **kw))
    caplog.set_level(logging.INFO)
    config = small_config(aoti=False)
    out = export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "e", config)
    m = read_manifest(out)
    assert m.build["aoti"] is False and set(m.build["modes"].values()) == {"exported"}
    assert "no AOTInductor packages" in caplog.text and "AOTInductor (minutes" not in caplog.text

    assert_same_image(out, pipelines, "a lighthouse", seed=5)
    said = "exported programs run uncompiled (exported with --no-aoti; --torch-compile compiles them)"
    assert caplog.text.count(said) == 1  # once for the engine, not once per component
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    assert_same_image(out, pipelines, "a lighthouse", seed=5, compile=True)
    assert "exported programs compile with torch.compile on their first call" in caplog.text
    assert counters["stats"]["unique_graphs"] >= graphs + 3  # Dynamo did capture each component

    # Where compiling fails on the first call (no working compiler, say), each component runs
    # uncompiled instead, with a warning, and the image is the same.
    def compile_that_fails(module, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", compile_that_fails)
    assert_same_image(out, pipelines, "a lighthouse", seed=5, compile=True)
    assert "unet_step: torch.compile failed (RuntimeError: no C++ compiler found); running it uncompiled" in caplog.text


def test_aoti_probe_passes_where_aoti_works():
    """The toy package that decides whether a GPU export tries AOTInductor: on this CPU it
    compiles, loads in a process of its own and matches eager."""
    from ldm_deploy.export.aoti_check import probe

    assert probe("cpu") is None


def test_a_failed_aoti_probe_exports_programs_and_says_why(model_dirs, pipelines, tmp_path, monkeypatch, caplog):
    """Where the toy package fails (as it crashed on the lent GPUs), no component is compiled:
    the engine holds exported programs, the manifest and both logs say why, and the images are
    the same."""
    import logging

    from ldm_deploy.export import aoti_check, build

    compiles = []  # export_component would catch an exception raised here, so count the calls
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(build, "PROBED_DEVICES", ("cpu",))
    monkeypatch.setattr(aoti_check, "probe", lambda device: "crashed (SIGSEGV) while loading it")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda *a, **k: compiles.append(a))
    config = small_config(jobs=1)
    out = export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "e", config)
    m = read_manifest(out)
    assert m.build["aoti"] is False and set(m.build["modes"].values()) == {"exported"}
    assert m.build["aoti_problem"] == "crashed (SIGSEGV) while loading it" and not compiles
    assert "AOTInductor does not work on this machine: a toy package crashed (SIGSEGV) while loading it" in caplog.text

    assert_same_image(out, pipelines, "a windmill", seed=6)
    assert "AOTInductor did not work where the engine was exported: a toy package crashed" in caplog.text


def test_exported_program_with_our_attention_loads_in_a_fresh_process(model_dirs, pipelines, tmp_path):
    """An exported U-Net that calls `ldm_deploy::attention` (`--attention triton --no-aoti`) loads
    where nothing has imported the kernels yet (a fresh process, as `ldm-run`), and gives the
    ONNX Runtime engine's image (on the CPU the op runs SDPA)."""
    import subprocess
    import sys

    config = small_config(attention="triton", aoti=False)
    out = export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "e", config)
    kw = dict(seed=7, steps=3, width=64, height=64, sampler="euler", output_type="np", progress=False)
    image = tmp_path / "image.npy"
    code = ("import sys, numpy as np; from ldm_deploy import Pipeline; "
            f"np.save(sys.argv[2], Pipeline.load(sys.argv[1])('a red barn', **{kw!r}))")
    p = subprocess.run([sys.executable, "-c", code, str(out), str(image)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    np.testing.assert_allclose(np.load(image), pipelines["tiny-sd1"]("a red barn", **kw), atol=1e-4, rtol=0)
