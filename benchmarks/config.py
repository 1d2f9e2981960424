"""What one `ldm-bench` run measures, checked in one place before anything slow starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ldm_deploy.engine.samplers import K_DIFFUSION_ONLY, SAMPLERS
from ldm_deploy.errors import UserError

# torch.compile modes a `compile:MODE` contender may name.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. Every contender gets the same request.

    contenders: "ours" (the engine at `engine`), "diffusers" (StableDiffusionPipeline on the
        weights at `model`: eager fp32 on the CPU, fp16 + SDPA on CUDA), "compile:MODE" (the same
        with torch.compile of its U-Net; "compile" alone means max-autotune, whose tuning of the
        SD 1.5 U-Net can take many minutes: "default" compiles in about one).
    baseline: the contender every ratio divides by; it must be one of `contenders`.
    width, height, steps, guidance, sampler, batch: the request (batch = images per call; with
        guidance > 1 the U-Net runs 2 x batch).
    threads: CPU threads for every contender (ONNX Runtime intra-op, torch, OpenMP); None
        leaves each library's default, which may differ between them.
    warmup, warmup_steps: untimed calls before timing, each of `warmup_steps` steps (None: as
        many as timed) at the timed shape, so every arena and autotuner has seen the shapes.
        Backends that capture the loop as a CUDA graph key it by step count: fewer warm-up steps
        leave the capture inside the first timed call. On the CPU, 2 steps warm up as well.
    repeats: timed calls; stages report their median and half-range. 3 keeps a CPU run of SD 1.5
        at 256 px, 20 steps, within 15 minutes; use more where runs are cheap.
    rounds: the contenders take turns this many times (A B A B ...), each turn a fresh process
        doing `repeats` timed calls, and every stage pools the samples of all turns. On shared
        machines whose speed drifts over minutes, this spreads the drift over all contenders
        instead of letting it land on whichever ran at a slow moment.
    time_budget_s: wall-clock cap for the whole run; each contender's process gets what is left
        and a contender that would start with too little is skipped (reported, not silently).
    """

    engine: str | None = None
    model: str | None = None
    contenders: tuple[str, ...] = ("ours", "diffusers")
    baseline: str = "diffusers"
    device: str = "cpu"
    width: int = 256
    height: int = 256
    steps: int = 20
    guidance: float = 7.5
    sampler: str = "dpmpp_2m_karras"
    batch: int = 1
    threads: int | None = None
    warmup: int = 1
    warmup_steps: int | None = None
    repeats: int = 3
    rounds: int = 1
    prompt: str = "a photo of an astronaut riding a horse on mars"
    negative_prompt: str = "blurry, low quality"
    seed: int = 0
    time_budget_s: float | None = None


#: "ours:VARIANT" -> (backend, load options): the engine run on another backend than its own.
OURS_VARIANTS = {"openvino": ("openvino", {}), "openvino-bf16": ("openvino", {"precision": "bf16"}),
                 "openvino-static": ("openvino", {"static_shapes": True}),
                 # torch engines' exported programs (--no-aoti, or AOTInductor fallbacks), eager or compiled
                 "eager": ("torch", {"compile": False}), "compiled": ("torch", {"compile": True})}


def parse_contender(name: str) -> tuple[str, str | None]:
    """"ours" -> ("ours", None); "ours:VARIANT" (openvino, openvino-bf16, openvino-static, eager, compiled) -> ("ours", VARIANT);
    "diffusers" -> ("diffusers", None); "compile" / "compile:MODE" -> ("diffusers", MODE)."""
    if name in ("ours", "diffusers"):
        return name, None
    if name == "compile":
        return "diffusers", "max-autotune"
    kind, _, mode = name.partition(":")
    if kind == "compile" and mode in COMPILE_MODES:
        return "diffusers", mode
    if kind == "ours" and mode in OURS_VARIANTS:
        return "ours", mode
    raise UserError(
        f"unknown contender {name!r}; choose from ours, ours:VARIANT with VARIANT one of "
        f"{', '.join(OURS_VARIANTS)}, diffusers, compile, compile:MODE with MODE one of {', '.join(COMPILE_MODES)}"
    )


def check_config(c: BenchConfig) -> None:
    """Raise UserError, saying how to fix it, for anything that would fail later."""
    if not c.contenders:
        raise UserError("no contenders to measure")
    if len(set(c.contenders)) != len(c.contenders):
        raise UserError(f"a contender is named twice in {', '.join(c.contenders)}")
    kinds = [parse_contender(n)[0] for n in c.contenders]
    if c.baseline not in c.contenders:
        raise UserError(f"the baseline {c.baseline!r} is not among the contenders ({', '.join(c.contenders)})")
    if c.device not in DEVICES:
        raise UserError(f"unknown device {c.device!r}; choose one of {', '.join(DEVICES)}")
    variants = [v for k, v in map(parse_contender, c.contenders) if k == "ours" and v]
    if c.device != "cpu" and any(OURS_VARIANTS[v][0] == "openvino" for v in variants):
        raise UserError("the ours:openvino contenders run on the CPU; measure them with --device cpu")
    if "ours" in kinds:
        if not c.engine:
            raise UserError("contender 'ours' needs --engine (an engine directory made by ldm-export)")
        if not (Path(c.engine) / "manifest.json").is_file():
            raise UserError(f"{c.engine} is not an engine directory (no manifest.json); make one with ldm-export")
    if "diffusers" in kinds:
        if not c.model:
            raise UserError("the diffusers contenders need --model (the diffusers folder the engine was made from)")
        if Path(c.model).is_file():
            raise UserError(f"{c.model} is a single file; the diffusers contenders load a diffusers folder. "
                            f"Write one with: python -m ldm_deploy.export.single_file {c.model} --out FOLDER")
        if not (Path(c.model) / "model_index.json").is_file():
            raise UserError(f"{c.model} is not a diffusers model folder (no model_index.json)")
        if "ours" in kinds:
            check_same_architecture(c.engine, c.model)
    for name, value in (("width", c.width), ("height", c.height)):
        if value < 8 or value % 8:
            raise UserError(f"--{name} {value} must be a positive multiple of 8")
    if "ours" in kinds:  # the engine's range, before any contender is measured (diffusers' take minutes)
        from ldm_deploy.engine.manifest import read_manifest
        from ldm_deploy.engine.request import check_size
        from ldm_deploy.errors import EngineError, InvalidRequest

        try:
            check_size(read_manifest(Path(c.engine)), c.width, c.height)
        except EngineError:
            pass  # (a damaged engine: its contender says so)
        except InvalidRequest as e:  # "width 512 is outside this engine's range ..."
            raise UserError(f"--{e}") from None
    for name, value, low in (("steps", c.steps, 1), ("batch", c.batch, 1), ("repeats", c.repeats, 1), ("rounds", c.rounds, 1),
                             ("warmup", c.warmup, 0), ("warmup-steps", c.warmup_steps, 1)):
        if value is not None and value < low:
            raise UserError(f"--{name} must be at least {low}, got {value}")
    if c.threads is not None and c.threads < 1:
        raise UserError(f"--threads must be at least 1, got {c.threads}")
    if c.sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {c.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if c.sampler in K_DIFFUSION_ONLY and "diffusers" in kinds:
        raise UserError(f"no diffusers scheduler runs the {c.sampler} sampler (k-diffusion's, which diffusers lacks), "
                        "so the diffusers contenders cannot draw what ours draws: choose another --sampler, or "
                        "measure ours alone (--contenders ours)")
    if not c.guidance >= 0:
        raise UserError(f"--guidance must be 0 or more, got {c.guidance}")
    if c.time_budget_s is not None and c.time_budget_s <= 0:
        raise UserError(f"--time-budget must be positive, got {c.time_budget_s}")


def check_same_architecture(engine: str, model: str) -> None:
    """A UserError where --model's U-Net is not the engine's kind (its text width, channels in):
    the ratios would compare two different models. (Weights of the same kind are not hashed here.)"""
    import json

    from ldm_deploy.engine.manifest import read_manifest

    try:
        unet = json.loads((Path(model) / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return  # (diffusers says what is wrong with the folder when it loads it)
    m = read_manifest(Path(engine)).model
    theirs = (unet.get("cross_attention_dim"), unet.get("in_channels"))
    ours = (m.text_width, m.latent_channels * (2 if m.inpainting else 1) + (1 if m.inpainting else 0))
    if theirs != ours:
        raise UserError(f"--model {model} is not the model the engine was made from ({m.source}): its U-Net takes "
                        f"text {theirs[0]} wide and {theirs[1]} channels, the engine's {ours[0]} and {ours[1]}; "
                        "give the diffusers folder the engine was exported from")
