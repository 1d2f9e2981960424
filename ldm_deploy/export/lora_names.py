"""LoRA layer names under the original checkpoint's U-Net blocks -> diffusers' module names.

sd-scripts names an SDXL U-Net's layers as the original (sgm / ldm) code does, underscores for
dots: `input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `middle_block_1_proj_in`,
`output_blocks_2_2_conv`, `label_emb_0_0`. Some SD 1.x / 2.x files do too. diffusers' U-Net
names the same layers `down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`, ...: the
block numbering is the U-Net's (layers_per_block resnets a down block, one more an up block,
a downsampler / upsampler closing each but the last), and resnets name their layers otherwise.
Inside an attention block the names agree.
"""

from __future__ import annotations

import re

# ldm ResBlock layer -> diffusers ResnetBlock2D layer
RESNET = {"in_layers_0": "norm1", "in_layers_2": "conv1", "emb_layers_1": "time_emb_proj",
          "out_layers_0": "norm2", "out_layers_3": "conv2", "skip_connection": "conv_shortcut"}
# layers outside the blocks
TOP = {"time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2",
       "label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2",
       "input_blocks_0_0": "conv_in", "out_0": "conv_norm_out", "out_2": "conv_out"}
BLOCK = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$")
MIDDLE = re.compile(r"^middle_block_(\d+)_(.+)$")


def is_ldm(name: str) -> bool:
    """A U-Net layer named as the original checkpoint names it."""
    return name.startswith(("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_"))


def to_diffusers(name: str, config) -> str | None:
    """An ldm U-Net layer name (underscored) -> diffusers' (underscored), for a U-Net of this
    diffusers config; None where the name has no place in it."""
    for old, new in TOP.items():
        if name == old or name.startswith(old + "_"):
            return new + name[len(old):]
    per_down = config.layers_per_block
    if not isinstance(per_down, int):  # per-block counts (diffusers allows a list): not mapped
        return None
    up_attention = {i for i, t in enumerate(config.up_block_types) if "CrossAttn" in t}
    if m := MIDDLE.match(name):
        index, rest = int(m[1]), m[2]
        if index == 1:
            return f"mid_block_attentions_0_{rest}"
        return resnet(f"mid_block_resnets_{index // 2}", rest) if index in (0, 2) else None
    if not (m := BLOCK.match(name)):
        return None
    side, index, slot, rest = m[1], int(m[2]), int(m[3]), m[4]
    if side == "input_blocks":
        block, layer = divmod(index - 1, per_down + 1)
        if layer == per_down:  # the downsampler closing the block
            return f"down_blocks_{block}_downsamplers_0_conv" + rest[len("op"):] if rest.startswith("op") else None
        kind = {0: "resnets", 1: "attentions"}.get(slot)
    else:
        block, layer = divmod(index, per_down + 1)
        if slot == (2 if block in up_attention else 1) and rest.startswith("conv"):  # the upsampler
            return f"up_blocks_{block}_upsamplers_0_{rest}"
        kind = {0: "resnets", 1: "attentions"}.get(slot)
    if kind is None:
        return None
    prefix = f"{'down' if side == 'input_blocks' else 'up'}_blocks_{block}_{kind}_{layer}"
    return resnet(prefix, rest) if kind == "resnets" else f"{prefix}_{rest}"


def resnet(prefix: str, rest: str) -> str | None:
    for old, new in RESNET.items():
        if rest == old or rest.startswith(old + "_"):
            return f"{prefix}_{new}{rest[len(old):]}"
    return None
