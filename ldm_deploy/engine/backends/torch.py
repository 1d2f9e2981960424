"""PyTorch: AOTInductor packages or exported programs (`.pt2`; the latter compiled by
torch.compile on CUDA and run eagerly on the CPU, unless told otherwise), device arrays are
torch tensors, and on CUDA the whole denoising loop is captured as one CUDA graph.

Loading needs torch, not diffusers. The graph cache is keyed by what makes a capture valid:
the loop's shapes, steps, sampler and batch (the pipeline's key) plus which buffer sits in which
slot of which step. The pipeline allocates fresh buffers per call, so a cached graph owns its own
static twins of them: inputs are copied in before a replay and outputs copied out after it,
device to device, with no host synchronisation inside.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm_deploy.engine.backends import Run
from ldm_deploy.engine.backends.capture import GraphCache, buffers, graph_key, run_loop
from ldm_deploy.errors import BackendUnavailable, EngineError

log = logging.getLogger(__name__)


@dataclass
class Component:
    name: str
    run: object  # callable: positional inputs in spec order -> list of outputs
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


class TorchBackend:
    name = "torch"

    def __init__(self, device: str = "auto", cuda_graph: bool = True, compile: bool | None = None):
        """compile: what to do with components the engine holds as exported programs (no
        AOTInductor package: `ldm-export --no-aoti`, or AOTInductor failed there): True compiles
        them with torch.compile on their first call (70-90 s for SD 1.5 on an H100, about 15 s
        once Inductor's on-disk cache holds them), False runs them eagerly, None (the default)
        compiles on CUDA and not on the CPU. Measured on an H100 (benchmarks/RESULTS.md), SD 1.5
        at 512 px, 50 steps inside one CUDA graph: 0.397 s compiled against 0.647 s eager
        (channels-last U-Net: 0.348 s against 0.568 s)."""
        try:
            import torch
        except ImportError:
            raise BackendUnavailable("the torch backend needs PyTorch: pip install torch") from None
        self.torch = torch
        self._said: set[str] = set()  # what load() has told the user about this engine
        self.device_name = device
        self.cuda_graph = cuda_graph
        self.compile = compile
        self.graphs = GraphCache()  # of CapturedLoop, or None where capture failed

    def load(self, engine_dir: Path, manifest, component: str) -> Component:
        torch = self.torch
        built_for = manifest.build.get("device", "cpu")
        if self.device_name == "auto":
            self.device_name = built_for
        if self.device_name != built_for:
            raise BackendUnavailable(
                f"this engine was compiled for {built_for}; re-export with --device {self.device_name}"
            )
        if built_for == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("this engine was compiled for CUDA, and PyTorch sees no CUDA GPU here")
        self.device = torch.device(built_for)
        compile = compiles(self.compile, built_for)
        path = Path(engine_dir) / f"{component}.pt2"
        mode = manifest.build.get("modes", {}).get(component, "aoti")
        try:
            if mode == "aoti":
                # The single-threaded runner is the one that CUDA graphs can capture: the default
                # one queries events from its model pool, which stream capture forbids.
                runner = torch._inductor.aoti_load_package(str(path), run_single_threaded=built_for == "cuda")
            else:
                if manifest.build.get("attention") == "triton":
                    # The program calls ldm_deploy::attention by name (a package has the kernel
                    # compiled in): without the op registered, torch.export.load cannot read it.
                    import ldm_deploy.kernels.ops  # noqa: F401
                module = torch.export.load(str(path)).module()
                why, news = exported_why(manifest.build)
                # Once per engine, not per component: the reason is the engine's.
                say = log.debug if why in self._said else log.warning if news else log.info
                self._said.add(why)
                if compile:
                    say("exported programs compile with torch.compile on their first call, a "
                        "minute or so (%s; --no-torch-compile runs them uncompiled)", why)
                    runner = _compiled(module, component)
                else:
                    say("exported programs run uncompiled (%s; --torch-compile compiles them)", why)
                    runner = _eager(module)
        except Exception as e:  # torch raises RuntimeError / zipfile errors for damaged packages
            raise EngineError(f"PyTorch could not load {path} ({type(e).__name__}: {str(e)[:300]}); "
                              "re-export the engine") from None
        spec = manifest.specs()[component]
        return Component(component, runner, tuple(t.name for t in spec.inputs), tuple(t.name for t in spec.outputs))

    def empty(self, shape, dtype=np.float32):
        return self.torch.empty(tuple(shape), dtype=_torch_dtype(self.torch, dtype), device=self.device)

    def upload(self, array: np.ndarray):
        # A copy: on the CPU from_numpy shares the array's memory (two uploads of one array
        # would be one buffer).
        return self.torch.from_numpy(np.array(array, order="C", copy=True)).to(self.device)

    def download(self, array) -> np.ndarray:
        return array.cpu().numpy()

    def run(self, component: Component, run: Run) -> None:
        with self.torch.inference_mode():
            call(component, run)

    def run_steps(self, component: Component, runs: list[Run], key: tuple, on_step) -> None:
        loop = None
        if self.device.type == "cuda" and self.cuda_graph:
            full_key = graph_key(key, runs, lambda t: t.shape)
            if full_key not in self.graphs:
                self.graphs.put(full_key, self.capture(component, runs))  # evicted: freed by GC
            loop = self.graphs.get(full_key)
        run_loop(self.run, loop, component, runs, on_step)

    def capture(self, component: Component, runs: list[Run]) -> "CapturedLoop | None":
        try:
            return CapturedLoop(self, component, runs)
        except Exception as e:  # capture is an optimisation: fall back, say so once
            log.warning("CUDA graph capture failed (%s: %s); running the loop step by step", type(e).__name__, e)
            return None


class CapturedLoop:
    """The N runs of a loop recorded as one CUDA graph over static twins of their buffers."""

    def __init__(self, backend: TorchBackend, component: Component, runs: list[Run]):
        torch = backend.torch
        live = buffers(runs)
        self.twins = [t.clone() for t in live]
        index = {id(t): i for i, t in enumerate(live)}
        # Copy in what some step reads; copy out what some step writes.
        self.reads = sorted({index[id(v)] for r in runs for v in r.inputs.values()})
        self.writes = sorted({index[id(v)] for r in runs for v in r.outputs.values()})
        static = [Run({k: self.twins[index[id(v)]] for k, v in r.inputs.items()},
                      {k: self.twins[index[id(v)]] for k, v in r.outputs.items()}) for r in runs]
        # Warm up on a side stream (lazy init, workspace allocation), then capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for run in static:
                backend.run(component, run)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            for run in static:
                call(component, run)

    def replay(self, runs: list[Run]) -> None:
        live = buffers(runs)
        for i in self.reads:
            self.twins[i].copy_(live[i], non_blocking=True)
        self.graph.replay()
        for i in self.writes:
            live[i].copy_(self.twins[i], non_blocking=True)


def call(component: Component, run: Run) -> None:
    """Run once and copy the results into the bound output buffers."""
    outs = component.run(*[run.inputs[n] for n in component.inputs])
    if not isinstance(outs, (list, tuple)):  # a one-output package returns the bare tensor
        outs = (outs,)
    for name, value in zip(component.outputs, outs, strict=True):
        out = run.outputs[name]
        if out.shape != value.shape:  # copy_ would broadcast silently
            raise RuntimeError(f"{component.name}.{name}: produced {tuple(value.shape)}, bound {tuple(out.shape)}")
        out.copy_(value)


def compiles(option: bool | None, device: str) -> bool:
    """Whether exported programs get torch.compile: the option, or by default on CUDA only."""
    return device == "cuda" if option is None else option


def exported_why(build: dict) -> tuple[str, bool]:
    """Why an engine holds a component as an exported program, and whether that is news (a
    failure at export) rather than the user's choice (--no-aoti)."""
    if build.get("aoti_problem"):  # the toy package failed at export: no component was compiled
        return f"AOTInductor did not work where the engine was exported: a toy package {build['aoti_problem']}", True
    if build.get("aoti") is False:
        return "exported with --no-aoti", False
    return "AOTInductor failed when the engine was exported", True


def _compiled(module, name: str):
    """torch.compile of `module`, run like `_eager`; where compiling fails (no working Triton or C++
    compiler, an Inductor error), the component runs uncompiled from then on, with one warning."""
    import torch

    state = {"run": torch.compile(module)}

    def run(*args):
        with torch.inference_mode():
            try:
                return state["run"](*args)
            except Exception as e:  # Dynamo / Inductor raise many types; eager says if it was ours
                if state["run"] is module:
                    raise
                log.warning("%s: torch.compile failed (%s: %s); running it uncompiled", name, type(e).__name__,
                            str(e).strip().splitlines()[0][:200] if str(e).strip() else "")
                state["run"] = module
                return module(*args)

    return run


def _eager(module):
    import torch

    def run(*args):
        with torch.inference_mode():
            return module(*args)

    return run


def _torch_dtype(torch, dtype):
    return {np.dtype(np.float32): torch.float32, np.dtype(np.int64): torch.int64}[np.dtype(dtype)]


def create(**options) -> TorchBackend:
    return TorchBackend(**options)
