"""Load the model to export: a diffusers folder, or a hub id through huggingface_hub's cache.

Only safetensors weights are read unless the user passes `allow_pickle`: a pickle checkpoint
(`.bin`, `.ckpt`) runs arbitrary code when loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ldm_deploy.errors import ModelSourceError

log = logging.getLogger(__name__)

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


@dataclass
class SourceModel:
    """The loaded torch modules and the facts about them that the manifest records."""

    source: str
    path: Path
    unet: object  # diffusers UNet2DConditionModel
    vae: object  # diffusers AutoencoderKL
    text_encoder: object  # transformers CLIPTextModel
    tokenizer: object  # transformers CLIPTokenizer
    scheduler_config: dict
    weights_sha256: str

    @property
    def family(self) -> str:
        return "sd2" if self.text_encoder.config.hidden_size == 1024 or self.is_v_prediction else "sd1"

    @property
    def is_v_prediction(self) -> bool:
        return self.scheduler_config.get("prediction_type", "epsilon") == "v_prediction"


def resolve(model: str) -> Path:
    """A local folder, or a hub id fetched into (or found in) the huggingface_hub cache."""
    path = Path(model).expanduser()
    if path.exists():
        if path.is_file():
            raise ModelSourceError(
                f"{model} is a single file; ldm-export reads diffusers folders (model_index.json, "
                "unet/, vae/, text_encoder/, tokenizer/, scheduler/). Convert it first, e.g. with "
                "diffusers' StableDiffusionPipeline.from_single_file(...).save_pretrained(folder)"
            )
        return path
    if model.count("/") != 1 or model.startswith((".", "/", "~")) \
            or path.suffix.lower() in (".safetensors", ".ckpt", ".bin", ".pt", ".pth"):
        raise ModelSourceError(f"model path {model} does not exist (nor is it a hub id like 'org/name')")
    # org/name with a local folder org/: a typo'd local path (models/tiny-sdl) more likely than
    # a hub id, but it may be one (stabilityai/... next to local clones), so the hub is still tried.
    local = Path(model.split("/", 1)[0]).is_dir()
    try:
        from huggingface_hub import snapshot_download

        patterns = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as e:  # network, auth, missing repo: all the user's to fix
        if local:
            raise ModelSourceError(
                f"model path {model} does not exist (and fetching it as a hub id failed: "
                f"{type(e).__name__}); check the folder's name") from None
        raise ModelSourceError(
            f"could not fetch {model!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Check the id and your network, or pass a local diffusers folder"
        ) from None


def check_layout(path: Path, allow_pickle: bool) -> list[Path]:
    """Check it is a Stable Diffusion diffusers folder; return its weight files."""
    if not (path / "model_index.json").is_file():
        raise ModelSourceError(
            f"{path} is not a diffusers Stable Diffusion folder: it has no model_index.json "
            f"(expected model_index.json and the subfolders {', '.join(SUBFOLDERS)})"
        )
    missing = [s for s in SUBFOLDERS if not (path / s).is_dir()]
    if missing:
        raise ModelSourceError(f"{path} lacks the subfolder(s) {', '.join(missing)} of a Stable Diffusion model")
    weights = []
    for sub in ("unet", "vae", "text_encoder"):
        files = sorted((path / sub).iterdir())
        safe = [f for f in files if f.suffix in SAFE_SUFFIXES]
        pickled = [f for f in files if f.suffix in PICKLE_SUFFIXES]
        if safe:
            weights += safe
        elif pickled and allow_pickle:
            weights += pickled
        elif pickled:
            raise ModelSourceError(
                f"{path / sub} holds only pickle weights ({pickled[0].name}); loading a pickle runs "
                "arbitrary code. Convert it to safetensors, or pass --allow-pickle if you trust its source"
            )
        else:
            raise ModelSourceError(f"{path / sub} has no weight file (*.safetensors)")
    return weights


def hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


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


def load_source(model: str, allow_pickle: bool = False) -> SourceModel:
    """Load a Stable Diffusion 1.x / 2.x diffusers model in float32 on the CPU."""
    path = resolve(model)
    weights = check_layout(path, allow_pickle)

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    quiet_libraries()
    kw = dict(use_safetensors=None if allow_pickle else True)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ModelSourceError(f"could not load the model at {path}: {e}") from None
    check_architecture(path, unet, vae, text_encoder)
    for m in (unet, vae, text_encoder):
        m.eval().float()
    return SourceModel(
        source=str(path.resolve()) if Path(model).expanduser().exists() else model,
        path=path,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        weights_sha256=hash_files(weights),
    )


def check_architecture(path, unet, vae, text_encoder) -> None:
    uc, vc = unet.config, vae.config
    if uc.get("addition_embed_type") is not None:
        raise ModelSourceError(f"{path} looks like SDXL (the U-Net has added conditioning); only SD 1.x / 2.x are supported yet")
    if uc.in_channels != vc.latent_channels:
        raise ModelSourceError(
            f"{path}: the U-Net takes {uc.in_channels} channels but the VAE makes {vc.latent_channels}; "
            "inpainting and depth models are not supported yet"
        )
    if uc.cross_attention_dim != text_encoder.config.hidden_size:
        raise ModelSourceError(
            f"{path}: the U-Net attends to {uc.cross_attention_dim}-wide text embeddings but the text "
            f"encoder makes {text_encoder.config.hidden_size}-wide ones"
        )
