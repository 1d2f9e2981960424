"""`export_engine`: a diffusers model in, a self-contained engine directory out."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from ldm_deploy.engine.manifest import (
    COMPONENTS,
    MANIFEST,
    TOKENIZER,
    Manifest,
    file_record,
)
from ldm_deploy.engine.spec import component_specs
from ldm_deploy.errors import ModelSourceError, UserError
from ldm_deploy.export.config import ExportConfig
from ldm_deploy.export import controlnet, embeddings, lora, upscalers
from ldm_deploy.export.engine_dir import check_out, staging_dir
from ldm_deploy.export.records import model_info, tool_versions, vae_scale, write_tokenizer
from ldm_deploy.export.single_file import PICKLE_SUFFIXES, SAFE_SUFFIXES
from ldm_deploy.export.source import SourceModel, load_source
from ldm_deploy.export.tensorrt_build import TensorRTExporter
from ldm_deploy.export.tiling import make_seamless

log = logging.getLogger(__name__)


def load_model(model: str, config: ExportConfig) -> SourceModel:
    """The source model as the engine will hold it: its VAE replaced, its LoRAs merged."""
    src = load_source(model, config.allow_pickle, config.model_config, config.prediction_type, config.vae)
    if src.refiner and (config.loras or config.embeddings or config.controlnets):
        what = "--lora" if config.loras else "--embedding" if config.embeddings else "--controlnet"
        raise ModelSourceError(f"{model} is an SDXL refiner; {what} is not offered for refiners (they are "
                               "made for base models: give it to the base model's export)")
    if config.loras:
        lora.merge(src, config.loras, config.allow_pickle)
    if config.embeddings:
        embeddings.add(src, config.embeddings, config.allow_pickle)
    if config.controlnets:
        controlnet.load(src, config.controlnets, config.allow_pickle)
    if config.tiling:
        log.info("tiling: %d convolutions pad circularly", make_seamless(src.unet, src.vae))
    return src


def check_files(config: ExportConfig) -> None:
    """The files merged into the model or exported beside it, found before minutes of loading it
    (a --vae or --controlnet without a checkpoint's suffix may be a folder or a hub id: theirs
    are found as they load)."""
    given = [("--lora", path) for path, _ in config.loras] + [("--embedding", path) for path, _ in config.embeddings]
    given += [("--vae", path) for path in [config.vae] if path] + [("--controlnet", path) for path in config.controlnets]
    for flag, path in given:
        must = flag in ("--lora", "--embedding") or Path(path).suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES
        if must and not Path(path).expanduser().exists():
            raise ModelSourceError(f"{flag} {path}: no such file")


def export_engine(model: str, out: str | Path, config: ExportConfig = ExportConfig(),
                  extra_files: dict[str, str] | None = None) -> Path:
    """Export `model` (a diffusers folder, hub id or single-file checkpoint) to the engine directory
    `out`. extra_files: name -> text, written beside the engine's files, in place with them at
    once (the cache's record of what it was exported from)."""
    out = Path(out)
    check_out(out, config.force, model)  # before minutes of loading (or downloading) the model
    check_files(config)
    t0 = time.perf_counter()
    upscale_models = upscalers.prepare(config.upscalers, config.allow_pickle)
    log.info("loading %s", model)
    src = load_model(model, config)
    info = replace(model_info(src), tiling=config.tiling)
    multiple = size_multiple(src, config.backend)
    dims = config.dims(src.unet.config.sample_size, multiple, info.vae_scale, info.text_length - 2)
    specs = component_specs(info.facts)
    config, aoti_problem = settle_aoti(config)
    exporter = EXPORTERS[config.backend](src, config, dims, multiple)
    if aoti_problem:
        exporter.aoti_problem = aoti_problem

    if info.inpainting and not config.img2img:
        log.warning("%s is an inpainting model, whose every step takes the masked image's latents: "
                    "exporting its VAE encoder despite --no-img2img", model)
    img2img = config.img2img or info.inpainting
    components = COMPONENTS if img2img else tuple(c for c in COMPONENTS if c != "vae_encoder")
    jobs = export_jobs(config, len(components), source_bytes(src))
    with staging_dir(out, config.force) as tmp:
        if jobs > 1:
            written = export_in_processes(model, config, dims, multiple, exporter, components, specs, tmp, jobs)
        else:
            written = export_in_turn(exporter, components, specs, tmp)
        files = {name: {p.name: file_record(p) for p in paths} for name, paths in written.items()}
        pad_id = write_tokenizer(src, info.text_length, tmp / TOKENIZER)
        files["tokenizer"] = {TOKENIZER: file_record(tmp / TOKENIZER)}
        upscaler_records = upscalers.export(upscale_models, tmp)
        for name, rec in upscaler_records.items():
            files[upscalers.COMPONENT + name] = {rec["file"]: file_record(tmp / rec["file"])}
        manifest = Manifest(
            model=info,
            backend=config.backend,
            precision=config.dtype_name,
            dims=dims,
            files=files,
            tokenizer_pad_id=pad_id,
            size_multiple=multiple,
            upscalers=upscaler_records,
            build=exporter.build_facts(),
            tools=tool_versions(),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))
    log.info("wrote %s in %.1f s", out, time.perf_counter() - t0)
    return out


# Devices whose AOTInductor is tried on a toy package before the components' (minutes each)
# are compiled: where it has been seen to crash every package.
PROBED_DEVICES = ("cuda",)


def settle_aoti(config: ExportConfig) -> tuple[ExportConfig, str | None]:
    """The config to export with, and why AOTInductor was given up, if it was: a torch engine
    for a probed device whose toy package fails (aoti_check.probe) is exported as with --no-aoti."""
    if config.backend != "torch" or not config.aoti or config.device not in PROBED_DEVICES:
        return config, None
    import torch

    if config.device == "cuda" and not torch.cuda.is_available():
        return config, None  # TorchExporter says so, as a UserError
    from ldm_deploy.export.aoti_check import probe

    log.info("trying AOTInductor on a toy model first (seconds)")
    problem = probe(config.device)
    if problem is None:
        return config, None
    log.warning("AOTInductor does not work on this machine: a toy package %s. Saving the exported "
                "programs without packages (as --no-aoti), which the torch backend runs eagerly, or "
                "compiled with ldm-run --torch-compile", problem)
    return replace(config, aoti=False), problem


def export_in_turn(exporter, components, specs, tmp: Path) -> dict[str, list[Path]]:
    written = {}
    for i, name in enumerate(components, 1):
        t = time.perf_counter()
        log.info("[%d/%d] %s: %s", i, len(components), name, exporter.doing)
        with heartbeat(f"[{i}/{len(components)}] {name}: still working"):
            written[name] = exporter(name, specs[name], tmp)
        log_written(f"[{i}/{len(components)}] {name}", written[name], time.perf_counter() - t)
    return written


def log_written(what: str, paths: list[Path], seconds: float) -> None:
    log.info("%s: %.1f MiB in %.1f s", what, sum(p.stat().st_size for p in paths) / 2**20, seconds)


#: Host memory to allow per export process: each loads the whole source model (fp32: 4.3 GB for
#: SD 1.5) and compiles; an SD 1.5 ONNX export peaks at 7.6 GB (benchmarks/RESULTS.md).
JOB_MEMORY = 8 * 2**30


def source_bytes(src: SourceModel) -> int:
    """The source model's fp32 weights in bytes (SD 1.5: 4.3 GB, SDXL: 13.5 GB)."""
    modules = (src.unet, src.vae, src.text_encoder, src.text_encoder_2, *src.controlnets)
    return sum(p.numel() * 4 for m in modules if m is not None for p in m.parameters())


def export_jobs(config: ExportConfig, n_components: int, model_bytes: int = 0) -> int:
    """How many components compile at once. Only torch engines compile in parallel: an
    AOTInductor build is mostly single-threaded Python and one C++ compile, so separate processes
    overlap well, each with its own share of the cores for Triton / C++ kernel compiles. Auto
    (jobs 0): one process per 5 cores and per JOB_MEMORY of available memory, so small machines
    keep compiling in turn. (On an H200 host, 16 cores: the SD 1.5 export took 171 s with 3.)
    Without AOTInductor (--no-aoti, or a failed probe) there is nothing to compile: auto is 1."""
    if config.backend != "torch" or (not config.aoti and not config.jobs):
        return 1
    jobs = config.jobs
    if not jobs:
        jobs = (os.cpu_count() or 1) // 5
        memory = available_memory()
        if memory is not None:
            # SD 1.5's measured peak, scaled for larger models (SDXL: about 3x)
            jobs = min(jobs, memory // max(JOB_MEMORY, JOB_MEMORY * model_bytes // (4_300_000_000)))
    return max(1, min(jobs, n_components))


def available_memory() -> int | None:
    """Bytes of memory available to new processes (Linux's MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def export_in_processes(model, config, dims, multiple, exporter, components, specs, tmp: Path,
                        jobs: int) -> dict[str, list[Path]]:
    """Each component in its own (spawned) process, which loads the source itself: an exporter
    holds no state between components but its record of AOTInductor fallbacks (`modes`)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = max(1, (os.cpu_count() or 1) // jobs)
    log.info("exporting %s: %d at a time, each in its own process (%s)", ", ".join(components), jobs,
             exporter.doing)
    t0 = time.perf_counter()
    written = {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(export_one, model, config, dims, multiple, name, specs[name], tmp, threads,
                               logging.getLogger().getEffectiveLevel()): name for name in components}
        try:
            with heartbeat(f"exporting {len(components)} components: still working"):
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        name = pending.pop(future)
                        written[name], exporter.modes[name] = future.result()
                        log_written(f"[{len(written)}/{len(components)}] {name}", written[name],
                                    time.perf_counter() - t0)
        except BaseException:  # one failed, or Ctrl-C: stop the others now, not after their compiles
            stop_workers(pool)
            raise
    return {name: written[name] for name in components}


def stop_workers(pool) -> None:
    """Cancel what has not started and terminate the processes compiling the rest. (The executor
    has no public way to stop running work before Python 3.14's terminate_workers.)"""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    # Reap them and let the executor's manager thread see them gone now: left to interpreter
    # exit, that thread sometimes met the closed pipes and printed a traceback after the
    # "interrupted" message.
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()
    pool.shutdown(wait=True)


def quiet_exit(*_) -> None:
    """A worker's SIGTERM handler: exit, with stderr closed first. The parent stopped us on
    purpose and has said so; what dying prints is noise after that (a traceback, or C++'s
    "terminate called" where the SystemExit meets a C++ frame, seen under load)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    sys.exit(1)


def export_one(model, config, dims, multiple, name, spec, tmp: Path, threads: int, log_level: int):
    """Worker of export_in_processes: -> (files written, AOTInductor mode)."""
    import torch

    from ldm_deploy.cli.common import setup_logging

    setup_logging(log_level <= logging.DEBUG)
    # Terminated (stop_workers): exit through Python, so that a package's test run in progress
    # (aoti_check, a process of its own) is killed with us rather than left running.
    signal.signal(signal.SIGTERM, quiet_exit)
    torch._inductor.config.compile_threads = threads
    src = load_model(model, config)
    exporter = EXPORTERS[config.backend](src, config, dims, multiple)
    t = time.perf_counter()
    paths = exporter(name, spec, tmp)
    log.info("%s: compiled in %.1f s", name, time.perf_counter() - t)
    return paths, exporter.modes[name]


@contextlib.contextmanager
def heartbeat(message: str, every: float = 15.0):
    """Log `message` with the elapsed time every `every` seconds while the block runs: a full-size
    U-Net traces for a minute or more in one blocking call, and silence looks like a hang."""
    done = threading.Event()
    t0 = time.perf_counter()

    def beat():
        while not done.wait(every):
            log.info("%s (%.0f s)", message, time.perf_counter() - t0)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def unlogged(module, inputs):
    """module(*inputs) without our attention op's "falls back to SDPA" line: a probe's run on the
    CPU, not what the engine will run."""
    ops = sys.modules.get("ldm_deploy.kernels.ops")  # not imported: nothing to silence
    with ops.fallback_unlogged() if ops else contextlib.nullcontext():
        return module(*inputs)


def size_multiple(src: SourceModel, backend: str) -> int:
    """Image sides the engine accepts are multiples of this many px. ONNX graphs (and the
    TensorRT plans built from them) trace diffusers' explicit-upsample-size path and take any
    multiple of the VAE's factor (8); torch.export cannot keep both of the U-Net's branches, so torch engines need
    sides its downsamplings divide."""
    if backend in ("onnxruntime", "tensorrt"):
        return vae_scale(src)
    return vae_scale(src) * 2 ** (len(src.unet.config.block_out_channels) - 1)


class OnnxExporter:
    doing = "tracing to ONNX"

    def __init__(self, src, config, dims, multiple, dtypes: dict[str, str] | None = None):
        self.src = src
        self.dtypes = dtypes or {}  # component -> body precision ("fp16" for TensorRT); default fp32
        self.attention = config.attention_kind
        if self.attention == "ort":
            from ldm_deploy.kernels.processor import use_fused_attention

            # The op these processors call is what the "ort" symbolic rewrites: every attention of
            # the U-Net, and the VAE's mid-block attention (4096 tokens at 512 px).
            use_fused_attention(src.unet)
            use_fused_attention(src.vae)
        # Trace with CFG batching (cfg 2, one image) near the tuned size, made odd: the
        # U-Net then takes diffusers' explicit-upsample-size path, which the graph needs to serve
        # sizes that its downsamplings do not divide (e.g. 264 px -> 33 latents -> 17 -> 9 -> 5).
        self.trace_dims = {k: r.opt | 1 for k, r in dims.items()} | {"batch": 1, "cfg": 2}
        # Winograd tiles are chosen per convolution from its size at the smallest image.
        self.backend, self.conv = config.backend, config.conv_kind
        self.probe_dims = {k: r.min for k, r in dims.items()} | {"batch": 1, "cfg": 1}
        self.conv_counts = {}

    def __call__(self, name, spec, tmp: Path) -> list[Path]:
        from ldm_deploy.export.components import WRAPPERS, example_inputs
        from ldm_deploy.export.onnx_export import export_onnx

        module = WRAPPERS[name](self.src, torch_dtype(self.dtypes.get(name, "fp32"))).eval()
        example = example_inputs(spec, self.trace_dims)
        if name == "unet_step":
            self.rewrite_unet(module, lambda: unlogged(module, example_inputs(spec, self.probe_dims)))
        if self.attention == "ort" and name != "text_encoder":
            from ldm_deploy.kernels.onnx_export import onnx_attention

            with onnx_attention("ort"):
                return export_onnx(module, spec, example, tmp / f"{name}.onnx", {"com.microsoft": 1})
        return export_onnx(module, spec, example, tmp / f"{name}.onnx")

    def rewrite_unet(self, module, probe) -> None:
        """The U-Net's graph form for ONNX Runtime's CPU kernels: linear layers as Gemm, and
        (by default) the wide 3x3 convolutions as Winograd matrix products. Same arithmetic up
        to rounding; each measured faster (benchmarks/RESULTS.md)."""
        if self.backend != "onnxruntime":
            return
        # In place: for fp32 the wrapper holds the source model's own U-Net (components.cast).
        from ldm_deploy.export.gemm import use_gemm

        use_gemm(module)
        if self.conv == "winograd":
            from ldm_deploy.export.winograd import use_winograd

            self.conv_counts = dict(use_winograd(module, probe))

    def build_facts(self) -> dict:
        from ldm_deploy.export.onnx_export import OPSET

        facts = {"opset": OPSET, "attention": self.attention, "conv": self.conv, "convolutions": self.conv_counts}
        return facts | ({"linear": "gemm"} if self.backend == "onnxruntime" else {})


class TorchExporter:
    def __init__(self, src, config, dims, multiple):
        import torch

        self.doing = ("torch.export + AOTInductor (minutes for a full-size U-Net)" if config.aoti
                      else "torch.export (exported programs, no AOTInductor packages)")
        if config.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: PyTorch sees no CUDA GPU here; export with --device cpu")
        self.src, self.config, self.dims, self.multiple = src, config, dims, multiple
        self.dtype = torch_dtype(config.dtype_name)
        # torch.export specialises sizes 0 and 1: trace with batch 2, cfg 2, latent sides at
        # the tuned size (a multiple of the required one).
        # A static engine's batch is 1, and its trace must be too.
        self.trace_dims = {k: r.opt for k, r in dims.items()} | {"batch": min(2, dims["batch"].max), "cfg": 2,
                                                                 "text_chunks": min(2, dims["text_chunks"].max)}
        self.modes = {}
        self.aoti_problem = None  # set by export_engine where AOTInductor failed its probe
        self.prepare_unet()

    def prepare_unet(self) -> None:
        import torch

        unet, c = self.src.unet, self.config
        if c.fuse_qkv:
            unet.fuse_qkv_projections()
        if c.attention_kind == "triton":
            from ldm_deploy.kernels.processor import use_fused_attention

            use_fused_attention(unet)
        if c.nhwc:
            unet.to(memory_format=torch.channels_last)

    def __call__(self, name, spec, tmp: Path) -> list[Path]:
        from ldm_deploy.export.components import WRAPPERS, example_inputs
        from ldm_deploy.export.torch_export import export_component

        dtype = torch_dtype("fp32") if name.startswith("vae") and self.src.vae_upcast else self.dtype
        module = WRAPPERS[name](self.src, dtype).to(self.config.device).eval()
        example = tuple(t.to(self.config.device) for t in example_inputs(spec, self.trace_dims))
        path = tmp / f"{name}.pt2"
        latent_multiple = self.multiple // vae_scale(self.src)
        # fp16 bodies: Inductor's fused kernels round differently from eager ones.
        tolerance = 2e-2 if self.dtype == torch_dtype("fp16") else 1e-3
        self.modes[name] = export_component(module, spec, example, path, self.dims, latent_multiple, tolerance,
                                            aoti=self.config.aoti)
        return [path]

    def build_facts(self) -> dict:
        c = self.config
        return {"device": c.device, "attention": c.attention_kind, "channels_last": c.nhwc,
                "fuse_qkv": c.fuse_qkv, "aoti": c.aoti, "modes": self.modes} | (
                    {"aoti_problem": self.aoti_problem} if self.aoti_problem else {})


EXPORTERS = {"onnxruntime": OnnxExporter, "torch": TorchExporter, "tensorrt": TensorRTExporter}


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16}[name]
