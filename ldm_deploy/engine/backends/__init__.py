"""Backends: one file each, one small interface (`Backend`), chosen once at load time.

A backend loads components, owns device arrays, moves numpy arrays in and out, and runs a
component on named device arrays. `run_steps` runs the denoising loop; GPU backends capture it
as one graph. The pipeline never does tensor math itself.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from ldm_deploy.errors import BackendUnavailable, EngineError, UserError

# name -> module under ldm_deploy.engine.backends; the module defines `create()`.
BACKENDS = {"onnxruntime": "onnxruntime", "torch": "torch", "tensorrt": "tensorrt", "openvino": "openvino"}


@dataclass(frozen=True)
class Run:
    """One component run: input and output names bound to device arrays."""

    inputs: dict[str, Any]
    outputs: dict[str, Any]


class Backend(Protocol):
    name: str

    def load(self, engine_dir, manifest, component: str) -> Any:
        """Load one component of the engine directory; returns a handle for `run`."""

    def empty(self, shape: tuple[int, ...], dtype=np.float32) -> Any:
        """A device array of that shape, contents undefined."""

    def upload(self, array: np.ndarray) -> Any:
        """A device array holding a copy of `array`."""

    def download(self, array: Any) -> np.ndarray:
        """A host copy of a device array (synchronises)."""

    def run(self, component: Any, run: Run) -> None:
        """Run a component once, reading `run.inputs` and writing `run.outputs`."""

    def run_steps(self, component: Any, runs: list[Run], key: tuple, on_step: Callable[[int], None]) -> None:
        """Run the same component over a prepared sequence of bindings (the denoising loop).
        `key` names what makes a captured graph reusable (shapes, steps, sampler, batch)."""


def auto(manifest) -> str:
    """What backend "auto" means for an engine directory: the one it was built for, except that a
    TensorRT engine runs its kept ONNX graphs on ONNX Runtime where TensorRT or a GPU is missing."""
    from ldm_deploy.engine.backends.tensorrt import auto_backend

    return auto_backend(manifest)


#: Engine kind (the manifest's backend) -> the backends that can run it. ONNX Runtime and OpenVINO
#: run the ONNX graphs that onnxruntime and tensorrt engines hold; a torch engine holds none.
RUNS = {"onnxruntime": ("onnxruntime", "openvino"), "tensorrt": ("tensorrt", "onnxruntime", "openvino"),
        "torch": ("torch",)}


def check_compatible(name: str, manifest) -> None:
    """A UserError with the fix when backend `name` cannot run this engine (instead of a
    missing-file error from deep inside the backend)."""
    can = RUNS.get(manifest.backend, ())
    if name in BACKENDS and name not in can:
        raise UserError(
            f"this engine was built for {manifest.backend} and runs on {' or '.join(can)}, not "
            f"{name}: drop --backend (backend='auto'), or re-export the model with "
            f"`ldm-export --backend {name if name != 'openvino' else 'onnxruntime'}`")


def create(name: str, **options) -> Backend:
    """Instantiate a backend by name; raises BackendUnavailable with the reason."""
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module = importlib.import_module(f"ldm_deploy.engine.backends.{BACKENDS[name]}")
    try:
        return module.create(**options)
    except TypeError as e:  # an option this backend does not have (e.g. threads for torch)
        if "unexpected keyword argument" not in str(e):
            raise
        option = str(e).rsplit("'", 2)[-2]
        raise UserError(f"the {name} backend has no option {option!r}") from None


def check_inputs(engine_dir, manifest, component: str, names: list[str]) -> None:
    """An EngineError where a component's graph takes other inputs than its spec gives it: an
    engine written by another version of ldm-deploy than its manifest's format says (the run
    would fail inside the backend with a message about tensor names)."""
    want = [t.name for t in manifest.specs()[component].inputs]
    if sorted(names) != sorted(want):
        raise EngineError(f"{engine_dir}: its {component} takes the inputs {', '.join(names)}, where this "
                          f"ldm-deploy gives {', '.join(want)}: it was exported by another version; re-export it "
                          f"with `ldm-export --model {manifest.model.source} --out {engine_dir} --force`")
