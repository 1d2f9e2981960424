"""ONNX Runtime: CPU everywhere; the CUDA execution provider where onnxruntime-gpu is installed.

Device arrays are OrtValues bound through IOBinding, so outputs land in preallocated buffers
and, on CUDA, nothing crosses to the host inside the loop. (Unverified on CUDA in this project:
onnxruntime-gpu is not installed on any machine we test on.)
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from ldm_deploy.engine.backends import Run, check_inputs, ort_cache
from ldm_deploy.engine.backends.capture import run_loop
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
        path = Path(engine_dir) / f"{component}.onnx"
        cached = self.cache_entry(manifest, component)
        session = None
        if cached is not None:
            session = self.load_saved(cached, component) or self.optimise_and_save(path, cached, component)
        session = session or self.open(path, self.options(optimize=True))
        check_inputs(engine_dir, manifest, component, [i.name for i in session.get_inputs()])
        return session

    def load_saved(self, cached: Path, component: str):
        """A session of the optimised graph saved in the cache, or None (none there, or damaged:
        then removed)."""
        if not ort_cache.is_complete(cached):
            return None
        try:
            # Saved fully optimised: optimising again would only repeat the work.
            session = self.session(cached / ort_cache.MODEL, self.options(optimize=False))
        except Exception as e:  # damaged or from an incompatible build: optimise afresh
            log.warning("%s: the cached optimised graph in %s could not be loaded (%s); optimising again",
                        component, cached, str(e)[:200])
            shutil.rmtree(cached, ignore_errors=True)
            return None
        ort_cache.touch(cached)
        log.debug("%s: ONNX Runtime's saved optimised graph from %s", component, cached)
        return session

    def optimise_and_save(self, path: Path, cached: Path, component: str):
        """A session of the engine's graph that also saves ONNX Runtime's optimised graph into the
        cache; None where saving failed (an unwritable cache, a full disk), to load without."""
        stage = ort_cache.staging(cached)
        shutil.rmtree(stage, ignore_errors=True)
        try:
            stage.mkdir(parents=True)
        except OSError as e:
            log.warning("%s: cannot save ONNX Runtime's optimised graph in %s (%s)", component, stage.parent, e)
            return None
        opts = self.options(optimize=True)
        opts.optimized_model_filepath = str(stage / ort_cache.MODEL)
        # Weights beside the graph, as in the engine: one protobuf holds at most 2 GB.
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", ort_cache.WEIGHTS)
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            session = self.session(path, opts)
        except Exception:  # the graph itself may be fine: open() says so, or why not
            shutil.rmtree(stage, ignore_errors=True)
            return None
        if ort_cache.commit(stage, cached):
            log.info("%s: saved ONNX Runtime's optimised graph (%.1f GB) in %s, so that later loads skip "
                     "optimising (%s=0 turns this off)", component, ort_cache.size(cached) / 1e9, cached.parent,
                     ort_cache.ENV)
            ort_cache.prune(keep=cached)
        return session

    def options(self, optimize: bool):
        opts = self.ort.SessionOptions()
        level = self.ort.GraphOptimizationLevel
        opts.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
        opts.log_severity_level = 3  # errors only: ORT warns about every unused initializer
        if self.threads:
            opts.intra_op_num_threads = self.threads
        return opts

    def session(self, path: Path, opts):
        return self.ort.InferenceSession(str(path), opts, providers=self.providers)

    def open(self, path: Path, opts):
        """A session of the engine's own graph; a file ONNX Runtime cannot read is the engine's fault."""
        try:
            return self.session(path, opts)
        except Exception as e:  # ORT raises its own exception types for bad files
            raise EngineError(
                f"ONNX Runtime could not load {path} ({type(e).__name__}: {str(e)[:300]}); the file is "
                "damaged or not an ONNX graph; re-export the engine with ldm-export --force"
            ) from None

    def cache_entry(self, manifest, component: str) -> Path | None:
        """Where this component's optimised graph is (or will be) kept; None: no caching (turned
        off, or a GPU provider, whose optimised graphs are its own)."""
        if self.device != "cpu" or not ort_cache.enabled():
            return None
        key = ort_cache.graph_key(manifest.files.get(component, {}), self.ort.__version__, "ORT_ENABLE_ALL",
                                  ort_cache.cpu_identity())
        return ort_cache.entry(component, key)

    def empty(self, shape, dtype=np.float32):
        return self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device, 0)

    def upload(self, array: np.ndarray):
        # A copy: on the CPU an OrtValue wraps the numpy array's memory, so two uploads of one
        # array would be one buffer (and a step writing one would change the other).
        return self.ort.OrtValue.ortvalue_from_numpy(np.array(array, order="C", copy=True), self.device, 0)

    def download(self, array) -> np.ndarray:
        # A copy: numpy() of a CPU OrtValue is a view that does not keep its memory alive, so
        # latents returned from a call's own buffers were read after ONNX Runtime freed them.
        return array.numpy().copy()

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
        run_loop(self.run, None, session, runs, on_step)


def create(**options) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(**options)
