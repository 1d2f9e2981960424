"""ControlNets (Zhang et al. 2023) exported inside the U-Net step: `ldm-export --controlnet DIR`.

Each is a diffusers ControlNetModel folder (config.json and its weights), or one file: the
original releases' names (ControlNet 1.0 / 1.1, as AUTOMATIC1111's models/ControlNet holds them:
input_blocks.*, zero_convs.*, input_hint_block.*, with or without control_model.), renamed by
diffusers' converter, or diffusers' names; a file's ControlNet is built for the model's U-Net. It
must fit the U-Net (its blocks' widths, its text width). In the step it sees what diffusers' ControlNet
pipelines give it: the latent model input, the timestep, the text embeddings and its control
image in [0, 1]; its residuals, times each step's scale, are summed (several ControlNets, as
diffusers' MultiControlNetModel sums them) and added to the U-Net's skip connections.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ldm_deploy.errors import ModelSourceError
from ldm_deploy.export import single_file
from ldm_deploy.export.single_file import PICKLE_SUFFIXES, SAFE_SUFFIXES

log = logging.getLogger(__name__)


def load(src, paths: tuple[str, ...], allow_pickle: bool) -> None:
    """Load each ControlNet into src.controlnets (fp32, eval) and its record into
    src.controlnet_records ({"name", "sha256", "a1111_name"}); refuse one that does not fit the U-Net."""
    from ldm_deploy.export.source import hash_files, quiet_libraries

    quiet_libraries()
    for given in paths:
        path = Path(given).expanduser()
        net, files = load_one(path, allow_pickle, src.unet)
        check_fits(net, src.unet, path, src.vae)
        src.controlnets.append(net.eval().float())
        stem = path.stem if path.is_file() else path.name
        src.controlnet_records.append({"name": path.name, "sha256": hash_files(files),
                                       "a1111_name": f"{stem} [{old_hash(files[0])}]"})
        log.info("ControlNet %s", path.name)


def old_hash(path: Path) -> str:
    """AUTOMATIC1111's old model hash (its sd_models.model_hash), which the ControlNet extension names
    its models by ("control_v11p_sd15_canny [d14c016b]"): the SHA-256 of the 64 KiB at 1 MiB into
    the file, 8 digits."""
    import hashlib

    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def load_one(path: Path, allow_pickle: bool, unet):
    """-> (ControlNetModel, its weight files) of a diffusers ControlNet folder or of one file."""
    from diffusers import ControlNetModel

    if not path.exists():
        raise ModelSourceError(f"--controlnet {path} does not exist; pass a ControlNet file (.safetensors) "
                               "or a diffusers ControlNet folder (config.json and its weights)")
    if path.is_file():
        return load_file(path, allow_pickle, unet), [path]
    safe = sorted(f for f in path.iterdir() if f.suffix in SAFE_SUFFIXES)
    pickled = sorted(f for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if not (path / "config.json").is_file() or not (safe or pickled):
        raise ModelSourceError(f"--controlnet {path} is not a diffusers ControlNet folder (config.json and "
                               "*.safetensors weights)")
    if not safe and not allow_pickle:
        raise ModelSourceError(f"--controlnet {path} holds only pickle weights ({pickled[0].name}); loading a "
                               "pickle runs arbitrary code. Pass --allow-pickle if you trust its source")
    try:
        net = ControlNetModel.from_pretrained(path, use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelSourceError(f"could not load the ControlNet at {path}: {e}") from None
    return net, safe or pickled


def load_file(path: Path, allow_pickle: bool, unet):
    """A single-file ControlNet, built for `unet` (its config, 4 channels in) and given the file's
    weights, all of them (a file that lacks one or holds one of another shape is refused)."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    state = single_file.read(path, allow_pickle).state
    if HINT in state:  # diffusers' own names
        weights = state
    elif any(k.endswith(ORIGINAL_HINT) for k in state):
        weights = convert_controlnet_checkpoint(state, dict(unet.config))
        weights = {k: v for k, v in weights.items() if v is not None}  # the converter's None: not in the file
        if unet.config.get("addition_embed_type"):  # SDXL's added-conditioning MLP, which the converter skips
            for old, new in (("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")):
                for part in ("weight", "bias"):
                    key = next((k for k in state if k.endswith(old + part)), None)
                    if key is not None:
                        weights[new + part] = state[key]
    else:
        raise ModelSourceError(f"--controlnet {path} is not a ControlNet (it has no {ORIGINAL_HINT} or {HINT} "
                               "weight); pass a ControlNet file or a diffusers ControlNet folder")
    net = ControlNetModel(**config_for(unet))
    try:
        single_file.load_weights(net, weights, "ControlNet")
    except (ValueError, RuntimeError, KeyError) as e:
        raise ModelSourceError(f"--controlnet {path} does not fit this model's U-Net: "
                               f"{single_file.first_line(e)} (a ControlNet for SD 1.5 fits SD 1.x models, one "
                               "for SD 2.1 SD 2.x, one for SDXL SDXL; SDXL's mid / small ControlNets need their "
                               "diffusers folder, whose config.json holds their smaller blocks)") from None
    return net


# The conditioning image's first convolution, under diffusers' names and the original ones.
HINT = "controlnet_cond_embedding.conv_in.weight"
ORIGINAL_HINT = "input_hint_block.0.weight"
# What a ControlNet copies of its U-Net's config (diffusers' ControlNetModel.from_unet).
FROM_UNET = ("flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention", "block_out_channels",
             "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups",
             "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
             "num_attention_heads", "use_linear_projection", "class_embed_type", "num_class_embeds",
             "upcast_attention", "resnet_time_scale_shift", "projection_class_embeddings_input_dim",
             "mid_block_type", "addition_embed_type", "addition_time_embed_dim")  # the last two: SDXL's


def config_for(unet) -> dict:
    """The config of a ControlNet for `unet`: its blocks, latents in (an inpainting U-Net's
    ControlNets take the 4 latent channels too), a 3-channel image through the released
    models' conditioning embedding (16, 32, 96, 256)."""
    c = unet.config
    return {**{k: c[k] for k in FROM_UNET if k in c}, "in_channels": c.out_channels, "conditioning_channels": 3,
            "conditioning_embedding_out_channels": (16, 32, 96, 256)}


def check_fits(net, unet, path: Path, vae) -> None:
    """The ControlNet's residuals must match the U-Net's skip connections and text width, and its
    image encoder take 3 channels and shrink them as the VAE does; global-pooling ones (shuffle),
    which diffusers runs in guess mode, are not run here."""
    c, u = net.config, unet.config
    if c.conditioning_channels != 3:
        raise ModelSourceError(f"--controlnet {path} takes {c.conditioning_channels}-channel control images; "
                               "only ControlNets of RGB images are supported")
    shrink = 2 ** (len(c.conditioning_embedding_out_channels) - 1)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if shrink != scale:
        raise ModelSourceError(f"--controlnet {path} shrinks its image {shrink} times, this model's VAE {scale} times: "
                               "it was made for another model")
    if c.get("global_pool_conditions"):
        raise ModelSourceError(f"--controlnet {path} pools its image globally (a shuffle ControlNet), which "
                               "diffusers runs in guess mode; that is not supported yet")
    for name in ("block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type"):
        if _plain(c.get(name)) != _plain(u.get(name)):
            raise ModelSourceError(
                f"--controlnet {path} was made for another model: its {name} is {_plain(c.get(name))}, the "
                f"U-Net's {_plain(u.get(name))} (a ControlNet for SD 1.5 fits SD 1.x models, one for SD 2.1 "
                "SD 2.x, one for SDXL SDXL)")
    if c.in_channels != u.out_channels:
        raise ModelSourceError(f"--controlnet {path} takes {c.in_channels}-channel latents; this model's "
                               f"have {u.out_channels}")


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value
