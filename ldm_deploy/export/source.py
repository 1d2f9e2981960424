"""Load the model to export: a diffusers folder, a hub id through huggingface_hub's cache, or a
single-file checkpoint (single_file.py).

Only safetensors weights are read unless the user passes `allow_pickle`: a pickle checkpoint
(`.bin`, `.ckpt`) runs arbitrary code when loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from ldm_deploy.errors import ModelSourceError
from ldm_deploy.export import single_file
from ldm_deploy.export.single_file import first_line

log = logging.getLogger(__name__)

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
XL_SUBFOLDERS = ("text_encoder_2", "tokenizer_2")  # SDXL's, beside those
# What a hub model's export reads: the pipeline's configs, tokenizers and full-precision weights
# (not the fp16 / EMA variants beside them, nor other folders: SDXL base's repository holds
# gigabytes of both).
HUB_PATTERNS = ("model_index.json", *(f"{sub}/*.{ext}" for sub in SUBFOLDERS + XL_SUBFOLDERS
                                       for ext in ("json", "txt", "safetensors")))
HUB_IGNORED = tuple(f"*.{v}{s}" for v in ("fp16", "bf16", "ema", "non_ema") for s in (".*", "-*"))  # and shards
VARIANT = re.compile(r"\.(fp16|bf16|ema|non_ema)(-\d+-of-\d+)?\.(safetensors|bin|ckpt)$")  # diffusers' variant names
SAFE_SUFFIXES, PICKLE_SUFFIXES = single_file.SAFE_SUFFIXES, single_file.PICKLE_SUFFIXES


@dataclass
class SourceModel:
    """The loaded torch modules and the facts about them that the manifest records."""

    source: str
    path: Path
    unet: object  # diffusers UNet2DConditionModel
    vae: object  # diffusers AutoencoderKL
    text_encoder: object  # transformers CLIPTextModel (an SDXL refiner: None)
    tokenizer: object  # transformers CLIPTokenizer (an SDXL refiner: its only one, tokenizer_2's)
    scheduler_config: dict
    weights_sha256: str  # of every weight file the engine is made of (merges fold theirs in: lora.py, ...)
    vae_source: str = ""  # the replacement VAE's file or folder name, if any
    # of the model's own weight files alone (a checkpoint file's plain SHA-256): AUTOMATIC1111's
    # "Model hash", which names the checkpoint whatever VAE, LoRAs and embeddings go with it
    checkpoint_sha256: str = ""
    loras: list = field(default_factory=list)  # merged LoRAs: {"name", "weight", "sha256"} each
    # added textual inversions: {"name", "word", "vectors", "sha256"} each
    embeddings: list = field(default_factory=list)
    controlnets: list = field(default_factory=list)  # diffusers ControlNetModels (controlnet.py)
    controlnet_records: list = field(default_factory=list)  # {"name", "sha256"} each
    # SDXL's second text encoder (transformers CLIPTextModelWithProjection: hidden states and the
    # pooled, projected end token) and its tokenizer (the same BPE; SDXL base pads it with "!")
    text_encoder_2: object = None
    tokenizer_2: object = None
    # model_index.json's force_zeros_for_empty_prompt (SDXL base: true): no negative prompt gives
    # zero embeddings rather than those of ""
    zero_negative: bool = False

    @property
    def refiner(self) -> bool:
        """An SDXL refiner: the second text encoder alone (also as text_encoder_2; its tokenizer is
        `tokenizer`), and an aesthetic score among the U-Net's added conditioning."""
        return self.text_encoder is None

    @property
    def family(self) -> str:
        if self.text_encoder_2 is not None:
            return "sdxl"
        return "sd2" if self.text_encoder.config.hidden_size == 1024 or self.is_v_prediction else "sd1"

    @property
    def vae_upcast(self) -> bool:
        """An SDXL VAE that overflows in fp16 (its config's force_upcast; the fp16-fix VAE's is
        false): fp16 engines run it in fp32, as diffusers' fp16 SDXL pipelines do. (diffusers'
        default is true for every VAE, but only its SDXL pipelines read it.)"""
        return self.text_encoder_2 is not None and bool(self.vae.config.get("force_upcast", True))

    @property
    def is_v_prediction(self) -> bool:
        return self.scheduler_config.get("prediction_type", "epsilon") == "v_prediction"


def resolve(model: str, patterns=HUB_PATTERNS) -> Path:
    """A local folder or checkpoint file, or a hub id fetched into (or found in) the
    huggingface_hub cache (the files matching `patterns`)."""
    path = Path(model).expanduser()
    if path.exists():
        if path.is_file() and not single_file.is_single_file(path):  # what it is, by its first bytes
            single_file.check_pickle(path, allow_pickle=True, flag="--model")
        return path
    if model.count("/") != 1 or model.startswith((".", "/", "~")) \
            or path.suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES:
        raise ModelSourceError(f"model path {model} does not exist (nor is it a hub id like 'org/name')")
    # org/name with a local folder org/: a typo'd local path (models/tiny-sdl) more likely than
    # a hub id, but it may be one (stabilityai/... next to local clones), so the hub is still tried.
    local = Path(model.split("/", 1)[0]).is_dir()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=list(patterns), ignore_patterns=list(HUB_IGNORED)))
    except Exception as e:  # network, auth, missing repo: all the user's to fix
        if local:
            raise ModelSourceError(
                f"model path {model} does not exist (and fetching it as a hub id failed: "
                f"{type(e).__name__}); check the folder's name") from None
        why = " ".join(str(e).split())  # (huggingface_hub's messages run over several lines)
        raise ModelSourceError(
            f"could not fetch {model!r} from the Hugging Face hub ({type(e).__name__}: {why}). "
            "Check the id and your network, or pass a local diffusers folder"
        ) from None


def check_layout(path: Path, allow_pickle: bool) -> list[Path]:
    """Check it is a Stable Diffusion diffusers folder; return its weight files."""
    if not (path / "model_index.json").is_file():
        raise ModelSourceError(
            f"{path} is not a diffusers Stable Diffusion folder: it has no model_index.json "
            f"(expected model_index.json and the subfolders {', '.join(SUBFOLDERS)})"
        )
    index = read_index(path)
    xl = names(index, "text_encoder_2")
    refiner = is_refiner_folder(path)
    wanted = tuple(s for s in SUBFOLDERS + (XL_SUBFOLDERS if xl else ())
                   if not (refiner and s in ("text_encoder", "tokenizer")))
    missing = [s for s in wanted if not (path / s).is_dir()]
    if missing:
        raise ModelSourceError(f"{path} lacks the subfolder(s) {', '.join(missing)} of a Stable Diffusion "
                               f"{'XL refiner' if refiner else 'XL model' if xl else 'model'}")
    weights = []
    for sub in [s for s in ("unet", "vae", "text_encoder", "text_encoder_2") if s in wanted]:
        files = sorted((path / sub).iterdir())
        variants = [f for f in files if VARIANT.search(f.name)]  # diffusers loads the others
        safe = [f for f in files if f.suffix in SAFE_SUFFIXES and f not in variants]
        pickled = [f for f in files if f.suffix in PICKLE_SUFFIXES and f not in variants]
        if not (path / sub / "config.json").is_file():
            raise ModelSourceError(f"{path / sub} has no config.json; the model folder is incomplete")
        if safe:
            weights += safe
        elif pickled and allow_pickle:
            weights += pickled
        elif pickled:
            raise ModelSourceError(
                f"{path / sub} holds only pickle weights ({pickled[0].name}); loading a pickle runs "
                "arbitrary code. Convert it to safetensors, or pass --allow-pickle if you trust its source"
            )
        elif variants:
            raise ModelSourceError(
                f"{path / sub} holds only variant weights ({variants[0].name}); ldm-export reads the full-precision "
                "ones. Save them with diffusers (from_pretrained(..., variant=\"fp16\") then save_pretrained) and "
                "export that folder")
        else:
            raise ModelSourceError(f"{path / sub} has no weight file (*.safetensors)")
    for sub in [s for s in ("tokenizer", "tokenizer_2") if s in wanted]:
        if not any((path / sub / f).is_file() for f in ("vocab.json", "tokenizer.json")):
            raise ModelSourceError(f"{path / sub} holds no tokenizer (vocab.json and merges.txt, or tokenizer.json)")
    return weights


def fast_tokenizer(src: SourceModel):
    """src's tokenizer, backed by the `tokenizers` library (transformers 5's CLIPTokenizer is;
    4.x loads a pure-Python one): what the engine's tokenizer.json is written from."""
    tok = src.tokenizer
    if getattr(tok, "backend_tokenizer", None) is None:
        from transformers import CLIPTokenizerFast

        tok = CLIPTokenizerFast.from_pretrained(src.path, subfolder="tokenizer_2" if src.refiner else "tokenizer")
    return tok


def hash_files(files: list[Path]) -> str:
    """SHA-256 over the files' names and contents; of one checkpoint file alone, its plain
    SHA-256, whose first 10 digits are the "Model hash" AUTOMATIC1111 and CivitAI show for it."""
    return hash_parts(files)[0]


def hash_parts(files: list[Path], first: int | None = None) -> tuple[str, str]:
    """(hash_files(files), hash_files(files[:first])) in one read of the files (first: None, all,
    which is hashed once)."""
    first = len(files) if first is None else first
    whole = hashlib.sha256()
    part = hashlib.sha256() if first < len(files) else None  # (else the same as whole)
    for i, f in enumerate(files):
        named = not single_file.is_single_file(f)
        if len(files) > 1 or named:
            whole.update(f.name.encode())
        if part and i < first and (first > 1 or named):
            part.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                whole.update(chunk)
                if part and i < first:
                    part.update(chunk)
    return whole.hexdigest(), (part or whole).hexdigest()


def quiet_libraries() -> None:
    """diffusers and transformers reset their loggers to WARNING when imported (after our CLI set
    them to ERROR), then advise installing accelerate and draw a progress bar per component:
    nothing a user of ldm-export can act on. Kept with -v (DEBUG)."""
    if logging.getLogger().level <= logging.DEBUG:
        return
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def load_source(model: str, allow_pickle: bool = False, config: str | None = None,
                prediction_type: str | None = None, vae_source: str | None = None) -> SourceModel:
    """Load a Stable Diffusion 1.x / 2.x / XL model in float32 on the CPU. For a single-file
    checkpoint, `config` names a diffusers folder (or hub id) of its architecture when it is not
    SD 1.5's or 2.1's; `prediction_type` overrides the model's (its scheduler config's);
    `vae_source` replaces the model's VAE weights (a VAE file or a diffusers AutoencoderKL folder)."""
    path = resolve(model)
    quiet_libraries()
    xl = {}
    if path.is_file():
        configs = check_config(config) if config else None
        weights = [path]
        unet, model_vae, text_encoder, tokenizer, scheduler_config, xl = single_file.load(
            path, allow_pickle, configs, prediction_type, vae_given=bool(vae_source))
    else:
        if config:
            raise ModelSourceError("--config is for single-file checkpoints; a diffusers folder has its own")
        weights = check_layout(path, allow_pickle)
        unet, model_vae, text_encoder, tokenizer, scheduler_config = load_folder(path, allow_pickle,
                                                                                 is_refiner_folder(path))
        if is_xl_folder(path):
            xl = load_xl_parts(path, allow_pickle)
    if text_encoder is None:  # an SDXL refiner: its one tokenizer is the engine's
        tokenizer = xl["tokenizer_2"]
    if prediction_type:
        scheduler_config["prediction_type"] = prediction_type
    vae, own = model_vae, len(weights)
    if vae_source:
        vae, vae_files = load_vae(vae_source, model_vae.config, allow_pickle)
        weights += vae_files
    if xl:  # diffusers' default for SDXL pipelines: true (the bundled single-file configs say so too);
        # a refiner's (stable-diffusion-xl-refiner-1.0's model_index): false
        xl["zero_negative"] = bool(read_index(path if path.is_dir() else configs).get("force_zeros_for_empty_prompt",
                                                                                      text_encoder is not None))
    check_architecture(path, unet, vae, text_encoder, xl.get("text_encoder_2"))
    for m in (unet, vae, text_encoder, xl.get("text_encoder_2")):
        if m is not None:
            m.eval().float()
    return SourceModel(
        source=str(path.resolve()) if Path(model).expanduser().exists() else model,
        path=path,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        **dict(zip(("weights_sha256", "checkpoint_sha256"), hash_parts(weights, own))),
        vae_source=Path(vae_source).name if vae_source else "",
        **xl,
    )


def load_folder(path: Path, allow_pickle: bool, refiner: bool = False):
    """-> (unet, vae, text_encoder, tokenizer, scheduler_config) of a diffusers folder (an SDXL
    refiner's text_encoder and tokenizer: None; its own are load_xl_parts')."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = dict(use_safetensors=None if allow_pickle else True)
    try:
        return (UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw),
                AutoencoderKL.from_pretrained(path, subfolder="vae", **kw),
                None if refiner else CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
                None if refiner else CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
                json.loads((path / "scheduler" / "scheduler_config.json").read_text()))
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise ModelSourceError(f"could not load the model at {path}: {first_line(e)}") from None


def read_index(folder: Path | None) -> dict:
    """A diffusers folder's model_index.json ({} where there is none, or none readable)."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (TypeError, OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def names(index: dict, component: str) -> bool:
    """model_index.json names that component (a refiner's names no first text encoder)."""
    return bool((index.get(component) or [None])[0])


def is_refiner_folder(path: Path) -> bool:
    """A diffusers folder of an SDXL refiner: a second text encoder and no first."""
    index = read_index(path)
    return names(index, "text_encoder_2") and not names(index, "text_encoder") and not (path / "text_encoder").is_dir()


def is_xl_folder(path: Path) -> bool:
    """A diffusers folder of an SDXL pipeline: one with a second text encoder."""
    return names(read_index(path), "text_encoder_2")


def load_xl_parts(path: Path, allow_pickle: bool) -> dict:
    """SDXL's second text encoder and tokenizer, as SourceModel's fields."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    try:
        return dict(
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", use_safetensors=None if allow_pickle else True),
            tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelSourceError(f"could not load the model at {path}: {first_line(e)}") from None


def load_vae(source: str, config, allow_pickle: bool):
    """A replacement VAE (AUTOMATIC1111's "SD VAE"), built like the model's own: -> (module, its
    weight files). A diffusers AutoencoderKL folder, or one file under the original names (with or
    without the first_stage_model. prefix), such as vae-ft-mse-840000-ema-pruned.safetensors."""
    from diffusers import AutoencoderKL

    path = Path(source).expanduser()
    if not path.exists():
        raise ModelSourceError(f"--vae {source} does not exist; pass a VAE file (.safetensors) or a "
                               "diffusers AutoencoderKL folder")
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or (sorted(
            [*path.glob("*.bin"), *path.glob("*.ckpt")]) if allow_pickle else [])
        if not (path / "config.json").is_file() or not files:
            raise ModelSourceError(f"--vae {source} is not a diffusers VAE folder (config.json and "
                                   "*.safetensors weights)")
        try:
            vae = AutoencoderKL.from_pretrained(path, use_safetensors=None if allow_pickle else True)
        except (OSError, ValueError) as e:
            raise ModelSourceError(f"could not load the VAE at {path}: {e}") from None
        return vae, files
    if not single_file.is_single_file(path):
        raise ModelSourceError(f"--vae {source} is not a checkpoint (.safetensors, or .ckpt with --allow-pickle)")
    vae = AutoencoderKL.from_config(config)
    try:
        single_file.load_vae(vae, single_file.read(path, allow_pickle).state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelSourceError(f"--vae {source} does not fit the model's VAE: {single_file.first_line(e)}") from None
    return vae, [path]


def check_config(config: str) -> Path:
    """A diffusers folder of configs for a single-file checkpoint (its weights are not read):
    local, or a hub id whose configs and tokenizer are fetched."""
    path = resolve(config, patterns=("model_index.json", "*/*.json", "*/*.txt"))
    if path.is_file():
        raise ModelSourceError(f"--config {config} is a file; pass a diffusers folder or hub id whose "
                               "configs describe the checkpoint's architecture")
    if not (path / "model_index.json").is_file():
        raise ModelSourceError(f"--config {config} is not a diffusers folder (it has no model_index.json)")
    refiner = is_refiner_folder(path)  # an SDXL refiner's configs: no first text encoder or tokenizer
    wanted = SUBFOLDERS + (XL_SUBFOLDERS if is_xl_folder(path) else ())
    missing = [s for s in wanted if not (path / s).is_dir() and not (refiner and s in ("text_encoder", "tokenizer"))]
    if missing:
        raise ModelSourceError(f"--config {config} lacks the subfolder(s) {', '.join(missing)}")
    try:
        json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"--config {config}: unreadable scheduler/scheduler_config.json ({e})") from None
    return path


def check_architecture(path, unet, vae, text_encoder, text_encoder_2=None) -> None:
    uc, vc = unet.config, vae.config
    if vc.get("latents_mean") is not None:
        raise ModelSourceError(f"{path}: the VAE normalises its latents by a mean and std (Playground v2.5's "
                               "EDM formulation), which is not supported yet")
    if text_encoder_2 is not None:
        check_xl(path, uc, vc, text_encoder, text_encoder_2)
        return
    if uc.get("addition_embed_type") is not None:
        raise ModelSourceError(f"{path} looks like SDXL (the U-Net has added conditioning) but has no second "
                               "text encoder; SDXL models are read from diffusers folders (with text_encoder_2/ "
                               "and tokenizer_2/)")
    if uc.in_channels not in (vc.latent_channels, 2 * vc.latent_channels + 1):  # 2C + 1: inpainting
        raise ModelSourceError(
            f"{path}: the U-Net takes {uc.in_channels} channels but the VAE makes {vc.latent_channels}; "
            f"only text-to-image ({vc.latent_channels}) and inpainting ({2 * vc.latent_channels + 1}) models "
            "are supported (depth models are not yet)"
        )
    if uc.cross_attention_dim != text_encoder.config.hidden_size:
        raise ModelSourceError(
            f"{path}: the U-Net attends to {uc.cross_attention_dim}-wide text embeddings but the text "
            f"encoder makes {text_encoder.config.hidden_size}-wide ones"
        )


def check_xl(path, uc, vc, text_encoder, text_encoder_2) -> None:
    """An SDXL base U-Net: conditioned on both encoders' hidden states side by side, and on the
    second's pooled projection with six size numbers (original size, crop corner, target size)."""
    pooled = text_encoder_2.config.projection_dim
    refiner = text_encoder is None
    if uc.get("addition_embed_type") != "text_time":
        raise ModelSourceError(f"{path} has two text encoders but its U-Net takes no SDXL size conditioning "
                               f"(addition_embed_type {uc.get('addition_embed_type')!r}); not supported")
    if uc.in_channels not in (vc.latent_channels, 2 * vc.latent_channels + 1):  # 2C + 1: inpainting
        raise ModelSourceError(f"{path}: the U-Net takes {uc.in_channels} channels; only SDXL text-to-image "
                               f"({vc.latent_channels}) and inpainting ({2 * vc.latent_channels + 1}) models are "
                               "supported")
    added = uc.projection_class_embeddings_input_dim - pooled
    if added == 5 * uc.addition_time_embed_dim and not refiner:
        raise ModelSourceError(f"{path}: the U-Net takes an aesthetic score, as SDXL's refiner does, but the model "
                               "has two text encoders (a refiner has the second alone)")
    numbers = 5 if refiner else 6  # sizes (and the refiner's aesthetic score)
    if added != numbers * uc.addition_time_embed_dim:
        raise ModelSourceError(f"{path}: the U-Net's added conditioning takes "
                               f"{uc.projection_class_embeddings_input_dim} numbers, not the pooled text "
                               f"({pooled}) and {'four sizes and an aesthetic score' if refiner else 'six sizes'} "
                               f"of {uc.addition_time_embed_dim} SDXL {'refiners give' if refiner else 'gives'} it")
    if refiner and uc.in_channels != vc.latent_channels:
        raise ModelSourceError(f"{path}: an SDXL refiner whose U-Net takes {uc.in_channels} channels; "
                               "only refiners of the image's latents alone are supported")
    first = 0 if refiner else text_encoder.config.hidden_size
    widths = first + text_encoder_2.config.hidden_size
    if uc.cross_attention_dim != widths:
        raise ModelSourceError(f"{path}: the U-Net attends to {uc.cross_attention_dim}-wide text embeddings but "
                               f"the text encoder{'' if refiner else 's'} make"
                               f"{'s ' + str(widths) if refiner else f' {first} + {text_encoder_2.config.hidden_size}'}")
