"""Our engine as a contender: `Pipeline.load`, then timed calls of the public API.

Stages are read from wrappers around what the pipeline already calls (see `recorder.py`):
`pipe.tokenizer`, `backend.run` (named by component) and `backend.run_steps` (the loop). This
module imports neither torch nor diffusers: the process's peak RSS is the runtime's own.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path

from benchmarks.recorder import Recorder

log = logging.getLogger(__name__)


def backend_options(backend: str, device: str, threads: int | None) -> dict:
    """Load options for the engine's backend: ONNX Runtime takes a device and a thread count,
    OpenVINO (CPU only) a thread count."""
    if backend not in ("onnxruntime", "openvino"):
        return {}
    return ({"device": device} if backend == "onnxruntime" else {}) | ({"threads": threads} if threads else {})


def label(backend: str, options: dict, manifest: dict) -> str:
    """"ldm-deploy torch fp16", "ldm-deploy openvino bf16", "ldm-deploy torch fp16 torch.compile"
    (the last only where the engine holds exported programs for torch.compile to compile: asked
    for, or by default on CUDA)."""
    from ldm_deploy.engine.backends.torch import compiles

    words = ["ldm-deploy", backend, options.get("precision") or manifest.get("precision", "")]
    build = manifest.get("build", {})
    if (backend == "torch" and compiles(options.get("compile"), build.get("device", "cpu"))
            and "exported" in build.get("modes", {}).values()):
        words.append("torch.compile")  # (AOTInductor packages are compiled already)
    if options.get("static_shapes"):
        words.append("static shapes")
    return " ".join(w for w in words if w)


def device_sync(be):
    """The backend's way to wait for its device, or None on the host. (The Backend interface has
    no `synchronize` yet; the torch backend on CUDA is recognised by its attributes meanwhile.)"""
    sync = getattr(be, "synchronize", None)
    if sync is None and getattr(be, "name", "") == "torch" and getattr(getattr(be, "device", None), "type", "") == "cuda":
        sync = be.torch.cuda.synchronize
    return sync


def instrument(pipe, rec: Recorder) -> None:
    """Install timing wrappers on this pipeline's tokenizer and backend instance."""
    be = pipe.backend
    sync = device_sync(be)  # GPU backends: true stage boundaries
    if sync is not None:
        rec.sync = sync

    def component_name(component, *args, **kwargs) -> str:
        return next((n for n, h in pipe.components.items() if h is component), "other")

    be.run = rec.wrap(be.run, component_name, sync=sync is not None)
    be.run_steps = rec.wrap(be.run_steps, "loop", sync=sync is not None)
    pipe.tokenizer = rec.wrap(pipe.tokenizer, "tokenize")


def breakdown(rec: Recorder, end_to_end: float) -> dict:
    """One call's stage times, from its recorded events."""
    return {
        "end_to_end": end_to_end,
        "text": rec.total("tokenize", "text_encoder"),
        "loop": rec.total("loop"),
        "vae_decode": rec.total("vae_decoder"),
    }


def saved_graphs() -> set[str]:
    """The ONNX Runtime optimised graphs in the cache now (see ldm_deploy/engine/backends/ort_cache.py)."""
    from ldm_deploy.engine.backends import ort_cache

    root = ort_cache.root()
    return {p.name for p in root.iterdir() if not p.name.startswith(".")} if root.is_dir() else set()


def ort_cache_note(before: set[str], after: set[str]) -> str:
    from ldm_deploy.engine.backends import ort_cache

    if not ort_cache.enabled():
        return f"load optimised every graph ({ort_cache.ENV}=0: no saved graphs)"
    if after - before:
        return "load optimised the graphs and saved them in the cache (later loads read them: faster)"
    return "load read ONNX Runtime's optimised graphs saved in the cache by an earlier load"


def run(spec: dict) -> dict:
    """Measure our engine per `spec` (see `bench.contender_spec`); returns the raw samples."""
    from ldm_deploy.engine import pipeline as pipeline_module

    engine = Path(spec["engine"])
    manifest = json.loads((engine / "manifest.json").read_text())
    backend = spec.get("backend") or manifest["backend"]
    rec = Recorder()
    # Time the SHA-256 check inside load by wrapping the name the pipeline module calls.
    verify = pipeline_module.verify_files
    pipeline_module.verify_files = rec.wrap(verify, "verify")
    log.info("ours: loading %s (%s)", engine, backend)
    cached_before = saved_graphs()
    start = time.perf_counter()
    try:
        pipe = pipeline_module.Pipeline.load(engine, backend=backend,
                                             **backend_options(backend, spec["device"], spec.get("threads")),
                                             **spec.get("backend_options", {}))
    finally:
        pipeline_module.verify_files = verify
    load_s = time.perf_counter() - start
    verify_s = rec.total("verify")
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    instrument(pipe, rec)

    kwargs = dict(
        prompt=spec["prompt"], negative_prompt=spec["negative_prompt"], guidance=spec["guidance"],
        seed=spec["seed"], width=spec["width"], height=spec["height"], num_images=spec["batch"],
        sampler=spec["sampler"], output_type="pil", progress=False,
    )
    for i in range(spec["warmup"]):
        log.info("ours: warm-up %d/%d (%d steps)", i + 1, spec["warmup"], spec["warmup_steps"])
        pipe(steps=spec["warmup_steps"], **kwargs)
    runs, steps = [], []
    for i in range(spec["repeats"]):
        rec.clear()
        start = time.perf_counter()
        pipe(steps=spec["steps"], **kwargs)
        runs.append(breakdown(rec, time.perf_counter() - start))
        steps += rec.durations("unet_step")
        log.info("ours: run %d/%d: %.2f s", i + 1, spec["repeats"], runs[-1]["end_to_end"])
    step_how = "per step, inside the loop"
    if not steps:  # a backend that runs the loop as one captured graph
        steps = [r["loop"] / spec["steps"] for r in runs]
        step_how = "loop / steps (the loop runs as one graph)"
    out = {
        "label": label(backend, spec.get("backend_options", {}), manifest),
        "load_s": load_s,
        "verify_s": verify_s,
        "rss_after_load_bytes": rss_after_load,
        "runs": runs,
        "unet_step": steps,
        "unet_step_how": step_how,
        "notes": [f"load includes the SHA-256 check of every engine file ({verify_s:.1f} s)"],
    }
    if backend == "onnxruntime":
        out["notes"].append(ort_cache_note(cached_before, saved_graphs()))
    torch = sys.modules.get("torch")  # present only if the backend itself needs it
    if torch is not None and torch.cuda.is_initialized():
        out["device_peak_bytes"] = torch.cuda.max_memory_allocated()
        out["device_name"] = torch.cuda.get_device_name()
    return out
