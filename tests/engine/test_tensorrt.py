"""The TensorRT backend without TensorRT: its clear refusal here, and the pure parts around every
GPU call (bound shapes -> dims, profile checks, buffer and scratch sizing, the captured loop's
layout, graph keys, plan staleness, the auto choice). GPU checks are marked and skipped here."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import TEST_CONFIG
from ldm_deploy.engine.backends import Run
from ldm_deploy.engine.backends import cuda
from ldm_deploy.engine.backends import tensorrt as trt_backend
from ldm_deploy.engine.backends.capture import GraphCache, Place, align, buffers, graph_key, loop_plan, slots
from ldm_deploy.engine.backends.tensorrt import (
    RuntimeFacts,
    buffer_plan,
    check_bindings,
    check_profile,
    choose_backend,
    dims_of,
    has_plans,
    scratch_bytes,
    scratch_resize,
    stale_message,
    stale_reasons,
)
from ldm_deploy.engine.manifest import MANIFEST, file_record
from ldm_deploy.engine.spec import DimRange, ModelFacts, component_specs
from ldm_deploy.errors import BackendUnavailable, InvalidRequest

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
SPECS = component_specs(ModelFacts(4, 77, 32))
UNET = SPECS["unet_step"]
DIMS = TEST_CONFIG.dims(16)  # latent sides 8..64 (tuned 16), batch 1..2, cfg 1..2
H100 = RuntimeFacts("10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")


def unet_shapes(batch=2, cfg=2, h=16, w=24):
    lat = (batch, 4, h, w)
    return {"latents": lat, "text_embeddings": (cfg, batch, 77, 32), "coeffs": (9,), "state": lat, "noise": lat,
            "latents_out": lat, "state_out": lat}


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the refusal on machines without TensorRT")
def test_backend_is_unavailable_without_tensorrt():
    with pytest.raises(BackendUnavailable, match=r"needs NVIDIA TensorRT 10\+.*pip install 'ldm-deploy\[tensorrt\]'"):
        trt_backend.create()
    assert trt_backend.unavailable_reason().startswith("the tensorrt backend needs NVIDIA TensorRT")


def test_backend_refuses_a_cpu_device_before_anything_else():
    with pytest.raises(BackendUnavailable, match="NVIDIA GPUs only"):
        trt_backend.create(device="cpu")


def test_bound_shapes_give_the_dims():
    assert dims_of(UNET, unet_shapes()) == {"batch": 2, "cfg": 2, "latent_height": 16, "latent_width": 24}
    long = component_specs(ModelFacts(4, 77, 32, long_prompts=True))["unet_step"]  # text of 77-token chunks
    shapes = unet_shapes() | {"text_embeddings": (2, 2, 231, 32)}
    assert dims_of(long, shapes)["text_chunks"] == 3
    with pytest.raises(ValueError, match="axis 2 is 100, not a multiple of 77"):
        dims_of(long, shapes | {"text_embeddings": (2, 2, 100, 32)})
    with pytest.raises(InvalidRequest, match=r"text_chunks 5 is outside .*\[1, 4\]"):
        check_profile("unet_step", {"text_chunks": 5}, DIMS)
    images = SPECS["vae_decoder"]
    assert dims_of(images, {"latents": (1, 4, 8, 9), "images": (1, 3, 64, 72)})["latent_width"] == 9


@pytest.mark.parametrize("change,message", [
    ({"state_out": (2, 4, 16, 8)}, "latent_width is 8 here, 24 in another"),
    ({"coeffs": (8,)}, "fixes it at 9"),
    ({"noise": (2, 4, 16)}, "has 4 axes"),
])
def test_inconsistent_bindings_are_our_bug(change, message):
    with pytest.raises(ValueError, match=message):
        dims_of(UNET, unet_shapes() | change)


def test_missing_or_off_grid_bindings_are_our_bug():
    with pytest.raises(ValueError, match="nothing bound to 'images'"):
        dims_of(SPECS["vae_decoder"], {"latents": (1, 4, 8, 8)})
    with pytest.raises(ValueError, match="not a multiple of 8"):
        dims_of(SPECS["vae_decoder"], {"latents": (1, 4, 8, 8), "images": (1, 3, 64, 63)})


def test_requests_outside_the_profile_are_the_users_to_fix():
    check_profile("unet_step", {"batch": 2, "latent_height": 64}, DIMS)
    with pytest.raises(InvalidRequest, match=r"batch 3 is outside .*\[1, 2\]; re-export with wider"):
        check_profile("unet_step", {"batch": 3}, DIMS)
    static = {"latent_height": DimRange(16, 16, 16)}
    with pytest.raises(InvalidRequest, match=r"only 16 \(static shapes\)"):
        check_profile("vae_decoder", {"latent_height": 24}, static)


def test_buffer_plan_sizes_every_tensor_at_the_request():
    plan = buffer_plan(UNET, {"batch": 2, "cfg": 2, "latent_height": 16, "latent_width": 24})
    assert plan["latents"].shape == (2, 4, 16, 24) and plan["latents"].nbytes == 2 * 4 * 16 * 24 * 4
    assert plan["text_embeddings"].nbytes == plan["text_embeddings"].padded == 2 * 2 * 77 * 32 * 4
    assert plan["coeffs"].nbytes == 36 and plan["coeffs"].padded == 256
    ids = buffer_plan(SPECS["text_encoder"], {"cfg": 1, "batch": 1})["input_ids"]
    assert ids.dtype == np.int64 and ids.nbytes == 77 * 8 and ids.padded == 768


def test_bindings_must_carry_the_spec_dtypes():
    arrays = {n: np.zeros(s, np.float32) for n, s in unet_shapes().items()}
    assert check_bindings(UNET, arrays)["cfg"] == 2
    with pytest.raises(ValueError, match="bound float64, the engine takes float32"):
        check_bindings(UNET, arrays | {"noise": np.zeros((2, 4, 16, 24))})


def test_one_scratch_buffer_fits_the_largest_engine():
    needs = {"text_encoder": 10_000, "unet_step": 300_001, "vae_decoder": 250_000}
    assert scratch_bytes(needs.values()) == align(300_001) == 300_032
    assert scratch_bytes([]) == 0
    assert scratch_resize(300_032, 250_000) is None  # fits: keep it (and every captured graph)
    assert scratch_resize(300_032, 400_000) == 400_128


def test_plans_are_tied_to_tensorrt_version_and_gpu():
    build = H100.to_dict() | {"options": {}}
    assert stale_reasons(build, H100) == []
    assert stale_reasons(build, RuntimeFacts("10.9.0.34", H100.gpu, "9.0")) == [
        "they were built with TensorRT 10.8.0.43, this machine has 10.9.0.34"]
    other_arch = stale_reasons(build, RuntimeFacts(H100.tensorrt, "NVIDIA L4", "8.9"))
    assert other_arch == ["they were built for compute capability 9.0 (NVIDIA H100 80GB HBM3), "
                          "this GPU is 8.9 (NVIDIA L4)"]
    same_arch = stale_reasons(build, RuntimeFacts(H100.tensorrt, "NVIDIA H200", "9.0"))
    assert same_arch == ["they were built and tuned on NVIDIA H100 80GB HBM3, this GPU is NVIDIA H200"]
    assert "does not record the tensorrt, gpu" in stale_reasons({"compute_capability": "9.0"}, H100)[0]


def test_stale_plans_say_how_to_rebuild():
    msg = stale_message("engines/sd15", "runwayml/sd15", ["they were built with TensorRT 10.8"])
    assert "cannot run here: they were built with TensorRT 10.8" in msg
    assert "`ldm-run --engine engines/sd15 --rebuild-stale ...`" in msg
    assert "`ldm-export --model runwayml/sd15 --backend tensorrt --out engines/sd15 --force`" in msg


def test_auto_picks_tensorrt_only_when_it_can_run():
    assert choose_backend("tensorrt", True, None) == ("tensorrt", None)
    name, note = choose_backend("tensorrt", True, "no CUDA GPU is visible")
    assert name == "onnxruntime" and "no CUDA GPU is visible" in note and "ONNX Runtime" in note
    assert choose_backend("onnxruntime", False, None) == ("onnxruntime", None)
    assert choose_backend("torch", False, None) == ("torch", None)
    plans = SimpleNamespace(files={"unet_step": {"unet_step.onnx": {}, "unet_step.plan": {}}})
    assert has_plans(plans) and not has_plans(SimpleNamespace(files={"unet_step": {"unet_step.onnx": {}}}))


def loop_runs(steps=3, shared_noise=False, shape=(1, 4, 8, 8)):
    """What the pipeline's denoise() binds: ping-pong latents and state, one row and one
    noise per step (or one shared zero noise), the same text embeddings throughout."""
    x, x2, s, s2 = (np.zeros(shape, np.float32) for _ in range(4))
    emb = np.zeros((2, 1, 77, 32), np.float32)
    rows = [np.zeros(9, np.float32) for _ in range(steps)]
    fresh = [np.zeros(shape, np.float32) for _ in range(steps)]
    noise = [fresh[0]] * steps if shared_noise else fresh
    return ping_pong_runs(x, x2, s, s2, emb, rows, noise)


def ping_pong_runs(x, x2, s, s2, emb, rows, noise) -> list[Run]:
    """One Run per step: latents and state swap buffers each step, row i and noise i bound;
    emb: one buffer for all steps, or a list of one per step (prompt editing)."""
    runs = []
    embs = emb if isinstance(emb, list) else [emb] * len(rows)
    for row, n, emb in zip(rows, noise, embs):
        runs.append(Run({"latents": x, "text_embeddings": emb, "coeffs": row, "state": s, "noise": n},
                        {"latents_out": x2, "state_out": s2}))
        x, x2, s, s2 = x2, x, s2, s
    return runs


def test_capture_plan_binds_tables_rows_and_ping_pong_buffers():
    runs = loop_runs(steps=3)
    plan = loop_plan(runs, lambda a: a.nbytes)
    lat = 4 * 8 * 8 * 4  # 1024 bytes, already aligned
    # Buffers by first appearance: 0 x, 1 emb, 2 row0, 3 state, 4 noise0, 5 x', 6 state', 7 row1, 8 noise1, ...
    assert plan.arenas == {"table:coeffs": 3 * 256, "table:noise": 3 * lat, "buffer:0": lat,
                           "buffer:1": align(2 * 77 * 32 * 4), "buffer:3": lat, "buffer:5": lat, "buffer:6": lat}
    for i, step in enumerate(plan.steps):
        assert step["coeffs"] == Place("table:coeffs", 256 * i)  # row i of one uploaded table
        assert step["noise"] == Place("table:noise", lat * i)
        assert step["text_embeddings"] == Place("buffer:1", 0)
        x, x2 = ("buffer:0", "buffer:5") if i % 2 == 0 else ("buffer:5", "buffer:0")
        assert (step["latents"].arena, step["latents_out"].arena) == (x, x2)  # ping-pong
        s, s2 = ("buffer:3", "buffer:6") if i % 2 == 0 else ("buffer:6", "buffer:3")
        assert (step["state"].arena, step["state_out"].arena) == (s, s2)
    # In: what a step reads before any step writes it (start latents, state, text, rows, noise).
    assert [(i, p.arena, p.offset, n) for i, p, n in plan.copy_in] == [
        (0, "buffer:0", 0, lat), (1, "buffer:1", 0, 2 * 77 * 32 * 4), (2, "table:coeffs", 0, 36),
        (3, "buffer:3", 0, lat), (4, "table:noise", 0, lat), (7, "table:coeffs", 256, 36),
        (8, "table:noise", lat, lat), (9, "table:coeffs", 512, 36), (10, "table:noise", 2 * lat, lat)]
    # Out: everything some step writes (the final latents are one of them).
    assert [(p.arena, i) for p, i, _ in plan.copy_out] == [("buffer:0", 0), ("buffer:3", 3), ("buffer:5", 5),
                                                          ("buffer:6", 6)]


def test_capture_plan_keeps_a_shared_noise_buffer_single():
    plan = loop_plan(loop_runs(steps=4, shared_noise=True), lambda a: a.nbytes)
    assert "table:noise" not in plan.arenas and "table:coeffs" in plan.arenas
    assert {step["noise"] for step in plan.steps} == {Place("buffer:4", 0)}
    one = loop_plan(loop_runs(steps=1), lambda a: a.nbytes)  # nothing to gain from a table
    assert not [a for a in one.arenas if a.startswith("table:")]


def test_capture_plan_binds_each_steps_text_where_prompts_are_edited():
    """Prompt editing: steps read one of two text buffers (a a a b b), each copied in once, or a
    new one each (a b c d), which become one table; the pattern is part of the graph's key."""
    shape = (1, 4, 8, 8)
    x, x2, s, s2 = (np.zeros(shape, np.float32) for _ in range(4))
    texts = [np.zeros((2, 1, 154, 32), np.float32) for _ in range(4)]
    rows, noise = [np.zeros(9, np.float32) for _ in range(5)], [np.zeros(shape, np.float32) for _ in range(5)]
    runs = ping_pong_runs(x, x2, s, s2, [texts[0]] * 3 + [texts[1]] * 2, rows, noise)
    plan = loop_plan(runs, lambda a: a.nbytes)
    places = [step["text_embeddings"] for step in plan.steps]
    assert places[0] == places[1] == places[2] != places[3] == places[4]
    assert all(p.arena.startswith("buffer:") for p in places)
    copied = {p for _, p, n in plan.copy_in if n == texts[0].nbytes}
    assert copied == {places[0], places[3]} and plan.arenas[places[3].arena] == align(texts[0].nbytes)
    every = loop_plan(ping_pong_runs(x, x2, s, s2, texts, rows[:4], noise[:4]), lambda a: a.nbytes)
    row = align(texts[0].nbytes)
    assert every.arenas["table:text_embeddings"] == 4 * row
    assert [step["text_embeddings"] for step in every.steps] == [Place("table:text_embeddings", i * row)
                                                                for i in range(4)]
    other = ping_pong_runs(x, x2, s, s2, [texts[0]] * 2 + [texts[1]] * 3, rows, noise)
    key = (shape, True, "euler", 5)
    assert graph_key(key, runs, np.shape) != graph_key(key, other, np.shape)


def test_graph_keys_name_what_makes_a_capture_valid():
    a, b = loop_runs(steps=3), loop_runs(steps=3)
    key = ((1, 4, 8, 8), True, "euler", 3)
    assert graph_key(key, a, np.shape) == graph_key(key, b, np.shape)  # other buffers, same graph
    assert slots(a) == slots(b) and len(buffers(a)) == 11
    assert graph_key(key, a, np.shape) != graph_key(key, loop_runs(steps=3, shape=(1, 4, 8, 16)), np.shape)
    assert graph_key(key, a, np.shape) != graph_key(key, loop_runs(steps=3, shared_noise=True), np.shape)
    assert graph_key(key, a, np.shape) != graph_key(((1, 4, 8, 8), True, "ddim", 3), a, np.shape)


def test_graph_cache_evicts_the_least_recently_used():
    cache = GraphCache(limit=2)
    assert cache.put("a", "A") == [] and cache.put("b", None) == []
    assert cache.get("a") == "A"  # a is now the newest
    assert cache.put("c", "C") == []  # evicts b, a failed capture: nothing to free
    assert "b" not in cache and cache.put("d", "D") == ["A"]
    assert cache.clear() == ["C", "D"] and "c" not in cache


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the fallback on machines without TensorRT")
def test_a_tensorrt_engine_runs_its_onnx_graphs_on_onnxruntime_here(engine_dirs, pipelines, tmp_path, caplog):
    import json
    import logging
    import shutil

    from ldm_deploy import Pipeline

    engine = tmp_path / "trt"  # laid out as --backend tensorrt writes it: plans beside the ONNX graphs
    shutil.copytree(engine_dirs["tiny-sd1"], engine)
    (engine / "unet_step.plan").write_bytes(b"a plan for some other machine")
    m = json.loads((engine / MANIFEST).read_text())
    m["backend"], m["build"] = "tensorrt", H100.to_dict()
    m["files"]["unet_step"]["unet_step.plan"] = file_record(engine / "unet_step.plan")
    (engine / MANIFEST).write_text(json.dumps(m))
    with caplog.at_level(logging.WARNING):
        pipe = Pipeline.load(engine)
    assert pipe.backend.name == "onnxruntime" and "TensorRT plans cannot run here" in caplog.text
    kw = {"seed": 3, "steps": 2, "width": 64, "height": 64, "output_type": "np", "progress": False}
    np.testing.assert_array_equal(pipe("a cat", **kw), pipelines["tiny-sd1"]("a cat", **kw))
    with pytest.raises(BackendUnavailable, match="needs NVIDIA TensorRT"):
        Pipeline.load(engine, backend="tensorrt", rebuild_stale=True)


@pytest.mark.gpu
@pytest.mark.skipif(cuda.gpu_count() == 0, reason="needs cuda-python and an NVIDIA GPU")
def test_a_captured_loop_binds_each_steps_row_and_noise_on_the_gpu():
    """The capture machinery without TensorRT: a 'step' that copies its noise to latents_out and
    its coefficient row to state_out, captured as one graph and replayed on fresh buffers."""
    stream = cuda.Stream()
    mem = cuda.Memory(stream)
    steps, shape = 5, (1, 4, 8, 8)

    def live_runs(offset):
        x, x2, s, s2 = (mem.upload(np.zeros(shape, np.float32)) for _ in range(4))
        emb = mem.upload(np.zeros((2, 1, 77, 32), np.float32))
        rows = [mem.upload(np.full(9, offset + i, np.float32)) for i in range(steps)]
        noise = [mem.upload(np.full(shape, offset + 10 * i, np.float32)) for i in range(steps)]
        return ping_pong_runs(x, x2, s, s2, emb, rows, noise)

    def enqueue(addresses):
        mem.copy(addresses["latents_out"], addresses["noise"], int(np.prod(shape)) * 4)
        mem.copy(addresses["state_out"], addresses["coeffs"], 9 * 4)

    loop = trt_backend.CapturedLoop(mem, stream, live_runs(0), enqueue)
    for offset in (100, 200):  # other buffers, same structure: the same graph serves
        runs = live_runs(offset)
        loop.replay(runs)
        last = runs[-1].outputs
        np.testing.assert_array_equal(mem.download(last["latents_out"]), offset + 10 * (steps - 1))
        np.testing.assert_array_equal(mem.download(last["state_out"]).ravel()[:9], offset + steps - 1)
    loop.free()


@pytest.mark.gpu
@pytest.mark.skipif(trt_backend.unavailable_reason() is not None,
                    reason=f"needs TensorRT and a GPU: {trt_backend.unavailable_reason()}")
def test_tensorrt_engine_matches_onnxruntime(model_dirs, pipelines, tmp_path):
    """On a GPU with TensorRT: a tiny fp16 engine against the fp32 ONNX one, the captured loop
    against the plain loop (needs the wiring of issue 4: ExportConfig(backend="tensorrt"))."""
    from dataclasses import replace

    from ldm_deploy import Pipeline
    from ldm_deploy.export.build import export_engine

    out = export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "trt", replace(TEST_CONFIG, backend="tensorrt"))
    kw = dict(seed=3, steps=4, width=128, height=64, output_type="np", progress=False, num_images=2)
    graphed = Pipeline.load(out, backend="tensorrt")
    plain = Pipeline.load(out, backend="tensorrt", cuda_graph=False)
    want = pipelines["tiny-sd1"]("a cat", **kw)
    np.testing.assert_allclose(graphed("a cat", **kw), want, atol=2e-2, rtol=0)
    np.testing.assert_array_equal(graphed("a cat", **kw), plain("a cat", **kw))
