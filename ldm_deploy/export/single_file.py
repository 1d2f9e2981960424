"""Single-file checkpoints: one .safetensors holding the whole model under the original Stable
Diffusion names (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*), the form
AUTOMATIC1111, ComfyUI and most model sites share.

diffusers' converter renames the weights, but builds the modules from a diffusers folder of
configs, which it would fetch from the hub. We write that folder ourselves for the SD 1.x and 2.x
architectures (the checkpoint's keys tell which), or take the user's (`config`) for checkpoints
of other sizes. Pickle checkpoints (.ckpt) are read only with `allow_pickle`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ldm_deploy.errors import ModelSourceError

log = logging.getLogger(__name__)

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP ViT-L/14
OPEN_CLIP = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14
# The first cross-attention's key projection: [320, 768] in SD 1.x, [320, 1024] in SD 2.x.
CROSS_KEY = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CONV_IN = UNET + "input_blocks.0.0.weight"  # [320, 4, 3, 3]; 9 input channels: inpainting
# The training step stable-diffusion-2(-1)-base checkpoints record: the SD 2.x models trained for
# epsilon at 512 px (the 768 px ones predict v). diffusers' single-file loader uses the same rule.
SD2_BASE_STEP = 875000
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class Checkpoint:
    path: Path
    state: dict  # weight name -> torch tensor, without the .ckpt "state_dict" wrapper
    global_step: int | None


def is_single_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES


def read(path: Path, allow_pickle: bool) -> Checkpoint:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelSourceError(
            f"{path} is a pickle checkpoint; loading a pickle runs code from the file. Use the model's "
            ".safetensors release, or pass --allow-pickle if you trust its source")
    try:
        if suffix in SAFE_SUFFIXES:
            from safetensors.torch import load_file

            state = load_file(path)
            step = None
        else:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=False)
            step = state.get("global_step") if isinstance(state, dict) else None
            while isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
    except Exception as e:  # a truncated or foreign file: safetensors, pickle and zip errors alike
        raise ModelSourceError(f"could not read the checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise ModelSourceError(f"{path} holds a {type(state).__name__}, not a dictionary of weights")
    return Checkpoint(path, state, int(step) if isinstance(step, int) else None)


def family(ck: Checkpoint) -> str:
    """"sd1" or "sd2" from the keys; a ModelSourceError naming what the file is otherwise."""
    keys = ck.state.keys()
    has = {prefix: any(k.startswith(prefix) for k in keys) for prefix in (UNET, VAE, CLIP, OPEN_CLIP)}
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ModelSourceError(f"{ck.path} is an SDXL checkpoint; only SD 1.x / 2.x are supported yet")
    if not has[UNET]:
        kind = "a LoRA" if any(k.startswith(("lora_", "lora.")) or ".lora_" in k for k in keys) else \
            "a VAE" if any(k.startswith(("encoder.", "decoder.")) for k in keys) else "not a Stable Diffusion model"
        raise ModelSourceError(f"{ck.path} is {kind} (it has no {UNET}* weights); ldm-export needs a whole "
                               "Stable Diffusion checkpoint (U-Net, VAE and text encoder)")
    missing = [name for name, prefix in (("VAE", VAE), ("text encoder", (CLIP, OPEN_CLIP)))
               if not any(has[p] for p in ((prefix,) if isinstance(prefix, str) else prefix))]
    if missing:
        raise ModelSourceError(f"{ck.path} holds no {' and no '.join(missing)} weights; ldm-export needs a "
                               "whole checkpoint (or a diffusers folder)")
    if CONV_IN in ck.state and ck.state[CONV_IN].shape[1] != 4:
        raise ModelSourceError(
            f"{ck.path}: the U-Net takes {ck.state[CONV_IN].shape[1]} input channels (an inpainting or "
            "depth model); only text-to-image models (4 channels) are supported yet")
    sd2 = has[OPEN_CLIP] or (CROSS_KEY in ck.state and ck.state[CROSS_KEY].shape[-1] == 1024)
    return "sd2" if sd2 else "sd1"


def prediction_type(ck: Checkpoint, fam: str, override: str | None) -> str:
    """SD 1.x predicts noise; SD 2.x predicts v, except the 512 px base models."""
    if override:
        return override
    if fam == "sd1":
        return "epsilon"
    if "v_pred" in ck.state:  # ComfyUI marks v-prediction checkpoints it saves with this key
        return "v_prediction"
    if ck.global_step == SD2_BASE_STEP:
        return "epsilon"
    log.warning("%s: an SD 2.x checkpoint; assuming v-prediction (the 768 px models, as diffusers does). "
                "For a 512 px base model export it with ldm-export --prediction-type epsilon", ck.path.name)
    return "v_prediction"


def write_configs(folder: Path, fam: str, prediction: str) -> None:
    """The diffusers folder (configs and tokenizer, no weights) of the SD 1.5 or SD 2.1
    architecture, which diffusers' converter builds the modules from."""
    from ldm_deploy.export.random_model import (
        PRESETS,
        text_config,
        tokenizer,
        unet_config,
        vae_config,
    )

    preset = "sd15" if fam == "sd1" else "sd21"
    scheduler = {**PRESETS[preset]["scheduler"], "prediction_type": prediction}
    unet = unet_config(preset)
    if fam == "sd2" and prediction == "epsilon":
        unet["sample_size"] = 64  # the base models' 512 px
    for sub, cfg, cls in (("unet", unet, "UNet2DConditionModel"), ("vae", vae_config(preset), "AutoencoderKL"),
                          ("scheduler", scheduler, scheduler["_class_name"])):
        (folder / sub).mkdir(parents=True)
        name = "scheduler_config.json" if sub == "scheduler" else "config.json"
        (folder / sub / name).write_text(json.dumps({"_class_name": cls, **cfg}, indent=2))
    text_config(preset).save_pretrained(folder / "text_encoder")
    tokenizer(preset).save_pretrained(folder / "tokenizer")
    index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", scheduler["_class_name"]],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def load(path: Path, allow_pickle: bool, config: Path | None = None, prediction: str | None = None):
    """-> (unet, vae, text_encoder, tokenizer, scheduler_config) in float32 on the CPU."""
    ck = read(path, allow_pickle)
    fam = family(ck)
    with tempfile.TemporaryDirectory(prefix="ldm-deploy-configs-") as tmp:
        if config is None:
            pred = prediction_type(ck, fam, prediction)
            config = Path(tmp)
            write_configs(config, fam, pred)
            log.info("%s: a single-file SD %s.x checkpoint (%s)", path.name, fam[-1], pred)
        scheduler_config = json.loads((config / "scheduler" / "scheduler_config.json").read_text())
        if prediction:
            scheduler_config["prediction_type"] = prediction
        try:
            modules = convert(ck.state, config)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            hint = "" if config != Path(tmp) else (
                f" The checkpoint's weights do not fit the SD {fam[-1]}.x architecture; for a model of "
                "another size pass --config with a diffusers folder (or hub id) of its architecture")
            raise ModelSourceError(f"could not load {path}: {type(e).__name__}: {first_line(e)}.{hint}") from None
    return (*modules, scheduler_config)


def convert(state: dict, config: Path):
    """-> (unet, vae, text_encoder, tokenizer): each module built from `config`'s subfolder and
    given the checkpoint's weights, renamed by diffusers' converters. Loaded strictly here:
    diffusers' own single-file loaders leave weights the file lacks at their random values."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet_config = UNet2DConditionModel.load_config(config, subfolder="unet")
    unet = UNet2DConditionModel.from_config(unet_config)
    load_weights(unet, convert_ldm_unet_checkpoint(state, unet_config), "U-Net")
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config, subfolder="vae"))
    load_vae(vae, state)
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(config, subfolder="text_encoder"))
    open_clip = any(k.startswith(OPEN_CLIP) for k in state)
    weights = convert_open_clip_checkpoint(text, state) if open_clip else convert_ldm_clip_checkpoint(state)
    if not hasattr(text, "text_model"):  # transformers >= 5.6 dropped CLIPTextModel's text_model level
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    # Unused: old checkpoints' position_ids, OpenCLIP's projection, logit scale and last layer.
    load_weights(text, weights, "text encoder", unused_ok=True)
    return unet, vae, text, CLIPTokenizer.from_pretrained(config, subfolder="tokenizer")


def load_vae(vae, state: dict) -> None:
    """The VAE's weights of a whole checkpoint (first_stage_model.*) or of a VAE file (the same
    names without the prefix), into `vae`."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if not any(k.startswith(VAE) for k in state):  # a VAE file: no prefix; keep only its own weights
        state = {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder.", "quant_conv.",
                                                                 "post_quant_conv."))}
    load_weights(vae, convert_ldm_vae_checkpoint(state, vae.config), "VAE")


def load_weights(module, weights: dict, name: str, unused_ok: bool = False) -> None:
    """Every parameter from `weights` (shapes checked by torch), or a ValueError naming what is
    missing."""
    missing, unused = module.load_state_dict(weights, strict=False)
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} {name} weight(s), e.g. {missing[0]}")
    if unused and not unused_ok:
        raise ValueError(f"{len(unused)} {name} weight(s) of the checkpoint have no place in the "
                         f"architecture, e.g. {unused[0]}")


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
