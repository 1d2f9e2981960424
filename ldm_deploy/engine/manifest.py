"""The engine directory's `manifest.json`: what was exported, from what, for which shapes.

Reading it is the first thing a runtime does, so every check that can fail on a damaged or
foreign directory happens here, with a message that says how to fix it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ldm_deploy.engine.samplers import NoiseSchedule
from ldm_deploy.engine.spec import VAE_SCALE, DimRange, ModelFacts, component_specs
from ldm_deploy.errors import EngineError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
COMPONENTS = ("text_encoder", "unet_step", "vae_decoder", "vae_encoder")
REQUIRED = ("text_encoder", "unet_step", "vae_decoder", "tokenizer")  # vae_encoder: img2img only


@dataclass(frozen=True)
class ModelInfo:
    family: str  # "sd1" | "sd2" | "sdxl"
    source: str  # the path or hub id it was exported from
    weights_sha256: str  # of the source weight files, in name order
    prediction_type: str  # "epsilon" | "v_prediction"
    vae_scaling_factor: float
    latent_channels: int
    text_length: int
    text_width: int
    sample_size: int  # the latent side the model was trained at (64 for SD 1.5 at 512)
    noise_schedule: NoiseSchedule
    vae_scale: int = VAE_SCALE  # image side / latent side (engines written before it: 8)
    vae: str = ""  # the replacement VAE's file or folder name (ldm-export --vae); "": the model's own
    # LoRAs merged into the weights (ldm-export --lora), in order: {"name", "weight", "sha256"} each
    loras: tuple = ()
    # textual inversions added (ldm-export --embedding), in order: {"name", "word", "vectors", "sha256"} each
    embeddings: tuple = ()
    text_layers: int = 0  # the text encoder's layers, for clip skip (engines written before it: 0, none)
    long_prompts: bool = False  # the U-Net step takes dims["text_chunks"] chunks of text (before it: one)
    masks: bool = False  # the U-Net step takes an inpainting mask (before it: none)
    inpainting: bool = False  # an inpainting U-Net (9 channels in: latents, mask, masked image)
    # ControlNets in the U-Net step (ldm-export --controlnet): {"name", "sha256", "a1111_name"} each
    controlnets: tuple = ()
    history: bool = False  # the U-Net step takes state2, the x0 of two steps back (before it: none)
    pooled_width: int = 0  # SDXL: the pooled text's width, which the U-Net step takes with time_ids
    # SDXL base (its force_zeros_for_empty_prompt): no negative prompt is zero embeddings, not ""'s
    zero_negative: bool = False
    # An SDXL refiner: the U-Net step's time_ids hold an aesthetic score (spec.py)
    aesthetic: bool = False
    # AUTOMATIC1111's Tiling (ldm-export --tiling): the U-Net's and VAE's convolutions pad
    # circularly, so images tile seamlessly
    tiling: bool = False
    # diffusers' VAE tile (engine/vae_tiling.py), latent px: the VAE's sample_size over its scale
    # (engines written before it: 0, the U-Net's sample_size then)
    vae_tile: int = 0
    # of the model's own weight files, before a VAE, LoRAs or embeddings went in (a checkpoint
    # file's plain SHA-256): AUTOMATIC1111's "Model hash" (engines written before it: "")
    checkpoint_sha256: str = ""

    @property
    def model_sha256(self) -> str:
        """The checkpoint's SHA-256, as AUTOMATIC1111 hashes a model (older engines: the weight
        hash, which is the checkpoint's where nothing was merged)."""
        return self.checkpoint_sha256 or self.weights_sha256

    @property
    def model_hash(self) -> str:
        """AUTOMATIC1111's "Model hash" of the model: model_sha256's first 10 digits."""
        return self.model_sha256[:10]

    @property
    def facts(self) -> ModelFacts:
        return ModelFacts(self.latent_channels, self.text_length, self.text_width, self.vae_scale, self.text_layers,
                          self.long_prompts, self.masks, self.inpainting, len(self.controlnets), self.history,
                          self.pooled_width, self.aesthetic)


@dataclass(frozen=True)
class Manifest:
    model: ModelInfo
    backend: str  # "onnxruntime" | "tensorrt" | "torch"
    precision: str  # "fp32" | "fp16"
    dims: dict[str, DimRange]
    # component -> {file name: {"bytes": int, "sha256": str}}
    files: dict[str, dict[str, dict]]
    tokenizer_pad_id: int
    size_multiple: int = 8  # image sides must be multiples of this (px)
    # Upscale models for the hires fix (ldm-export --upscaler): name -> {"file", "scale",
    # "architecture", "sha256" (of the source file)}
    upscalers: dict = field(default_factory=dict)
    # Backend-specific build facts: device, attention kind, per-component compile mode, ...
    build: dict = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    created: str = ""
    format_version: int = FORMAT_VERSION

    def specs(self):
        return component_specs(self.model.facts)

    @property
    def max_text_chunks(self) -> int:
        """The most 75-token chunks of prompt the engine takes (1: one, as diffusers)."""
        return self.dims["text_chunks"].max if self.model.long_prompts else 1

    def to_dict(self) -> dict:
        m = self.model
        return {
            "format_version": self.format_version,
            "model": {**{k: getattr(m, k) for k in m.__dataclass_fields__ if k != "noise_schedule"},
                      "noise_schedule": m.noise_schedule.to_dict()},
            "backend": self.backend,
            "precision": self.precision,
            "dims": {k: r.to_list() for k, r in self.dims.items()},
            "files": self.files,
            "tokenizer": {"file": TOKENIZER, "pad_id": self.tokenizer_pad_id},
            "size_multiple": self.size_multiple,
            **({"upscalers": self.upscalers} if self.upscalers else {}),
            "build": self.build,
            "tools": self.tools,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        model = dict(d["model"])
        model["noise_schedule"] = NoiseSchedule.from_config({**model["noise_schedule"], "family": model["family"]})
        model["loras"] = tuple(model.get("loras", ()))
        model["embeddings"] = tuple(model.get("embeddings", ()))
        model["controlnets"] = tuple(model.get("controlnets", ()))
        if model.get("long_prompts") and "text_chunks" not in d["dims"]:
            raise KeyError("dims.text_chunks")
        info = ModelInfo(**model)
        checked(info, "model")
        multiple = d["size_multiple"]
        if not KINDS["int"](multiple) or multiple < 1 or info.vae_scale < 1:
            raise ValueError("model.vae_scale and size_multiple must be whole numbers of at least 1")
        return cls(
            model=info,
            backend=d["backend"],
            precision=d["precision"],
            dims={k: DimRange(*v) for k, v in d["dims"].items()},
            files=d["files"],
            tokenizer_pad_id=d["tokenizer"]["pad_id"],
            size_multiple=d["size_multiple"],
            upscalers=d.get("upscalers", {}),
            build=d.get("build", {}),
            tools=d.get("tools", {}),
            created=d.get("created", ""),
            format_version=d["format_version"],
        )


# What a field's annotation asks of its value in the JSON (bool is no int here, an int is a float).
KINDS = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool), "bool": lambda v: isinstance(v, bool),
         "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "str": lambda v: isinstance(v, str)}


def checked(record, where: str) -> None:
    """A TypeError naming the first field of a dataclass read from JSON whose value is not of its
    annotated kind (a manifest edited by hand: "text_length": "77")."""
    for name, f in record.__dataclass_fields__.items():
        ok = KINDS.get(f.type)
        if ok is not None and not ok(getattr(record, name)):
            raise TypeError(f"{where}.{name} must be {f.type}, got {getattr(record, name)!r}")


def file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(engine_dir: Path) -> Manifest:
    """Parse and check `manifest.json`; raises EngineError with the fix on any problem."""
    engine_dir = Path(engine_dir)
    rebuild = f"re-export it with `ldm-export --model <model> --out {engine_dir} --force`"
    if engine_dir.is_file():
        raise EngineError(f"{engine_dir} is a file; an engine is a directory made by ldm-export "
                          f"(a single-file checkpoint: export it with ldm-export --model FILE, or pass it "
                          f"to ldm-run as --model)")
    if not engine_dir.is_dir():
        raise EngineError(f"engine directory {engine_dir} does not exist; build one with ldm-export")
    path = engine_dir / MANIFEST
    if not path.is_file():
        if (engine_dir / "model_index.json").is_file():
            raise EngineError(
                f"{engine_dir} is a diffusers model, not an engine directory: pass it as --model "
                f"(ldm-run exports and caches an engine for it), or build an engine with "
                f"`ldm-export --model {engine_dir} --out <engine dir>`")
        raise EngineError(f"{engine_dir} is not an engine directory (no {MANIFEST}); build one with "
                          f"`ldm-export --model <model> --out <engine dir>`")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineError(f"{path} is unreadable or corrupted ({e}); {rebuild}") from None
    version = d.get("format_version") if isinstance(d, dict) else None
    if version != FORMAT_VERSION:
        raise EngineError(
            f"{path} has engine format version {version!r}; this ldm-deploy reads version "
            f"{FORMAT_VERSION}. Install the matching ldm-deploy, or {rebuild}"
        )
    try:
        return Manifest.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise EngineError(f"{path} is incomplete or corrupted ({type(e).__name__}: {e}); {rebuild}") from None


def verify_files(engine_dir: Path, manifest: Manifest, hashes: bool = True) -> None:
    """Check that every recorded file exists with the recorded size (and hash)."""
    rebuild = f"re-export it with `ldm-export --model {manifest.model.source} --out {engine_dir} --force`"
    for comp in REQUIRED:
        if comp not in manifest.files:
            raise EngineError(f"{engine_dir} has no {comp} component; {rebuild}")
    for comp, files in manifest.files.items():
        for name, rec in files.items():
            path = Path(engine_dir) / name
            if not path.is_file():
                raise EngineError(f"{path} is missing; {rebuild}")
            size = path.stat().st_size
            if size != rec["bytes"]:
                raise EngineError(
                    f"{path} is {size} bytes, the manifest says {rec['bytes']}: the file is "
                    f"truncated or was replaced; {rebuild}"
                )
            if hashes and sha256_file(path) != rec["sha256"]:
                raise EngineError(f"{path} is corrupted (its SHA-256 differs from the manifest's); {rebuild}")


def file_stats(engine_dir: Path, manifest: Manifest) -> dict[str, tuple]:
    """Each recorded file's (inode, size, mtime) as it is now: what unchanged() holds a component
    loaded later to."""
    out = {}
    for files in manifest.files.values():
        for name in files:
            try:
                st = (Path(engine_dir) / name).stat()
                out[name] = (st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError:  # (missing: loading it says so)
                out[name] = None
    return out


def check_unchanged(engine_dir: Path, manifest: Manifest, component: str, stats: dict[str, tuple]) -> None:
    """Refuse a component loaded after its engine (the VAE encoder at the first img2img) whose files
    were replaced since (ldm-export --force over an engine in use): its graph would not be the one
    the manifest held in memory checked, nor what the ONNX Runtime cache keys it by."""
    for name, rec in manifest.files.get(component, {}).items():
        path = Path(engine_dir) / name
        try:
            st = path.stat()
            now = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            now = None
        # (written again, but the same bytes: an export repeated over it draws the same)
        if now != stats.get(name) and (now is None or sha256_file(path) != rec["sha256"]):
            raise EngineError(f"{path} has changed since {engine_dir} was loaded (exported again with --force?); "
                              "load the engine again (restart ldm-serve) to draw with it")
