"""TensorRT plans from the engine directory's ONNX graphs: options, profiles, progress, build.

`ldm-export --backend tensorrt` exports each component to ONNX as for ONNX Runtime (the U-Net and
VAE bodies in fp16, their interfaces and the sampler update in fp32; see `component_precisions`),
then builds a `.plan` from it as a strongly typed network: TensorRT keeps exactly the graph's
types, so the sampler update stays fp32 by construction (TensorRT 11 accepts nothing else; its
weakly typed BuilderFlag.FP16 is gone). The ONNX files stay in the engine directory, so plans made
stale by a new GPU or TensorRT version are rebuilt from them (`rebuild_plans`) without PyTorch.

The first half of this file is pure and tested without TensorRT: options and their validation,
the optimization profile, precisions per component, the progress estimate and the timing-cache
file name. The second half is the thin TensorRT layer.

UNVERIFIED: the TensorRT layer is written against the documented TensorRT 10 Python API (Builder,
OnnxParser.parse_from_file, IBuilderConfig, IProgressMonitor, timing caches) and has not run in
this project: TensorRT cannot be installed on our CI machines. `tensorrt` is imported lazily.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ldm_deploy.engine.backends.tensorrt import (
    RuntimeFacts,
    import_tensorrt,
    plan_file,
    runtime_facts,
    scratch_need,
)
from ldm_deploy.engine.manifest import COMPONENTS, MANIFEST, file_record
from ldm_deploy.engine.spec import ComponentSpec, DimRange
from ldm_deploy.errors import BackendUnavailable, EngineError, UserError

log = logging.getLogger(__name__)

OPT_LEVELS = range(6)  # TensorRT's builder optimization levels
# tensorrt/ in the cache folder ($LDM_DEPLOY_CACHE, else $XDG_CACHE_HOME/ldm-deploy, else
# ~/.cache/ldm-deploy: cache.cache_dir), found when a build starts (timing_cache_path)
DEFAULT_TIMING_CACHE = "<cache folder>/tensorrt"
# Dims a static-shape engine pins to their tuned value. cfg keeps its range: guidance <= 1 runs
# only the conditional half, and pinning cfg would refuse those requests (LCM / turbo models).
STATIC_DIMS = ("batch", "latent_height", "latent_width", "text_chunks")


@dataclass(frozen=True)
class TensorRTOptions:
    """How plans are built (precision is ExportConfig's: fp16 unless asked otherwise).

    optimization_level: TensorRT's builder_optimization_level, 0..5. Higher levels time more
      tactics: builds take longer (level 5 can take several times level 3, TensorRT's default),
      engines are sometimes faster; lower levels build fast for trying things out.
    static_shapes: build for exactly the tuned size and batch (--opt-size, batch 1): kernels are
      chosen for one shape and the engine refuses every other; cfg stays 1..2 (see STATIC_DIMS).
    refit: keep the weights refittable (for LoRA later). TensorRT then cannot fold weights into
      constants, so some fusions are lost and the U-Net can be slower; new weights must carry the
      graph's types (fp16), as the network is strongly typed.
    timing_cache: a folder that keeps TensorRT's kernel timings between builds (one file per
      TensorRT version and GPU): a rebuild of the same shapes skips most timing. None: no cache.
    """

    optimization_level: int = 3
    static_shapes: bool = False
    refit: bool = False
    timing_cache: str | None = DEFAULT_TIMING_CACHE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TensorRTOptions":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------
# Pure: options, profiles, precisions, progress


def check_build_options(options: TensorRTOptions, precision: str, dims: dict | None = None) -> list[str]:
    """Raise UserError for option combinations that cannot work; return caveats worth a warning.
    `dims` (the ranges the engine will accept) is checked when given."""
    if options.optimization_level not in OPT_LEVELS:
        raise UserError(f"--opt-level {options.optimization_level}: TensorRT's builder optimization level "
                        f"lies in 0..{OPT_LEVELS[-1]}")
    if precision not in ("fp16", "fp32"):
        raise UserError(f"TensorRT engines are fp16 or fp32, not {precision!r}")
    caveats = []
    for name, r in (dims or {}).items():
        if not r.min <= r.opt <= r.max:
            raise UserError(f"{name}: the tuned value {r.opt} lies outside [{r.min}, {r.max}]")
        if options.static_shapes and name in STATIC_DIMS and r.min != r.max:
            raise UserError(f"--static-shapes builds for one {name}, but the engine was to accept "
                            f"[{r.min}, {r.max}]; static engines take their ranges from static_dims")
    if options.static_shapes:
        caveats.append("static shapes: the engine accepts only its tuned size and batch "
                       "(guidance <= 1 still runs)")
    if options.refit:
        caveats.append("refit: weights stay refittable, which blocks some of TensorRT's weight folding and "
                       "fusions, so the U-Net can run slower; refit weights must be fp16 like the graph's")
    if precision == "fp32":
        caveats.append("fp32 plans: about twice the memory and time of fp16; use them to check accuracy")
    return caveats


def static_dims(dims: dict[str, DimRange]) -> dict[str, DimRange]:
    """The ranges of a static-shape engine: STATIC_DIMS pinned to their tuned value."""
    return {k: DimRange(r.opt, r.opt, r.opt) if k in STATIC_DIMS else r for k, r in dims.items()}


def plan_profile(spec: ComponentSpec, dims: dict[str, DimRange]) -> dict[str, tuple[tuple, tuple, tuple]]:
    """The optimization profile: input -> (min, opt, max) shapes, from the spec at the engine's
    ranges. Inputs whose shape is fixed (the coefficient rows) need no entry."""
    return {name: shapes for name, shapes in spec.profile(dims).items()
            if any(not isinstance(d, int) for d in spec.tensor(name).shape)}


def component_precisions(precision: str, vae_fp32: bool = False) -> dict[str, str]:
    """Precision of each component's body in the ONNX the plans are built from.

    The text encoder stays fp32 in fp16 engines: it runs once per prompt (noise next to 30 U-Net
    steps), and the TorchScript exporter writes type-inconsistent fp16 CLIP graphs
    (LayerNormalization with an fp32 input and fp16 scale; seen with torch 2.13), which a strongly
    typed build rejects. `vae_fp32`: so do the VAE's, for VAEs whose config says fp16 overflows in
    them (force_upcast: SDXL's), which diffusers then runs in fp32 too."""
    if precision == "fp32":
        return {c: "fp32" for c in COMPONENTS}
    kept = ("text_encoder", "vae_decoder", "vae_encoder") if vae_fp32 else ("text_encoder",)
    return {c: "fp32" if c in kept else "fp16" for c in COMPONENTS}


def nested_fraction(chain: list[tuple[int, int]]) -> float:
    """Fraction done of nested phases, outermost first: [(steps done, steps), ...]. The inner
    phase's fraction counts as part of the outer phase's current step."""
    f = 0.0
    for done, total in reversed(chain):
        f = min(max((done + f) / total, 0.0), 1.0) if total > 0 else 0.0
    return f


def time_left(elapsed: float, fraction: float) -> float | None:
    """Seconds left if the rest goes as fast as the part done; None while too little is done
    (under 2 % or 2 s) for the estimate to mean anything."""
    if fraction < 0.02 or elapsed < 2.0:
        return None
    return elapsed * (1.0 - fraction) / fraction


def should_report(last: tuple[float, float] | None, now: float, fraction: float,
                  every_s: float = 15.0, every_fraction: float = 0.1) -> bool:
    """Log a progress line at most every `every_s` seconds or `every_fraction` of progress;
    `last` is the (time, fraction) of the last line, None before the first."""
    if last is None:
        return True
    t, f = last
    return now - t >= every_s or fraction - f >= every_fraction


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def progress_line(label: str, fraction: float, elapsed: float) -> str:
    left = time_left(elapsed, fraction)
    tail = f", about {format_duration(left)} left" if left is not None else ""
    return f"{label}: TensorRT build {fraction:.0%} ({format_duration(elapsed)} elapsed{tail})"


class BuildProgress:
    """TensorRT's nested build phases -> one fraction done. TensorRT calls back from several
    threads, so updates hold a lock. Steps are numbered from 0: step k done means k + 1 done."""

    def __init__(self):
        self.lock = threading.Lock()
        self.phases: dict[str, list] = {}  # name -> [parent, steps done, steps]; in start order

    def start(self, name: str, parent: str | None, steps: int) -> None:
        with self.lock:
            self.phases[name] = [parent, 0, steps]

    def step(self, name: str, step: int) -> None:
        with self.lock:
            if name in self.phases:
                self.phases[name][1] = max(self.phases[name][1], step + 1)

    def finish(self, name: str) -> None:
        with self.lock:
            self.phases.pop(name, None)

    def fraction(self) -> float:
        """Follow the oldest running root phase down through its newest running child."""
        with self.lock:
            roots = [n for n, (p, _, _) in self.phases.items() if p is None or p not in self.phases]
            chain, name = [], roots[0] if roots else None
            while name is not None:
                _, done, total = self.phases[name]
                chain.append((done, total))
                children = [n for n, (p, _, _) in self.phases.items() if p == name]
                name = children[-1] if children else None
        return nested_fraction(chain)


def timing_cache_path(directory: str | None, facts: RuntimeFacts) -> Path | None:
    """One timing-cache file per TensorRT version and GPU (timings do not carry across)."""
    if not directory:
        return None
    if directory in (DEFAULT_TIMING_CACHE, "~/.cache/ldm-deploy/tensorrt"):  # (the latter: older manifests')
        from ldm_deploy.cache import cache_dir

        directory = str(cache_dir() / "tensorrt")
    gpu = re.sub(r"[^A-Za-z0-9.]+", "_", facts.gpu).strip("_")
    return Path(directory).expanduser() / f"timing-trt{facts.tensorrt}-sm{facts.compute_capability}-{gpu}.cache"


def build_facts(facts: RuntimeFacts, options: TensorRTOptions, precisions: dict[str, str],
                device_memory: dict[str, int]) -> dict:
    """What the manifest records about the plans: what they are tied to and how to rebuild them."""
    return {**facts.to_dict(), "options": options.to_dict(), "precisions": precisions,
            "device_memory": device_memory, "plans": {c: plan_file(c) for c in device_memory}}


# ---------------------------------------------------------------------------------------------
# The TensorRT layer


def build_plan(onnx_path: Path, spec: ComponentSpec, dims: dict[str, DimRange], options: TensorRTOptions,
               out: Path, label: str, facts: RuntimeFacts) -> int:
    """Build a strongly typed plan from `onnx_path` into `out`; returns the engine's scratch need
    (`scratch_need`). Logs progress with an estimate of the time left."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Strongly typed: TensorRT keeps the graph's types (TensorRT 11 always does; the flag stays accepted).
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strong is None else 1 << int(strong))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads the external data file beside it too
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in plan_profile(spec, dims).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = timing_cache_path(options.timing_cache, facts)
    blob = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(blob), False)
    config.progress_monitor = progress_monitor(trt, label)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build {label} from {onnx_path}; its log above says why")
    out.write_bytes(memoryview(plan))
    if cache_path:
        save_atomically(cache_path, memoryview(config.get_timing_cache().serialize()))
    return scratch_need(trt.Runtime(logger).deserialize_cuda_engine(plan))


def progress_monitor(trt, label: str):
    """A trt.IProgressMonitor that logs `progress_line`s (the class needs tensorrt to exist)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.progress, self.t0, self.last = BuildProgress(), time.monotonic(), None

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.progress.start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            self.progress.step(phase_name, step)
            now, f = time.monotonic(), self.progress.fraction()
            if should_report(self.last, now, f):
                self.last = (now, f)
                log.info(progress_line(label, f, now - self.t0))
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            self.progress.finish(phase_name)

    return Monitor()


def save_atomically(path: Path, data) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:  # a cache: losing it costs time, not correctness
        log.warning("could not save the TensorRT timing cache %s (%s)", path, e.strerror)


class TensorRTExporter:
    """ONNX of each component (as `OnnxExporter` writes it, fp16 bodies), then a plan from it."""

    doing = "ONNX, then a TensorRT plan (minutes for a full-size U-Net)"

    def __init__(self, src, config, dims, multiple):
        from ldm_deploy.engine.backends import cuda
        from ldm_deploy.export.build import OnnxExporter

        import_tensorrt()  # fail before any export work when TensorRT or the GPU is missing
        cuda.runtime()
        if cuda.gpu_count() == 0:
            raise BackendUnavailable("--backend tensorrt builds plans on the GPU that will run them, "
                                     "and CUDA sees none here")
        self.options, self.dims = config.tensorrt, dims
        for caveat in check_build_options(self.options, config.dtype_name, dims):
            log.warning(caveat)
        self.facts = runtime_facts()
        self.precisions = component_precisions(config.dtype_name, src.vae_upcast)
        self.onnx = OnnxExporter(src, config, dims, multiple, dtypes=self.precisions)
        self.device_memory: dict[str, int] = {}

    def __call__(self, name, spec, tmp: Path) -> list[Path]:
        files = self.onnx(name, spec, tmp)
        plan = tmp / plan_file(name)
        self.device_memory[name] = build_plan(files[0], spec, self.dims, self.options, plan, name, self.facts)
        return files + [plan]

    def build_facts(self) -> dict:
        return build_facts(self.facts, self.options, self.precisions, self.device_memory)


def rebuild_plans(engine_dir: Path, manifest, facts: RuntimeFacts | None = None):
    """Rebuild every plan of an engine directory from its ONNX graphs for this machine, then
    record the new plans in the manifest. Returns the new manifest. (Plans are written beside
    the old ones and renamed into place, then the manifest; an interrupt leaves either the old
    state or plans that the manifest check reports as changed.)"""
    engine_dir = Path(engine_dir)
    facts = facts or runtime_facts()
    options = TensorRTOptions.from_dict(manifest.build.get("options", {}))
    specs, built, device_memory = manifest.specs(), {}, {}
    components = [c for c in COMPONENTS if c in manifest.files]  # no vae_encoder in txt2img-only engines
    try:
        for i, name in enumerate(components, 1):
            log.info("[%d/%d] %s: rebuilding the TensorRT plan", i, len(components), name)
            tmp = engine_dir / f".{plan_file(name)}.{uuid.uuid4().hex[:8]}"
            built[name] = tmp
            device_memory[name] = build_plan(engine_dir / f"{name}.onnx", specs[name], manifest.dims, options,
                                             tmp, name, facts)
    except BaseException:
        for tmp in built.values():
            tmp.unlink(missing_ok=True)
        raise
    files = {k: dict(v) for k, v in manifest.files.items()}
    for name, tmp in built.items():
        os.replace(tmp, engine_dir / plan_file(name))
        files[name][plan_file(name)] = file_record(engine_dir / plan_file(name))
    new = replace(manifest, files=files, build={**manifest.build, **facts.to_dict(), "device_memory": device_memory})
    tmp = engine_dir / f".{MANIFEST}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(new.to_dict(), indent=2))
    os.replace(tmp, engine_dir / MANIFEST)
    return new
