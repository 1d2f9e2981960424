"""OpenVINO on the CPU: runs an engine's ONNX graphs (the ones ONNX Runtime runs), in fp32 or, on
CPUs with bf16 matrix units (Intel AMX, AVX512-BF16), in bf16.

    Pipeline.load(engine, backend="openvino", precision="bf16")      # ldm-run --backend openvino --precision bf16

Precision is a run-time choice here, not an export one: OpenVINO reads the fp32 graph and
computes the convolutions and matrix products in the precision asked for (its
INFERENCE_PRECISION_HINT), keeping accumulations and the sampler update's arithmetic in fp32. OpenVINO's
own default on AMX machines is bf16; this backend's is fp32, so that an fp32 engine gives fp32
results unless bf16 is asked for. Measured on a 2-core Xeon with AMX, SD 1.5 U-Net step at 256x256
with CFG: fp32 1.25-1.37 s (ONNX Runtime: 1.30 s), bf16 0.34-0.40 s (benchmarks/RESULTS.md).

Compiled models are cached by OpenVINO itself (CACHE_DIR) under <cache_dir()>/openvino, so later
loads skip compiling. Device arrays are numpy arrays: everything stays on the host.

    Pipeline.load(engine, backend="openvino", static_shapes=True)     # ldm-run --backend openvino --static-shapes

compiles each component for the exact shapes of its first call, and again whenever they change
(what optimum-intel does): measured on the 2-core machine at 512 px, a U-Net step took 4.76-4.97 s
static against 5.44 s with dynamic shapes (ONNX Runtime: 5.22 s), for an 11 s compile per size
and about 1.5x ONNX Runtime's memory (benchmarks/RESULTS.md). Static compiles are not cached on
disk: each size's blob would be the size of the weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm_deploy.cache import cache_dir
from ldm_deploy.engine.backends import Run
from ldm_deploy.engine.backends.capture import run_loop
from ldm_deploy.errors import BackendUnavailable, EngineError, UserError

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # ours -> OpenVINO's INFERENCE_PRECISION_HINT


@dataclass
class Component:
    name: str
    request: object | None  # openvino.InferRequest; with static shapes, for `shapes` (None: none yet)
    outputs: tuple[str, ...]
    path: Path | None = None  # static shapes: the graph, compiled anew for each new set of input shapes
    shapes: tuple | None = None  # ((input name, shape), ...) that `request` was compiled for


class OpenVinoBackend:
    name = "openvino"

    def __init__(self, device: str = "auto", threads: int | None = None, precision: str = "fp32",
                 static_shapes: bool = False):
        try:
            import openvino
        except ImportError:
            raise BackendUnavailable("the openvino backend needs OpenVINO: pip install openvino") from None
        if device not in ("auto", "cpu"):
            raise BackendUnavailable(f"the openvino backend runs on the CPU, not {device!r}")
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision {precision!r} for the openvino backend; choose one of "
                            f"{', '.join(PRECISIONS)}")
        self.core = openvino.Core()
        if precision == "bf16" and "BF16" not in self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise BackendUnavailable("this CPU has no bf16 arithmetic (Intel AMX or AVX512-BF16); use precision fp32")
        self.device = "cpu"
        self.threads = threads
        self.precision = precision
        self.static_shapes = static_shapes

    def config(self, cache: bool = True) -> dict:
        config = {
            "INFERENCE_PRECISION_HINT": PRECISIONS[self.precision],
            "PERFORMANCE_HINT": "LATENCY",  # one request at a time, all cores on it
        } | ({"CACHE_DIR": str(cache_dir() / "openvino")} if cache else {})
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        return config

    def load(self, engine_dir: Path, manifest, component: str) -> Component:
        path = Path(engine_dir) / f"{component}.onnx"
        if not path.is_file():
            raise EngineError(f"{engine_dir} has no {path.name}: the openvino backend runs ONNX engines "
                              "(ldm-export --backend onnxruntime)")
        winograd = any(kind != "direct" for kind in manifest.build.get("convolutions", {}))
        if component == "unet_step" and self.precision == "bf16" and winograd:
            # Measured (benchmarks/RESULTS.md): the transforms cost more than AMX's direct
            # convolutions; the graph is ONNX Runtime's default.
            log.warning("this engine's U-Net has Winograd convolutions, which run 1.07x as long in OpenVINO "
                        "bf16 as direct ones; export with --conv direct for this backend")
        outputs = tuple(t.name for t in manifest.specs()[component].outputs)
        if self.static_shapes:
            return Component(component, None, outputs, path=path)  # compiled on its first call
        try:
            # By path, not a read model: with a compiled blob in CACHE_DIR, OpenVINO then never
            # reads the ONNX graph (load time, and a second copy of the weights in memory).
            compiled = self.core.compile_model(str(path), "CPU", self.config())
        except RuntimeError as e:  # OpenVINO's errors for bad or unsupported graphs
            raise EngineError(f"OpenVINO could not load {path} ({str(e).strip().splitlines()[0][:300]})") from None
        return Component(component, compiled.create_infer_request(), outputs)

    def compile_for(self, component: Component, shapes: tuple) -> None:
        """Compile `component` for exactly these input shapes, in place of what it held."""
        component.request = component.shapes = None  # the old compile's memory goes first
        sizes = dict(shapes)
        log.info("%s: compiling for this call's sizes (OpenVINO static shapes: once per size)", component.name)
        log.debug("%s: input shapes %s", component.name, sizes)
        t = time.perf_counter()
        try:
            model = self.core.read_model(str(component.path))
            model.reshape({port.get_any_name(): list(sizes[port.get_any_name()]) for port in model.inputs})
            compiled = self.core.compile_model(model, "CPU", self.config(cache=False))
        except RuntimeError as e:
            raise EngineError(f"OpenVINO could not compile {component.path} for {sizes} "
                              f"({str(e).strip().splitlines()[0][:300]})") from None
        component.request, component.shapes = compiled.create_infer_request(), shapes
        log.debug("%s: compiled in %.1f s", component.name, time.perf_counter() - t)

    def empty(self, shape, dtype=np.float32):
        return np.empty(tuple(shape), dtype)

    def upload(self, array: np.ndarray):
        return np.array(array, copy=True, order="C")

    def download(self, array) -> np.ndarray:
        return np.array(array, copy=True)

    def run(self, component: Component, run: Run) -> None:
        if component.path is not None:
            shapes = tuple(sorted((name, tuple(a.shape)) for name, a in run.inputs.items()))
            if shapes != component.shapes:
                self.compile_for(component, shapes)
        # share_inputs: OpenVINO reads our arrays in place; outputs are its own, copied out.
        results = component.request.infer(run.inputs, share_inputs=True)
        by_name = {port.get_any_name(): value for port, value in results.items()}
        for name in component.outputs:
            np.copyto(run.outputs[name], by_name[name], casting="same_kind")

    def run_steps(self, component: Component, runs: list[Run], key: tuple, on_step) -> None:
        run_loop(self.run, None, component, runs, on_step)  # step by step: no graphs on the CPU


def create(**options) -> OpenVinoBackend:
    return OpenVinoBackend(**options)
