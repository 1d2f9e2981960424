"""ONNX Runtime: CPU everywhere; the CUDA execution provider where onnxruntime-gpu is installed.

Device arrays are OrtValues bound through IOBinding, so outputs land in preallocated buffers
and, on CUDA, nothing crosses to the host inside the loop. (Unverified on CUDA in this project:
onnxruntime-gpu is not installed on any machine we test on.)
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ldm_deploy.engine.backends import Run
from ldm_deploy.errors import BackendUnavailable, EngineError

log = logging.getLogger(__name__)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, device: str = "auto", threads: int | None = None):
        import onnxruntime as ort

        self.ort = ort
        available = ort.get_available_providers()
        if device == "auto":
            device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise BackendUnavailable(
                "ONNX Runtime has no CUDA execution provider here; install onnxruntime-gpu, or use device 'cpu'"
            )
        self.device = device
        self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self.threads = threads

    def load(self, engine_dir: Path, manifest, component: str):
        opts = self.ort.SessionOptions()
        opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: ORT warns about every unused initializer
        if self.threads:
            opts.intra_op_num_threads = self.threads
        path = Path(engine_dir) / f"{component}.onnx"
        try:
            session = self.ort.InferenceSession(str(path), opts, providers=self.providers)
        except Exception as e:  # ORT raises its own exception types for bad files
            raise EngineError(
                f"ONNX Runtime could not load {path} ({type(e).__name__}: {str(e)[:300]}); the file is "
                "damaged or not an ONNX graph; re-export the engine with ldm-export --force"
            ) from None
        return session

    def empty(self, shape, dtype=np.float32):
        return self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device, 0)

    def upload(self, array: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def download(self, array) -> np.ndarray:
        return array.numpy()

    def run(self, session, run: Run) -> None:
        binding = session.io_binding()
        for name, value in run.inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in run.outputs.items():
            binding.bind_ortvalue_output(name, value)
        session.run_with_iobinding(binding)

    def run_steps(self, session, runs: list[Run], key: tuple, on_step) -> None:
        # No graph capture here: ONNX Runtime's CUDA graphs need fixed input addresses for
        # every run, which a ping-pong step loop does not have.
        for i, run in enumerate(runs):
            self.run(session, run)
            on_step(i)


def create(**options) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(**options)
