"""A diffusers attention processor that runs `ldm_deploy::attention`.

`FusedAttnProcessor` has the call signature of diffusers' `AttnProcessor2_0` and does the same
work, with the SDPA call replaced by the op: the (B, L, heads * head_dim) projections are viewed
as (B, heads, L, head_dim) without copies, and the op's output comes back laid out as
(B, L, heads, head_dim), so the reshape before `to_out` is free as well.
"""

from __future__ import annotations

import logging

import torch

import ldm_deploy.kernels.ops  # noqa: F401  (registers torch.ops.ldm_deploy.attention)

logger = logging.getLogger(__name__)


class FusedAttnProcessor:
    """Drop-in replacement for `diffusers.models.attention_processor.AttnProcessor2_0`.

    Uses `attn.scale` (head_dim ** -0.5 in every Stable Diffusion U-Net, the value SDPA would
    use). Calls with an attention mask, which Stable Diffusion's U-Net never passes, go to the
    stock processor.
    """

    def __init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self._masked = AttnProcessor2_0()
        self._logged_mask = False

    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        if attention_mask is not None:
            if not self._logged_mask:
                self._logged_mask = True
                logger.warning("FusedAttnProcessor: attention masks go to AttnProcessor2_0")
            return self._masked(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        # (B, L, heads * head_dim) -> (B, heads, L, head_dim): views, no copies.
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = torch.ops.ldm_deploy.attention(query, key, value, float(attn.scale))
        # (B, heads, Lq, head_dim), stored as (B, Lq, heads, head_dim): this reshape is a view.
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height,
                                                                    width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def use_fused_attention(unet: torch.nn.Module) -> torch.nn.Module:
    """Put `FusedAttnProcessor` into every attention layer of a diffusers U-Net (in place).

    Takes a `UNet2DConditionModel` (or any diffusers model with `set_attn_processor`) and
    returns it. Undo with `unet.set_attn_processor(AttnProcessor2_0())`.
    """
    unet.set_attn_processor(FusedAttnProcessor())
    return unet
