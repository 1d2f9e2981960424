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
PREDICTION_TYPES = ("epsilon", "v_prediction")  # diffusers' scheduler names


# Keys that name other model families: refused by name rather than as "incomplete".
OTHER_FAMILIES = {"SD3": UNET + "joint_blocks.", "Flux": UNET + "double_blocks.",
                  "Playground v2.5 (SDXL's layout, EDM's noise schedule and latent statistics)": "edm_mean"}
# SDXL's text encoders: CLIP ViT-L under transformers' names, OpenCLIP ViT-bigG under its own.
XL_CLIP, XL_OPEN_CLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
LABEL_EMB = UNET + "label_emb.0.0.weight"  # [*, 2816] SDXL, [*, 2560] its refiner, else unCLIP-like
# Stability's newer training code saves SD 2.x's text encoder here; diffusers reads the other name.
SGM_OPEN_CLIP = "conditioner.embedders.0.model."
# What a whole checkpoint's loader reads; the rest (EMA copies, training state) stays on disk.
WANTED = (UNET, VAE, CLIP, OPEN_CLIP, SGM_OPEN_CLIP, XL_CLIP, XL_OPEN_CLIP, "v_pred")


@dataclass
class Checkpoint:
    path: Path
    state: dict  # weight name -> torch tensor, without the .ckpt "state_dict" wrapper
    global_step: int | None = None
    metadata: dict | None = None  # a .safetensors header's (ModelSpec: modelspec.prediction_type...)
    names: tuple = ()  # every weight name in the file, read or not

    def __post_init__(self):
        self.names = self.names or tuple(self.state)


# What a file that is no checkpoint is, by its first bytes (a mistaken path: an image, a document).
NOT_CHECKPOINTS = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
                   b"RIFF": "a WebP image (or another RIFF file)", b"%PDF": "a PDF", b"{": "a JSON text"}


def file_kind(path: Path) -> str:
    """What a file holds by its first bytes: "safetensors" (a header's length, then its JSON),
    "pickle" (torch.save's zip, or a pickle's protocol byte; or unreadable here), or what else it
    is ("a PNG image", "not a checkpoint")."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return "pickle"  # (its reader says why it cannot be read)
    if head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "pickle"
    return next((what for magic, what in NOT_CHECKPOINTS.items() if head.startswith(magic)), "not a checkpoint")


def check_pickle(path: Path, allow_pickle: bool, flag: str = "") -> None:
    """Refuse a file that is not .safetensors: one that is no checkpoint at all, saying what it is;
    a pickle unless allow_pickle (loading one runs code from the file)."""
    if path.suffix.lower() in SAFE_SUFFIXES:
        return
    named = f"{flag} {path}" if flag else str(path)
    what = file_kind(path)
    if what == "safetensors":  # (a hub cache's blob): read as one; a whole model is found by its suffix
        if flag == "--model":
            raise ModelSourceError(f"{named} is a safetensors file without its suffix: rename it to end in "
                                   ".safetensors")
        return
    if what != "pickle":
        kind = "" if what == "not a checkpoint" else f"{what}, "
        folder = " or a diffusers folder (model_index.json, unet/, vae/, ...)" if flag == "--model" else ""
        raise ModelSourceError(f"{named} is {kind}not a checkpoint: pass a .safetensors file{folder} (or a "
                               "PyTorch .ckpt / .pt / .pth / .bin with --allow-pickle)")
    if not allow_pickle:
        raise ModelSourceError(
            f"{named} is a pickle checkpoint; loading a pickle runs code from the file. Use the model's "
            ".safetensors release, or pass --allow-pickle if you trust its source")
    if flag == "--model" and not is_single_file(path):  # (a whole model is read by its suffix)
        raise ModelSourceError(f"{named} is a pickle checkpoint without a checkpoint's suffix: rename it to end "
                               "in .ckpt")


def is_single_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES


def read(path: Path, allow_pickle: bool, wanted: tuple[str, ...] | None = None) -> Checkpoint:
    """The file's weights (of a .safetensors, only those whose names start with one of `wanted`:
    an EMA copy doubles a file, and several export processes each read it)."""
    check_pickle(path, allow_pickle)  # (what is not safetensors is read as a pickle below)
    try:
        if path.suffix.lower() in SAFE_SUFFIXES or file_kind(path) == "safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                names = tuple(f.keys())
                state = {k: f.get_tensor(k) for k in names if wanted is None or k.startswith(wanted)}
                return Checkpoint(path, state, None, f.metadata() or {}, names)
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


def family(ck: Checkpoint, vae_given: bool = False) -> str:
    """"sd1", "sd2" or "sdxl" from the names; a ModelSourceError naming what the file is otherwise.
    `vae_given`: a replacement VAE will be loaded, so the file need not hold one."""
    names = ck.names
    for name, prefix in OTHER_FAMILIES.items():
        if any(k.startswith(prefix) for k in names):
            raise ModelSourceError(f"{ck.path} is a {name} checkpoint; only SD 1.x / 2.x / SDXL are supported yet")
    if not any(k.startswith(UNET) for k in names):
        raise ModelSourceError(f"{ck.path} is {partial_kind(names)} (it has no {UNET}* weights); ldm-export "
                               "needs a whole Stable Diffusion checkpoint (U-Net, VAE and text encoder)")
    xl = any(k.startswith(XL_OPEN_CLIP) for k in names)
    refiner = is_refiner(ck) and not xl
    if LABEL_EMB in ck.state and not refiner:
        width = ck.state[LABEL_EMB].shape[1]
        kind = {2816: "an SDXL checkpoint without its second text encoder (conditioner.embedders.1.); a partial",
                2560: "an SDXL refiner checkpoint without its text encoder (conditioner.embedders.0.model.); a "
                "partial"}.get(width, "a class-conditioned (unCLIP or upscaler)")
        if not xl:  # SDXL base's: pooled text and six sizes (1280 + 6 x 256)
            raise ModelSourceError(f"{ck.path} is {kind} checkpoint; only SD 1.x / 2.x / SDXL text-to-image "
                                   "models and SDXL refiners are supported yet")
    missing = [] if vae_given or any(k.startswith(VAE) for k in names) else ["VAE"]
    if xl and not any(k.startswith(XL_CLIP) for k in names):
        missing.append("first (CLIP ViT-L) text encoder")
    if not xl and not any(k.startswith((CLIP, OPEN_CLIP, SGM_OPEN_CLIP)) for k in names):
        missing.append("text encoder")
    if missing:
        raise ModelSourceError(f"{ck.path} holds no {' and no '.join(missing)} weights; ldm-export needs a "
                               "whole checkpoint (or a diffusers folder)")
    if CONV_IN in ck.state and ck.state[CONV_IN].shape[1] not in (4, 9):
        raise ModelSourceError(
            f"{ck.path}: the U-Net takes {ck.state[CONV_IN].shape[1]} input channels (a depth or other "
            "conditioned model); only text-to-image (4 channels) and inpainting (9) models are supported yet")
    if xl:
        return "sdxl"
    if refiner:
        return "sdxl-refiner"
    sd2 = any(k.startswith((OPEN_CLIP, SGM_OPEN_CLIP)) for k in names) or \
        (CROSS_KEY in ck.state and ck.state[CROSS_KEY].shape[-1] == 1024)
    return "sd2" if sd2 else "sd1"


def is_refiner(ck: Checkpoint) -> bool:
    """An SDXL refiner's names: OpenCLIP ViT-bigG as embedders.0, and SDXL's added conditioning
    taking its pooled text (the projection's width) and five numbers (sizes and an aesthetic score)."""
    projection = ck.state.get(SGM_OPEN_CLIP + "text_projection")
    if LABEL_EMB not in ck.state or projection is None or projection.ndim != 2:
        return False
    rest = ck.state[LABEL_EMB].shape[1] - projection.shape[1]
    return rest > 0 and rest % 5 == 0


def partial_kind(names) -> str:
    """What a file without U-Net weights is, for the message."""
    if any(k.startswith(("lora_", "lora.")) or ".lora_" in k for k in names):
        return "a LoRA"
    if any(k.startswith(("encoder.", "decoder.")) for k in names):
        return "a VAE (pass it as --vae, beside a whole checkpoint)"
    return "not a Stable Diffusion model"


def inpainting(ck: Checkpoint) -> bool:
    """Whether the U-Net is an inpainting one: 9 channels in (latents, mask, masked image)."""
    return CONV_IN in ck.state and ck.state[CONV_IN].shape[1] == 9


def prediction_type(ck: Checkpoint, fam: str, override: str | None) -> str:
    """What the U-Net predicts: the user's word, else what the file says (a ModelSpec header,
    ComfyUI's `v_pred` key, the SD 2.x base models' training step), else the family's usual:
    noise for SD 1.x and SD 2.x inpainting (512 px, as stable-diffusion-2-inpainting), v for
    other SD 2.x (its 768 px models; a warning says how to choose otherwise)."""
    if override:
        return override
    spec = (ck.metadata or {}).get("modelspec.prediction_type", "").lower()
    if spec in ("v", "v_prediction", "epsilon", "eps"):
        return "v_prediction" if spec.startswith("v") else "epsilon"
    if "v_pred" in ck.names:  # ComfyUI saves this key with v-prediction models
        return "v_prediction"
    if fam in ("sd1", "sdxl", "sdxl-refiner"):
        return "epsilon"
    if ck.global_step == SD2_BASE_STEP or inpainting(ck):
        return "epsilon"
    log.warning("%s: an SD 2.x checkpoint that does not say what it predicts; assuming v (the 768 px "
                "models, as diffusers does). For a 512 px base model export it with ldm-export "
                "--prediction-type epsilon", ck.path.name)
    return "v_prediction"


def write_configs(folder: Path, fam: str, prediction: str, inpaint: bool = False) -> None:
    """The diffusers folder (configs and tokenizers, no weights) of the SD 1.5, SD 2.1 or SDXL base
    architecture (inpaint: their inpainting U-Net's, 9 channels in), which diffusers' converter
    builds the modules from."""
    from ldm_deploy.export.random_model import (
        PRESETS,
        model_index,
        text_config,
        tokenizer,
        unet_config,
        vae_config,
    )

    preset = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl", "sdxl-refiner": "sdxl-refiner"}[fam]
    scheduler = {**PRESETS[preset]["scheduler"], "prediction_type": prediction}
    unet = unet_config(preset, inpaint)
    if fam == "sd2" and prediction == "epsilon":
        unet["sample_size"] = 64  # the base and inpainting models' 512 px
    for sub, cfg, cls in (("unet", unet, "UNet2DConditionModel"), ("vae", vae_config(preset), "AutoencoderKL"),
                          ("scheduler", scheduler, scheduler["_class_name"])):
        (folder / sub).mkdir(parents=True)
        name = "scheduler_config.json" if sub == "scheduler" else "config.json"
        (folder / sub / name).write_text(json.dumps({"_class_name": cls, **cfg}, indent=2))
    if fam != "sdxl-refiner":  # a refiner has the second text encoder alone
        text_config(preset).save_pretrained(folder / "text_encoder")
        tokenizer(preset).save_pretrained(folder / "tokenizer")
    if fam.startswith("sdxl"):
        text_config(preset, "text_2").save_pretrained(folder / "text_encoder_2")
        tokenizer(preset, "pad_token_2").save_pretrained(folder / "tokenizer_2")
    pipeline = "StableDiffusionXLImg2ImgPipeline" if fam == "sdxl-refiner" else \
        f"StableDiffusion{'XL' if fam == 'sdxl' else ''}{'Inpaint' if inpaint else ''}Pipeline"
    (folder / "model_index.json").write_text(json.dumps(model_index(scheduler["_class_name"], pipeline), indent=2))


def load(path: Path, allow_pickle: bool, config: Path | None = None, prediction: str | None = None,
         vae_given: bool = False):
    """-> (unet, vae, text_encoder, tokenizer, scheduler_config, xl) in float32 on the CPU; xl:
    SDXL's further SourceModel fields (text_encoder_2, tokenizer_2), else empty.
    With `vae_given` the VAE is built but its weights are left to the caller's replacement."""
    ck = read(path, allow_pickle, WANTED)
    fam = family(ck, vae_given)
    state = ck.state if fam == "sdxl-refiner" else \
        {OPEN_CLIP + k[len(SGM_OPEN_CLIP):] if k.startswith(SGM_OPEN_CLIP) else k: v for k, v in ck.state.items()}
    with tempfile.TemporaryDirectory(prefix="ldm-deploy-configs-") as tmp:
        if config is None:
            pred = prediction_type(ck, fam, prediction)
            config = Path(tmp)
            write_configs(config, fam, pred, inpainting(ck))
            log.info("%s: a single-file %s %scheckpoint (%s)", path.name, FAMILY_NAMES[fam],
                     "inpainting " if inpainting(ck) else "", pred)
        scheduler_config = json.loads((config / "scheduler" / "scheduler_config.json").read_text())
        if prediction:
            scheduler_config["prediction_type"] = prediction
        try:
            modules = convert(state, config, with_vae=not vae_given)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            hint = "" if config != Path(tmp) else (
                f" The checkpoint's weights do not fit the {FAMILY_NAMES[fam]} architecture; for a model of "
                "another size give --config (a diffusers folder or hub id of its architecture)")
            raise ModelSourceError(f"could not load {path}: {first_line(e)}.{hint}") from None
    *modules, xl = modules
    return (*modules, scheduler_config, xl)


FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl-refiner": "SDXL refiner"}


def convert(state: dict, config: Path, with_vae: bool = True):
    """-> (unet, vae, text_encoder, tokenizer, xl): each module built from `config`'s subfolder
    and given the checkpoint's weights, renamed by diffusers' converters; xl: for a config with a
    second text encoder (SDXL), it and its tokenizer, as SourceModel's fields. Loaded strictly
    here: diffusers' own single-file loaders leave weights the file lacks at their random values."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

    unet_config = UNet2DConditionModel.load_config(config, subfolder="unet")
    unet = UNet2DConditionModel.from_config(unet_config)
    load_weights(unet, convert_ldm_unet_checkpoint(state, unet_config), "U-Net")
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config, subfolder="vae"))
    if with_vae:
        load_vae(vae, state)
    refiner = not (config / "text_encoder").is_dir()  # an SDXL refiner: the second text encoder alone
    text = tokenizer = None
    if not refiner:
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(config, subfolder="text_encoder"))
        open_clip = any(k.startswith(OPEN_CLIP) for k in state)
        weights = convert_open_clip_checkpoint(text, state) if open_clip else convert_ldm_clip_checkpoint(state)
        # Unused: old checkpoints' position_ids, OpenCLIP's projection, logit scale and last layer.
        load_weights(text, nested(text, weights), "text encoder", unused_ok=True)
        # The fast tokenizer: the export saves its tokenizer.json (a slow one would be reloaded from
        # the model's folder, which a single file does not have).
        tokenizer = CLIPTokenizerFast.from_pretrained(config, subfolder="tokenizer")
    xl = {}
    if (config / "text_encoder_2").is_dir():  # SDXL's OpenCLIP ViT-bigG, all its layers, and its projection
        from transformers import CLIPTextModelWithProjection

        text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config, subfolder="text_encoder_2"))
        weights = convert_open_clip_checkpoint(text_2, state, prefix=SGM_OPEN_CLIP if refiner else XL_OPEN_CLIP)
        load_weights(text_2, nested(text_2, weights), "second text encoder", unused_ok=True)  # logit scale
        xl = dict(text_encoder_2=text_2, tokenizer_2=CLIPTokenizerFast.from_pretrained(config, subfolder="tokenizer_2"))
    return unet, vae, text, tokenizer, xl


def nested(text, weights: dict) -> dict:
    """CLIP weights named as `text` names them. Files name them with or without the text_model.
    level, and transformers >= 5.6 dropped it from CLIPTextModel: strip it, then add it back where
    this version has it (the projection sits beside it)."""
    weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    if hasattr(text, "text_model"):
        weights = {("text_model." + k if k != "text_projection.weight" else k): v for k, v in weights.items()}
    return weights


def load_vae(vae, state: dict) -> None:
    """The VAE's weights of a whole checkpoint (first_stage_model.*), of a VAE file (the same
    names without the prefix), or of a diffusers VAE's weight file, into `vae`."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if any(k.startswith("decoder.up_blocks.") for k in state):  # a diffusers VAE's own file
        return load_weights(vae, state, "VAE")
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
    """An exception's first line, or where it only introduces a list (torch's "Error(s) in loading
    state_dict for UNet2DConditionModel:"), the first entry of that, e.g. its first size mismatch."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines or isinstance(e, KeyError):  # (a KeyError's text is the key alone)
        return " ".join([type(e).__name__, *lines[:1]])
    if lines[0].endswith(":") and len(lines) > 1:
        return lines[1].rstrip(".")
    return lines[0].rstrip(".")


def to_diffusers_folder(model: str, out: Path, allow_pickle: bool = False, config: str | None = None,
                        prediction: str | None = None, vae: str | None = None) -> Path:
    """Write a single-file checkpoint as a diffusers folder, offline (what diffusers'
    from_single_file(...).save_pretrained(...) does, without fetching configs from the hub).
    Appears whole or not at all."""
    import os
    import shutil

    from ldm_deploy.export.random_model import save_diffusers_folder
    from ldm_deploy.export.source import load_source

    out = Path(out)
    if out.exists():
        raise ModelSourceError(f"{out} already exists; choose another folder")
    src = load_source(model, allow_pickle, config, prediction, vae)
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)  # an interrupted run's
    try:
        save_diffusers_folder(tmp, src.unet, src.vae, src.text_encoder, src.tokenizer, src.scheduler_config,
                              src.text_encoder_2, src.tokenizer_2)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> int:
    """python -m ldm_deploy.export.single_file FILE --out FOLDER: a checkpoint as a diffusers folder."""
    import argparse

    from ldm_deploy.cli.common import run_main, setup_logging

    p = argparse.ArgumentParser(prog="python -m ldm_deploy.export.single_file",
                                description="write a single-file SD 1.x / 2.x / SDXL checkpoint as a diffusers folder")
    p.add_argument("model", help="the checkpoint (.safetensors; .ckpt with --allow-pickle)")
    p.add_argument("--out", required=True, help="the diffusers folder to create")
    p.add_argument("--config", default=None, help="as ldm-export --config")
    p.add_argument("--prediction-type", default=None, choices=PREDICTION_TYPES)
    p.add_argument("--vae", default=None, help="as ldm-export --vae")
    p.add_argument("--allow-pickle", action="store_true")
    args = p.parse_args(argv)
    setup_logging(False)

    def go():
        if not Path(args.model).expanduser().is_file():
            raise ModelSourceError(f"{args.model} is not a file; pass a single-file checkpoint")
        print(to_diffusers_folder(args.model, Path(args.out), args.allow_pickle, args.config,
                                  args.prediction_type, args.vae))

    return run_main(go, "single_file")


if __name__ == "__main__":
    import sys

    sys.exit(main())
