"""Write a diffusers model as a single-file checkpoint under the original Stable Diffusion names
(CompVis ldm / AUTOMATIC1111 layout), the inverse of diffusers' single-file converter.

Tests only: it lets them make single files of tiny random models, and diffusers' converter
reading them back to the same weights is what checks these names.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPEN_CLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
XL_CLIP, XL_OPEN_CLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."  # SDXL's
REFINER_OPEN_CLIP = "conditioner.embedders.0.model."  # an SDXL refiner's one text encoder

UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL's
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def unet_name(key: str, layers: int, up_with_attention: set[int]) -> str:
    """diffusers UNet2DConditionModel key -> ldm UNetModel key. `layers`: layers_per_block."""
    for new, old in UNET_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        side, block, kind, j, rest = m.groups()
        first = 1 + int(block) * (layers + 1) if side == "down" else int(block) * (layers + 1)
        index = f"{'input' if side == 'down' else 'output'}_blocks.{first + int(j)}"
        return f"{index}.0.{resnet_part(rest)}" if kind == "resnets" else f"{index}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * (layers + 1) + layers}.0.op.{m[2]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        slot = 2 if int(m[1]) in up_with_attention else 1
        return f"output_blocks.{int(m[1]) * (layers + 1) + layers}.{slot}.conv.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        kind, j, rest = m.groups()
        return f"middle_block.{2 * int(j)}.{resnet_part(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    raise KeyError(key)


def resnet_part(rest: str) -> str:
    name, tail = rest.rsplit(".", 1)
    return f"{UNET_RESNET[name]}.{tail}"


def vae_name(key: str, blocks: int) -> str:
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", key)
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets",
                 lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.block", key)
    return re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                  lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.upsample", key)


def open_clip_state(text) -> dict:
    """CLIPTextModel -> OpenCLIP's text tower names (q, k, v in one in_proj)."""
    out = {}
    state = text_model_state(text)
    for key, value in state.items():
        if m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", key):
            parts = [state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[f"transformer.resblocks.{m[1]}.attn.in_proj_{m[2]}"] = torch.cat(parts)
        elif re.match(r"text_model\.encoder\.layers\.\d+\.self_attn\.[kv]_proj", key):
            continue
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)\.(weight|bias)", key):
            out[f"transformer.resblocks.{m[1]}.{OPEN_CLIP_LAYER[m[2]]}.{m[3]}"] = value
        else:
            out[{"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                 "text_model.embeddings.position_embedding.weight": "positional_embedding",
                 "text_model.final_layer_norm.weight": "ln_final.weight",
                 "text_model.final_layer_norm.bias": "ln_final.bias"}[key]] = value
    return out


def text_model_state(text) -> dict:
    """CLIP's names as the original checkpoints have them (text_model.embeddings...), whichever
    way this transformers version nests CLIPTextModel; SDXL's second encoder's projection left out
    (xl_text_state names it)."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text.state_dict().items()
            if k != "text_projection.weight"}


def xl_text_state(text, text_2) -> dict:
    """SDXL's two text encoders under the names of its release (sgm's conditioner): CLIP ViT-L's
    transformers names, OpenCLIP ViT-bigG's own with its (width, projection) matrix and logit scale.
    text None: a refiner's, the second alone as embedders.0."""
    state = {} if text is None else {XL_CLIP + k: v for k, v in text_model_state(text).items()}
    prefix = REFINER_OPEN_CLIP if text is None else XL_OPEN_CLIP
    state.update({prefix + k: v for k, v in open_clip_state(text_2).items()})
    state[prefix + "text_projection"] = text_2.text_projection.weight.T
    state[prefix + "logit_scale"] = torch.ones((), device=device_of(text_2))
    return state


def text_extras(text, open_clip: bool) -> dict:
    """What the released files hold beyond diffusers' text encoder, and a loader must pass over:
    SD 1.x's position_ids buffer; OpenCLIP's last layer (SD 2.x uses the penultimate layer's
    output, so diffusers' model stops one short), its projection and its logit scale."""
    c = text.config
    if not open_clip:
        return {CLIP + "text_model.embeddings.position_ids": torch.arange(77)[None]}
    last = {k: v for k, v in open_clip_state(text).items() if k.startswith(f"transformer.resblocks.{c.num_hidden_layers - 1}.")}
    extra = {OPEN_CLIP + k.replace(f".{c.num_hidden_layers - 1}.", f".{c.num_hidden_layers}.", 1): v.clone()
             for k, v in last.items()}
    return {**extra, OPEN_CLIP + "text_projection": torch.randn(c.hidden_size, c.projection_dim, device=device_of(text)),
            OPEN_CLIP + "logit_scale": torch.ones((), device=device_of(text))}


def device_of(module):
    return next(module.parameters()).device


def ldm_state(unet, vae, text, open_clip: bool, text_2=None) -> dict:
    """The three modules' weights under ldm names, as one state dict (SDXL: with its second text
    encoder)."""
    layers = unet.config.layers_per_block
    up_attention = {i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t}
    state = {UNET + unet_name(k, layers, up_attention): v for k, v in unet.state_dict().items()}
    state.update({VAE + k: v for k, v in ldm_state_vae(vae).items()})
    if text_2 is not None:
        state.update(xl_text_state(text, text_2))
        return {k: v.contiguous() for k, v in state.items()}
    text_state = open_clip_state(text) if open_clip else text_model_state(text)
    state.update({(OPEN_CLIP if open_clip else CLIP) + k: v for k, v in text_state.items()})
    state.update(text_extras(text, open_clip))
    return {k: v.contiguous() for k, v in state.items()}


def write_single_file(folder, out, open_clip: bool, dtype=torch.float32) -> dict:
    """Save the diffusers model in `folder` as one .safetensors file at `out`; -> its state."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    refiner = not (Path(folder) / "text_encoder").is_dir()  # an SDXL refiner: the second encoder alone
    text = None if refiner else CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    text_2 = None
    if (Path(folder) / "text_encoder_2").is_dir():  # SDXL
        from transformers import CLIPTextModelWithProjection

        text_2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")
    state = {k: v.to(dtype) for k, v in ldm_state(unet, vae, text, open_clip, text_2).items()}
    save_file(state, str(out))
    return state


def write_vae_file(folder, out, prefix: str = "") -> None:
    """The model's VAE alone under the original names, as VAE releases ship it
    (vae-ft-mse-840000-ema-pruned.safetensors: no prefix)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    state = ldm_state_vae(vae)
    save_file({prefix + k: v for k, v in state.items()}, str(out))


def ldm_state_vae(vae) -> dict:
    blocks = len(vae.config.block_out_channels)
    out = {}
    for k, v in vae.state_dict().items():
        name = vae_name(k, blocks)
        out[name] = (v[:, :, None, None] if ".attn_1." in name and v.ndim == 2 else v).contiguous()  # 1x1 convs
    return out


def controlnet_state(net, prefix: str = "") -> dict:
    """A diffusers ControlNetModel's weights under the original ControlNet release's names
    (input_blocks / middle_block as the U-Net's, zero_convs, middle_block_out, input_hint_block),
    each with `prefix` (the releases' "control_model." or none)."""
    layers = net.config.layers_per_block
    out = {}
    for key, value in net.state_dict().items():
        if m := re.match(r"controlnet_down_blocks\.(\d+)\.(weight|bias)", key):
            name = f"zero_convs.{m[1]}.0.{m[2]}"
        elif m := re.match(r"controlnet_mid_block\.(weight|bias)", key):
            name = f"middle_block_out.0.{m[1]}"
        elif m := re.match(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(weight|bias)", key):
            index = {"conv_in": 0, "conv_out": 14}.get(m[1], 2 * int(m[2] or 0) + 2)
            name = f"input_hint_block.{index}.{m[3]}"
        else:
            name = unet_name(key, layers, set())
        out[prefix + name] = value.contiguous()
    return out
