"""TensorRT: fp16 plans built from the engine directory's ONNX graphs, run with
`execute_async_v3` on one stream; on a GPU the whole denoising loop is one CUDA graph.

Device memory, the stream and graphs come from cuda-python (`backends/cuda.py`). All engines
share one scratch buffer (their activations are never live at once), sized by the largest
engine's `device_memory_size_v2`. The loop is captured once per `graph_key` into static arenas
laid out by `capture.loop_plan` (per-step addresses and coefficient-table rows baked in), then
replayed with the live buffers copied in and out around it: no host synchronisation inside,
the one synchronisation is the final download.

The first half of this file is pure and tested on machines without a GPU: which dims a set of
bound shapes means, checks against the engine's profile, buffer and scratch sizing, plan
staleness, and the auto choice of backend. The second half is the thin TensorRT layer.

UNVERIFIED: the TensorRT layer is written against the documented TensorRT 10 Python API
(name-based I/O, execute_async_v3, USER_MANAGED context memory; TensorRT 11 keeps these) and has
not run in this project: TensorRT cannot be installed on our CI machines. `tensorrt` is
imported lazily, only by this file's classes and `export/tensorrt_build.py`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm_deploy.engine.backends import Run
from ldm_deploy.engine.backends.capture import ALIGNMENT, GraphCache, align, buffers, graph_key, loop_plan, run_loop
from ldm_deploy.engine.spec import ComponentSpec, DimRange
from ldm_deploy.errors import BackendUnavailable, EngineError, InvalidRequest

log = logging.getLogger(__name__)

PLAN_SUFFIX = ".plan"


def plan_file(component: str) -> str:
    return component + PLAN_SUFFIX


# ---------------------------------------------------------------------------------------------
# Pure: shapes, sizes, staleness, choice


def dims_of(spec: ComponentSpec, shapes: dict[str, tuple]) -> dict[str, int]:
    """The values of the spec's symbolic dims that the bound shapes mean. Raises ValueError
    when a shape does not fit the spec or two tensors disagree (a caller's bug, not the user's)."""
    dims: dict[str, int] = {}
    for t in spec.inputs + spec.outputs:
        if t.name not in shapes:
            raise ValueError(f"{spec.name}: nothing bound to {t.name!r}")
        got = tuple(shapes[t.name])
        if len(got) != len(t.shape):
            raise ValueError(f"{spec.name}.{t.name}: bound shape {got}, the spec has {len(t.shape)} axes")
        for axis, (want, n) in enumerate(zip(t.shape, got)):
            if isinstance(want, int):
                if n != want:
                    raise ValueError(f"{spec.name}.{t.name}: axis {axis} is {n}, the spec fixes it at {want}")
                continue
            if n % want.factor:
                raise ValueError(f"{spec.name}.{t.name}: axis {axis} is {n}, not a multiple of {want.factor}")
            if dims.setdefault(want.name, n // want.factor) != n // want.factor:
                raise ValueError(f"{spec.name}.{t.name}: {want.name} is {n // want.factor} here, "
                                 f"{dims[want.name]} in another tensor")
    return dims


def check_profile(component: str, dims: dict[str, int], ranges: dict[str, DimRange]) -> None:
    """InvalidRequest, with the fix, for dims outside what the plan was built for."""
    for name, value in dims.items():
        r = ranges[name]
        if not r.min <= value <= r.max:
            what = f"[{r.min}, {r.max}]" if r.min < r.max else f"only {r.min} (static shapes)"
            raise InvalidRequest(
                f"{component}: {name} {value} is outside what this TensorRT engine was built for: {what}; "
                "re-export with wider --min-size / --max-size / --max-batch / --max-prompt-tokens (or without "
                "--static-shapes)"
            )


@dataclass(frozen=True)
class TensorBuffer:
    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int  # what the tensor holds
    padded: int  # what an allocation for it takes, aligned


def buffer_plan(spec: ComponentSpec, dims: dict[str, int], alignment: int = ALIGNMENT) -> dict[str, TensorBuffer]:
    """Every input and output of `spec` at `dims`: shape, dtype and bytes."""
    out = {}
    for t in spec.inputs + spec.outputs:
        nbytes = t.nbytes(dims)
        out[t.name] = TensorBuffer(t.resolve(dims), np.dtype(t.dtype), nbytes, align(nbytes, alignment))
    return out


def check_bindings(spec: ComponentSpec, arrays: dict[str, object]) -> dict[str, int]:
    """Dims of a run's bound arrays (anything with .shape and .dtype), checked against the spec;
    raises ValueError on a mismatch. Returns the dims."""
    dims = dims_of(spec, {n: a.shape for n, a in arrays.items()})
    for name, buf in buffer_plan(spec, dims).items():
        if np.dtype(arrays[name].dtype) != buf.dtype:
            raise ValueError(f"{spec.name}.{name}: bound {np.dtype(arrays[name].dtype)}, the engine takes {buf.dtype}")
    return dims


def scratch_bytes(needs, alignment: int = ALIGNMENT) -> int:
    """One scratch buffer for engines that never run at once: the largest need, aligned."""
    return align(max(needs, default=0), alignment)


def scratch_resize(current: int, need: int, alignment: int = ALIGNMENT) -> int | None:
    """The new scratch size when an engine needs more than `current`, else None."""
    return align(need, alignment) if need > current else None


@dataclass(frozen=True)
class RuntimeFacts:
    """What a plan is tied to: plans run only on the TensorRT version and GPU they were built for."""

    tensorrt: str  # "10.8.0.43"
    gpu: str  # "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "9.0"

    def to_dict(self) -> dict:
        return {"tensorrt": self.tensorrt, "gpu": self.gpu, "compute_capability": self.compute_capability}


def stale_reasons(build: dict, here: RuntimeFacts) -> list[str]:
    """Why the plans recorded in a manifest's `build` cannot run here; empty when they can."""
    missing = [k for k in ("tensorrt", "gpu", "compute_capability") if not build.get(k)]
    if missing:
        return [f"the manifest does not record the {', '.join(missing)} the plans were built with"]
    reasons = []
    if build["tensorrt"] != here.tensorrt:
        reasons.append(f"they were built with TensorRT {build['tensorrt']}, this machine has {here.tensorrt}")
    if build["compute_capability"] != here.compute_capability:
        reasons.append(f"they were built for compute capability {build['compute_capability']} "
                       f"({build['gpu']}), this GPU is {here.compute_capability} ({here.gpu})")
    elif build["gpu"] != here.gpu:
        reasons.append(f"they were built and tuned on {build['gpu']}, this GPU is {here.gpu}")
    return reasons


def stale_message(engine_dir: Path, source: str, reasons: list[str]) -> str:
    return (
        f"the TensorRT plans in {engine_dir} cannot run here: {'; '.join(reasons)}. Rebuild them from the "
        f"ONNX graphs kept in the engine directory with `ldm-run --engine {engine_dir} --rebuild-stale ...` "
        f"(Python: Pipeline.load(..., rebuild_stale=True)), or re-export with "
        f"`ldm-export --model {source} --backend tensorrt --out {engine_dir} --force`"
    )


def choose_backend(built_for: str, plans_present: bool, unavailable: str | None) -> tuple[str, str | None]:
    """The backend "auto" means: TensorRT when the engine directory has plans and TensorRT and a
    GPU are here (`unavailable` is None); without them, ONNX Runtime on the ONNX graphs that a
    TensorRT engine directory keeps. Returns (backend, a note to log or None)."""
    if not plans_present:
        return ("onnxruntime" if built_for == "tensorrt" else built_for), None
    if unavailable is None:
        return "tensorrt", None
    return "onnxruntime", (f"this engine's TensorRT plans cannot run here ({unavailable}); running its ONNX "
                           "graphs on ONNX Runtime instead (slower)")


def has_plans(manifest) -> bool:
    return any(name.endswith(PLAN_SUFFIX) for files in manifest.files.values() for name in files)


# ---------------------------------------------------------------------------------------------
# The TensorRT layer


def import_tensorrt():
    """The `tensorrt` module; BackendUnavailable saying how to get it."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the package is there, libnvinfer is not
        raise BackendUnavailable(
            f"the tensorrt backend needs NVIDIA TensorRT 10+ (import failed: {e}); on a machine with an NVIDIA "
            "GPU: pip install 'ldm-deploy[tensorrt]' (tensorrt and cuda-python), or choose --backend onnxruntime"
        ) from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise BackendUnavailable(f"TensorRT {trt.__version__} is too old: the tensorrt backend needs TensorRT 10+")
    return trt


def unavailable_reason() -> str | None:
    """Why TensorRT plans cannot run on this machine, or None when they can."""
    from ldm_deploy.engine.backends import cuda

    try:
        import_tensorrt()
        cuda.runtime()
    except BackendUnavailable as e:
        return str(e).split(" (import failed", 1)[0]
    if cuda.gpu_count() == 0:
        return "no CUDA GPU is visible"
    return None


def scratch_need(engine) -> int:
    """An engine's activation memory over all its shapes (device_memory_size_v2 from TensorRT 10.1,
    the only name TensorRT 11 keeps)."""
    need = getattr(engine, "device_memory_size_v2", None)
    return int(need if need is not None else engine.device_memory_size)


def runtime_facts() -> RuntimeFacts:
    from ldm_deploy.engine.backends import cuda

    trt = import_tensorrt()
    gpu = cuda.device_facts(0)
    return RuntimeFacts(trt.__version__, gpu.name, gpu.compute_capability)


def auto_backend(manifest) -> str:
    """`Pipeline.load(backend="auto")`: see `choose_backend`; logs a fallback once."""
    plans = has_plans(manifest)
    name, note = choose_backend(manifest.backend, plans, unavailable_reason() if plans else None)
    if note:
        log.warning(note)
    return name


@dataclass
class Component:
    name: str
    spec: ComponentSpec
    engine: object  # trt.ICudaEngine
    context: object  # trt.IExecutionContext
    ranges: dict[str, DimRange]
    input_shapes: dict[str, tuple]  # what the context has been given, to skip unchanged ones


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, device: str = "auto", cuda_graph: bool = True, rebuild_stale: bool = False,
                 graph_cache: int = 8):
        """cuda_graph: capture the denoising loop as one CUDA graph (falls back, with one log line,
        when capture fails). rebuild_stale: rebuild plans made for another GPU or TensorRT version
        from the engine directory's ONNX (minutes) instead of refusing them. graph_cache: how many
        captured loops (each holds its own latents and noise memory) to keep."""
        if device not in ("auto", "cuda"):
            raise BackendUnavailable(f"TensorRT runs on NVIDIA GPUs only; device {device!r} is not one")
        from ldm_deploy.engine.backends import cuda

        self.trt = import_tensorrt()
        if cuda.gpu_count() == 0:
            raise BackendUnavailable("the tensorrt backend needs an NVIDIA GPU, and CUDA sees none here")
        self.facts = runtime_facts()
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.stream = cuda.Stream()
        self.memory = cuda.Memory(self.stream)
        self.cuda_graph, self.rebuild_stale = cuda_graph, rebuild_stale
        self.graphs = GraphCache(graph_cache)
        self.components: list[Component] = []
        self.scratch, self.scratch_size = 0, 0
        self.checked: dict[Path, object] = {}  # engine dir -> its (possibly rebuilt) manifest

    # -- lifecycle: load ------------------------------------------------------------------------
    def load(self, engine_dir, manifest, component: str) -> Component:
        engine_dir = Path(engine_dir)
        manifest = self.checked.get(engine_dir) or self.check_engine(engine_dir, manifest)
        path = engine_dir / plan_file(component)
        try:
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        except OSError as e:
            raise EngineError(f"cannot read {path}: {e.strerror}") from None
        if engine is None:  # TensorRT logged why
            raise EngineError(f"TensorRT could not load {path}; re-export the engine with --backend tensorrt")
        spec = manifest.specs()[component]
        self.check_io(engine, spec, path)
        strategy = self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        context = engine.create_execution_context(strategy)
        recorded = manifest.build.get("device_memory", {}).values()
        self.ensure_scratch(scratch_bytes([scratch_need(engine), *recorded]))
        self.bind_scratch(context)
        comp = Component(component, spec, engine, context, manifest.dims, {})
        self.components.append(comp)
        return comp

    def check_engine(self, engine_dir: Path, manifest):
        """Refuse (or rebuild) plans made for another TensorRT version or GPU."""
        if not has_plans(manifest):
            raise EngineError(f"{engine_dir} holds no TensorRT plans (it was exported for {manifest.backend}); "
                              f"re-export with `ldm-export --backend tensorrt`")
        reasons = stale_reasons(manifest.build, self.facts)
        if reasons and not self.rebuild_stale:
            raise EngineError(stale_message(engine_dir, manifest.model.source, reasons))
        if reasons:
            from ldm_deploy.export.tensorrt_build import rebuild_plans

            log.warning("rebuilding the TensorRT plans in %s: %s", engine_dir, "; ".join(reasons))
            manifest = rebuild_plans(engine_dir, manifest, self.facts)
        self.checked[engine_dir] = manifest
        return manifest

    def check_io(self, engine, spec: ComponentSpec, path: Path) -> None:
        trt = self.trt
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        for t in spec.inputs + spec.outputs:
            if t.name not in names:
                raise EngineError(f"{path} has no tensor {t.name!r}; re-export the engine")
            if np.dtype(trt.nptype(engine.get_tensor_dtype(t.name))) != np.dtype(t.dtype):
                raise EngineError(f"{path}: {t.name} is {engine.get_tensor_dtype(t.name)}, the spec says {t.dtype}; "
                                  "re-export the engine")

    def ensure_scratch(self, need: int) -> None:
        """Grow the shared scratch buffer; every context is re-pointed and captured loops (which
        baked the old address in) are dropped."""
        size = scratch_resize(self.scratch_size, need)
        if size is None:
            return
        if self.scratch:
            self.free_loops(self.graphs.clear())
            self.memory.free(self.scratch)
        self.scratch, self.scratch_size = self.memory.alloc(size), size
        log.debug("TensorRT scratch: %.1f MiB", size / 2**20)
        for comp in self.components:
            self.bind_scratch(comp.context)

    def bind_scratch(self, context) -> None:
        if hasattr(context, "set_device_memory"):
            context.set_device_memory(self.scratch, self.scratch_size)  # TensorRT >= 10.1
        else:
            context.device_memory = self.scratch

    # -- memory ---------------------------------------------------------------------------------
    def empty(self, shape, dtype=np.float32):
        return self.memory.empty(tuple(shape), dtype)

    def upload(self, array: np.ndarray):
        return self.memory.upload(array)

    def download(self, array) -> np.ndarray:
        return self.memory.download(array)  # the one synchronisation of a generation

    # -- run ------------------------------------------------------------------------------------
    def run(self, component: Component, run: Run) -> None:
        self.prepare(component, run)
        self.bind(component, {n: a.ptr for n, a in {**run.inputs, **run.outputs}.items()})
        self.execute(component)

    def prepare(self, component: Component, run: Run) -> None:
        """Check the bindings, then give the context the input shapes that changed."""
        dims = check_bindings(component.spec, {**run.inputs, **run.outputs})
        check_profile(component.name, dims, component.ranges)
        for name in (t.name for t in component.spec.inputs):
            shape = tuple(run.inputs[name].shape)
            if component.input_shapes.get(name) != shape:
                if not component.context.set_input_shape(name, shape):
                    raise RuntimeError(f"TensorRT refused shape {shape} for {component.name}.{name}")
                component.input_shapes[name] = shape

    def bind(self, component: Component, addresses: dict[str, int]) -> None:
        for name, ptr in addresses.items():
            component.context.set_tensor_address(name, ptr)

    def execute(self, component: Component) -> None:
        if not component.context.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"TensorRT failed to enqueue {component.name} (its log above says why)")

    def run_steps(self, component: Component, runs: list[Run], key: tuple, on_step) -> None:
        full_key = graph_key(key, runs, lambda a: a.shape)
        if self.cuda_graph and full_key not in self.graphs:
            self.free_loops(self.graphs.put(full_key, self.capture(component, runs)))
        loop = self.graphs.get(full_key) if self.cuda_graph else None
        run_loop(self.run, loop, component, runs, on_step)

    def capture(self, component: Component, runs: list[Run]) -> "CapturedLoop | None":
        self.prepare(component, runs[0])  # bad requests fail here, not as a capture failure

        def enqueue(addresses: dict[str, int]) -> None:
            self.bind(component, addresses)
            self.execute(component)

        try:
            return CapturedLoop(self.memory, self.stream, runs, enqueue)
        except Exception as e:  # capture is an optimisation: fall back, say so once per key
            log.warning("CUDA graph capture failed (%s: %s); running the loop step by step", type(e).__name__, e)
            return None

    def free_loops(self, loops) -> None:
        for loop in loops:
            loop.free()

    def close(self) -> None:
        """Unload: free captured loops and the scratch buffer (engines go with their contexts)."""
        self.free_loops(self.graphs.clear())
        if self.scratch:
            self.memory.free(self.scratch)
        self.scratch, self.scratch_size, self.components = 0, 0, []


class CapturedLoop:
    """The N runs of a loop recorded as one CUDA graph over static arenas (see `loop_plan`).
    `enqueue(addresses)` puts one step on the stream with its tensors at those addresses."""

    def __init__(self, memory, stream, runs: list[Run], enqueue):
        from ldm_deploy.engine.backends import cuda

        self.memory = memory
        self.plan = loop_plan(runs, lambda a: a.nbytes)
        self.arenas: dict[str, int] = {}
        self.graph = None
        try:
            for name, nbytes in self.plan.arenas.items():
                self.arenas[name] = memory.alloc(nbytes)
            steps = [{n: self.address(p) for n, p in step.items()} for step in self.plan.steps]
            # TensorRT's advice: one enqueue after a shape change before capturing (it may
            # update internal state then); shapes are the same at every step.
            enqueue(steps[0])

            def record():
                for addresses in steps:
                    enqueue(addresses)

            self.graph = cuda.Graph(stream, record)
        except BaseException:
            self.free()
            raise

    def address(self, place) -> int:
        return self.arenas[place.arena] + place.offset

    def replay(self, runs: list[Run]) -> None:
        """Copy the live inputs in, launch, copy the outputs out: all on the stream, no sync."""
        live = buffers(runs)
        for i, place, nbytes in self.plan.copy_in:
            self.memory.copy(self.address(place), live[i].ptr, nbytes)
        self.graph.launch()
        for place, i, nbytes in self.plan.copy_out:
            self.memory.copy(live[i].ptr, self.address(place), nbytes)

    def free(self) -> None:
        if self.graph is not None:
            self.graph.destroy()
            self.graph = None
        for ptr in self.arenas.values():
            self.memory.free(ptr)
        self.arenas = {}


def create(**options) -> TensorRTBackend:
    return TensorRTBackend(**options)
