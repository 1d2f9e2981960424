"""Export options, checked in one place."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ldm_deploy.engine.spec import VAE_SCALE, DimRange
from ldm_deploy.errors import UserError
from ldm_deploy.export.single_file import PREDICTION_TYPES
from ldm_deploy.export.tensorrt_build import TensorRTOptions, check_build_options, static_dims

BACKENDS = ("onnxruntime", "torch", "tensorrt")
# Measured: ONNX Runtime's fused MultiHeadAttention makes the SD 1.5 U-Net step 0.91x the time of
# plain MatMul/Softmax on 2 CPU threads at 256x256 (benchmarks/RESULTS.md); our Triton kernel is at
# parity with SDPA in a whole U-Net step on an H200, so torch engines keep SDPA.
DEFAULT_ATTENTION = {"onnxruntime": "ort", "torch": "sdpa", "tensorrt": "sdpa"}
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "fp16")
# sdpa: PyTorch's attention (exported to ONNX as MatMul / Softmax / MatMul); triton: our fused
# kernel (torch backend); ort: ONNX Runtime's fused MultiHeadAttention operator (onnxruntime).
ATTENTION = {"onnxruntime": ("sdpa", "ort"), "torch": ("sdpa", "triton"), "tensorrt": ("sdpa",)}
# How the U-Net's 3x3 convolutions are written: "direct" (ONNX Conv / torch conv2d) or "winograd"
# (fewer multiplications as plain matrix products: ldm_deploy/export/winograd.py). Measured on
# ONNX Runtime's CPU kernels only; TensorRT and Inductor choose their own convolution algorithms.
DEFAULT_CONV = {"onnxruntime": "winograd", "torch": "direct", "tensorrt": "direct"}
CONVS = {"onnxruntime": ("direct", "winograd"), "torch": ("direct",), "tensorrt": ("direct",)}
# Tokens of prompt in one chunk of CLIP's 77: all but the start and end tokens.
CHUNK_TOKENS = 75
DEFAULT_PROMPT_TOKENS = 300  # four chunks


@dataclass(frozen=True)
class ExportConfig:
    """What the engine will accept. Wider ranges cost nothing on ONNX Runtime; TensorRT builds
    kernels for the whole range and tunes them for `opt`.

    min_size / max_size: image side in pixels, a multiple of 8 (the VAE's factor). max_size None:
      1024, or for models drawn at 1024 (SDXL) 1536, the long side of SDXL's widest trained
      aspect (1536 x 640).
    opt_size: the size tuned for; None means the model's native size (512 for SD 1.5).
    max_batch: the most images one call makes (the U-Net then runs 2 * max_batch with CFG).
    max_prompt_tokens: the longest prompt taken whole, in tokens, rounded up to whole chunks of
      75 (AUTOMATIC1111's: each chunk is encoded alone, the U-Net attends to them all); longer ones
      are cut with a warning. 75 takes one chunk, as diffusers does. None: 300, or with static
      shapes one chunk.

    torch backend only (AOTInductor packages are compiled for one device):
    device: "cpu" or "cuda".
    precision: "fp16" runs the U-Net, VAE and text encoder bodies in half precision (latents,
      coefficients and the sampler update stay fp32); None picks fp16 on cuda, fp32 on cpu.
      Also for tensorrt, where None means fp16.
    attention: "sdpa" keeps PyTorch's; "triton" (torch) puts our fused Triton op into the U-Net;
      "ort" (onnxruntime) writes ONNX Runtime's fused MultiHeadAttention operator.
    conv: "winograd" (onnxruntime) writes the U-Net's wide 3x3 convolutions as Winograd matrix
      products, "direct" as ONNX Conv; None: the backend's measured default.
    channels_last: U-Net convolutions in NHWC memory layout; None: on for cuda (a 50-step call
      took 0.88x the time eagerly and 0.88x compiled on an H100, benchmarks/RESULTS.md), off on cpu.
    fuse_qkv: one projection GEMM for q, k, v in self-attention (diffusers' fuse_qkv_projections).
    jobs: components compiled at once, each in its own process; 0 picks one per 5 CPU cores.
    aoti: compile each component ahead of time with AOTInductor (minutes); False saves the
      exported programs alone (seconds), which the backend compiles with torch.compile on
      their first call on cuda, and runs eagerly on cpu (ldm-run --[no-]torch-compile).

    model_config: for a single-file checkpoint of an architecture other than SD 1.5's or 2.1's, a
      diffusers folder or hub id whose configs describe it (diffusers' from_single_file `config`).
    prediction_type: "epsilon" or "v_prediction", overriding the model's (SD 2.x single files
      are taken as v-prediction unless their training step marks a 512 px base model).
    vae: a VAE to use instead of the model's (AUTOMATIC1111's "SD VAE"): one file under the
      original names, such as vae-ft-mse-840000-ema-pruned.safetensors, or a diffusers VAE folder.
    loras: LoRA files and their weights, merged into the U-Net and text encoder (lora.py).
    embeddings: textual inversion files and their trigger words (None: from the file), added to
      the tokenizer and text encoder (embeddings.py).
    controlnets: diffusers ControlNet folders, each run beside the U-Net at every step with its
      control image and scale (controlnet.py).
    upscalers: upscale model files (ESRGAN, ...) and their names (None: from the file), exported
      beside the model for the hires fix (upscalers.py).

    tensorrt backend only: tensorrt, how plans are built (see TensorRTOptions: optimization level,
    static shapes, refit, timing cache). Its static_shapes applies to torch engines too: one
    size and batch 1 let AOTInductor compile without symbolic sizes (minutes faster on a GPU).
    """

    backend: str = "onnxruntime"
    device: str = "cpu"
    precision: str | None = None
    attention: str | None = None  # None: the backend's measured default
    conv: str | None = None  # None: the backend's measured default
    channels_last: bool | None = None  # None: the measured default for the device
    fuse_qkv: bool = False
    jobs: int = 0
    aoti: bool = True
    tensorrt: TensorRTOptions = TensorRTOptions()
    img2img: bool = True  # export the VAE encoder too (False: txt2img only, a shorter export)
    min_size: int = 256
    max_size: int | None = None
    opt_size: int | None = None
    max_batch: int = 4
    opt_batch: int = 1
    max_prompt_tokens: int | None = None  # None: DEFAULT_PROMPT_TOKENS (one chunk for static shapes)
    allow_pickle: bool = False
    model_config: str | None = None  # single-file checkpoints: a diffusers folder (or hub id) of configs
    prediction_type: str | None = None  # None: the model's own (its scheduler config, or inferred)
    vae: str | None = None  # a replacement VAE: a file or a diffusers AutoencoderKL folder
    loras: tuple[tuple[str, float], ...] = ()  # (file, weight) merged into the weights, in order
    embeddings: tuple[tuple[str, str | None], ...] = ()  # (file, trigger word or None), in order
    controlnets: tuple[str, ...] = ()  # diffusers ControlNet folders, run inside the U-Net step
    upscalers: tuple[tuple[str, str | None], ...] = ()  # (file, name or None): hires fix upscale models
    tiling: bool = False  # AUTOMATIC1111's Tiling: convolutions pad circularly, images tile (tiling.py)
    force: bool = False

    def __post_init__(self):
        check_config(self)

    @property
    def attention_kind(self) -> str:
        return self.attention or DEFAULT_ATTENTION[self.backend]

    @property
    def conv_kind(self) -> str:
        return self.conv or DEFAULT_CONV[self.backend]

    @property
    def nhwc(self) -> bool:
        """Whether the U-Net's convolutions run channels-last."""
        if self.backend != "torch":
            return False
        return self.channels_last if self.channels_last is not None else self.device == "cuda"

    @property
    def dtype_name(self) -> str:
        if self.precision:
            return self.precision
        return "fp16" if self.device == "cuda" or self.backend == "tensorrt" else "fp32"

    def dims(self, native_latent: int, multiple: int = VAE_SCALE, vae_scale: int = VAE_SCALE,
             chunk_tokens: int = CHUNK_TOKENS) -> dict[str, DimRange]:
        """Dim ranges; image sides are kept to multiples of `multiple` px (the VAE's factor, or
        more where an exporter must: see `size_multiple` in build.py); prompts to whole chunks of
        `chunk_tokens` (the text encoder's length less its start and end tokens)."""
        max_size = default_max_size(native_latent * vae_scale) if self.max_size is None else self.max_size
        lo = -(-self.min_size // multiple) * multiple
        hi = max_size // multiple * multiple
        if self.max_size is None and self.min_size > max_size:
            raise UserError(f"--min-size {self.min_size} is larger than the default --max-size for this model, "
                            f"{max_size}; pass --max-size too")
        if lo > hi:
            raise UserError(
                f"no image size in [{self.min_size}, {max_size}] is a multiple of {multiple} px, "
                f"which this backend needs for this model; widen --min-size / --max-size"
            )
        if self.opt_size and self.opt_size > max_size:
            raise UserError(f"--opt-size {self.opt_size} lies outside [{self.min_size}, {max_size}]")
        opt = self.opt_size or native_latent * vae_scale
        opt = min(max(opt // multiple * multiple, lo), hi)
        side = DimRange(lo // vae_scale, opt // vae_scale, hi // vae_scale)
        dims = {
            "batch": DimRange(1, self.opt_batch, self.max_batch),
            "cfg": DimRange(1, 2, 2),
            "latent_height": side,
            "latent_width": side,
            "text_chunks": DimRange(1, 1, -(-(self.max_prompt_tokens or DEFAULT_PROMPT_TOKENS) // chunk_tokens)),
        }
        return static_dims(dims) if self.tensorrt.static_shapes else dims


def default_max_size(native_px: int) -> int:
    """--max-size's default for a model drawn at native_px (see ExportConfig)."""
    return 1536 if native_px >= 1024 else 1024


def check_config(c: ExportConfig) -> None:
    if c.backend not in BACKENDS:
        raise UserError(f"unknown backend {c.backend!r}; choose one of {', '.join(BACKENDS)}")
    for name in ("min_size",) + (("max_size",) if c.max_size is not None else ()) + (("opt_size",) if c.opt_size else ()):
        v = getattr(c, name)
        if v < VAE_SCALE or v % VAE_SCALE:
            raise UserError(f"--{name.replace('_', '-')} {v} must be a positive multiple of {VAE_SCALE}")
    for name, value, allowed in (("device", c.device, DEVICES), ("precision", c.precision, PRECISIONS + (None,)),
                                 (f"attention for --backend {c.backend}", c.attention, ATTENTION[c.backend] + (None,)),
                                 (f"conv for --backend {c.backend}", c.conv, CONVS[c.backend] + (None,))):
        if value not in allowed:
            raise UserError(f"unknown {name} {value!r}; choose one of {', '.join(a for a in allowed if a)}")
    if c.backend == "onnxruntime" and (c.device, c.dtype_name) != ("cpu", "fp32"):
        raise UserError(
            "--device / --precision apply to --backend torch; ONNX engines are fp32 graphs "
            "that ONNX Runtime places on its own devices"
        )
    if not c.aoti and c.backend != "torch":
        raise UserError("--no-aoti applies to --backend torch (AOTInductor packages)")
    torch_only = (c.device, bool(c.channels_last), c.fuse_qkv)
    if c.backend == "tensorrt" and torch_only != ("cpu", False, False):
        raise UserError(
            "--device / --channels-last / --fuse-qkv apply to --backend torch; TensorRT plans "
            "always run on the GPU and choose their own kernels"
        )
    if c.backend == "onnxruntime" and (c.channels_last or c.fuse_qkv):
        raise UserError("--channels-last / --fuse-qkv apply to --backend torch; ONNX engines do not take them")
    if c.jobs and c.backend != "torch":
        raise UserError("--jobs applies to --backend torch (AOTInductor compiles); other backends export in turn")
    if c.jobs < 0:
        raise UserError(f"--jobs {c.jobs}: give a number of processes, or 0 for one per 5 CPU cores")
    if c.backend == "torch" and replace(c.tensorrt, static_shapes=False) != TensorRTOptions():
        raise UserError("--opt-level / --refit / --timing-cache apply to --backend tensorrt")
    if c.backend == "onnxruntime" and c.tensorrt != TensorRTOptions():
        raise UserError("--opt-level / --static-shapes / --refit / --timing-cache apply to --backend tensorrt "
                        "(and --static-shapes to torch); ONNX Runtime takes any shape the graph allows")
    if c.backend == "tensorrt":
        check_build_options(c.tensorrt, c.dtype_name)
    if c.backend == "torch" and c.device == "cpu" and c.dtype_name == "fp16":
        raise UserError("fp16 engines need --device cuda; CPU engines are fp32")
    if c.prediction_type not in (None, *PREDICTION_TYPES):
        raise UserError(f"unknown prediction type {c.prediction_type!r}; choose {' or '.join(PREDICTION_TYPES)}")
    if c.max_size is not None and c.min_size > c.max_size:
        raise UserError(f"--min-size {c.min_size} is larger than --max-size {c.max_size}")
    if c.opt_size and not c.min_size <= c.opt_size <= (c.max_size or c.opt_size):
        raise UserError(f"--opt-size {c.opt_size} lies outside [{c.min_size}, {c.max_size}]")
    if c.max_batch < 1:
        raise UserError(f"--max-batch must be at least 1 (images per call), got {c.max_batch}")
    if c.max_prompt_tokens is not None and c.max_prompt_tokens < CHUNK_TOKENS:
        raise UserError(f"--max-prompt-tokens must be at least {CHUNK_TOKENS} (one chunk, diffusers' limit), "
                        f"got {c.max_prompt_tokens}")
    if c.tensorrt.static_shapes and (c.max_prompt_tokens or 0) > CHUNK_TOKENS:
        raise UserError(f"--static-shapes builds for one chunk of {CHUNK_TOKENS} prompt tokens; leave out "
                        f"--max-prompt-tokens, or build without --static-shapes for longer prompts")
    if not 1 <= c.opt_batch <= c.max_batch:
        raise UserError(f"need 1 <= opt batch <= max batch, got {c.opt_batch} and {c.max_batch}")
