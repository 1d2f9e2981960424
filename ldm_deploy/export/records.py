"""What an engine's manifest records of its source model: its ModelInfo (family, noise schedule,
the facts its specs follow), its tokenizer file and the tools that exported it."""

from __future__ import annotations

import logging
from pathlib import Path

from ldm_deploy import __version__
from ldm_deploy.engine.manifest import ModelInfo
from ldm_deploy.engine.samplers import NoiseSchedule
from ldm_deploy.engine.spec import ModelFacts
from ldm_deploy.errors import ModelSourceError
from ldm_deploy.export.source import SourceModel

log = logging.getLogger(__name__)


def vae_scale(src: SourceModel) -> int:
    """Image side / latent side: 2 per downsampling of the VAE (8 for SD 1.x / 2.x)."""
    return 2 ** (len(src.vae.config.block_out_channels) - 1)


def vae_tile(src: SourceModel) -> int:
    """diffusers' VAE tile (enable_vae_tiling), latent px: the VAE's sample_size over its scale
    (64 for SD 1.x, 96 for SD 2.x's 768 px VAE, 128 for SDXL)."""
    size = src.vae.config.sample_size
    return int((size[0] if isinstance(size, (list, tuple)) else size) / vae_scale(src))


def model_info(src: SourceModel) -> ModelInfo:
    text_cfg = (src.text_encoder or src.text_encoder_2).config
    if str(src.scheduler_config.get("_class_name", "")).startswith("EDM"):
        raise ModelSourceError(f"{src.path}: an EDM model ({src.scheduler_config['_class_name']}, e.g. Playground "
                               "v2.5), whose noise schedule is not supported yet")
    schedule = NoiseSchedule.from_config({**src.scheduler_config, "family": src.family})
    if schedule.beta_schedule not in ("scaled_linear", "linear"):
        raise ModelSourceError(f"{src.path}: beta_schedule {schedule.beta_schedule!r} is not supported yet")
    if schedule.prediction_type not in ("epsilon", "v_prediction"):
        raise ModelSourceError(f"{src.path}: prediction_type {schedule.prediction_type!r} is not supported yet")
    if src.scheduler_config.get("clip_sample", True):
        log.warning(
            "%s: the scheduler config does not set clip_sample false, so diffusers' DDIMScheduler and "
            "DDPMScheduler built from it clamp x0 to [-1, 1]; our ddim and ddpm do not (as SD 1.x / 2.x "
            "releases run them)",
            src.path,
        )
    width, layers, pooled = text_cfg.hidden_size, text_cfg.num_hidden_layers, 0
    if src.refiner:  # the second encoder alone
        pooled = text_cfg.projection_dim
    elif src.text_encoder_2 is not None:  # SDXL: both encoders' hidden states side by side; clip skip in both
        second = src.text_encoder_2.config
        width, layers, pooled = width + second.hidden_size, min(layers, second.num_hidden_layers), second.projection_dim
    facts = ModelFacts(src.vae.config.latent_channels, text_cfg.max_position_embeddings, width,
                       vae_scale(src), layers, long_prompts=True, masks=True,
                       inpainting=src.unet.config.in_channels != src.vae.config.latent_channels,
                       controlnets=len(src.controlnets), history=True, pooled_width=pooled, aesthetic=src.refiner)
    return ModelInfo(
        family=src.family,
        source=src.source,
        weights_sha256=src.weights_sha256,
        checkpoint_sha256=src.checkpoint_sha256,
        prediction_type=schedule.prediction_type,
        vae_scaling_factor=float(src.vae.config.scaling_factor),
        latent_channels=facts.latent_channels,
        text_length=facts.text_length,
        text_width=facts.text_width,
        sample_size=int(src.unet.config.sample_size),
        noise_schedule=schedule,
        vae_scale=facts.vae_scale,
        vae_tile=vae_tile(src),
        vae=src.vae_source,
        loras=tuple(src.loras),
        embeddings=tuple(src.embeddings),
        text_layers=facts.text_layers,
        long_prompts=facts.long_prompts,
        masks=facts.masks,
        inpainting=facts.inpainting,
        controlnets=tuple(src.controlnet_records),
        history=facts.history,
        pooled_width=facts.pooled_width,
        zero_negative=src.zero_negative,
        aesthetic=facts.aesthetic,
    )


def write_tokenizer(src: SourceModel, max_length: int, path: Path) -> int:
    """Save the tokenizer as one tokenizer.json with diffusers' padding and truncation baked
    in (pad to max_length, truncate), so the runtime needs only the `tokenizers` library."""
    from ldm_deploy.export.source import fast_tokenizer

    tok = fast_tokenizer(src)
    backend = tok.backend_tokenizer
    backend.enable_truncation(max_length=max_length)
    backend.enable_padding(length=max_length, pad_id=tok.pad_token_id, pad_token=tok.pad_token)
    backend.save(str(path))
    return int(tok.pad_token_id)


def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"ldm_deploy": __version__}
    for pkg in ("torch", "diffusers", "transformers", "onnx"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
