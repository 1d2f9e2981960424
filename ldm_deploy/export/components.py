"""The four exported components (SDXL: their variants) as torch modules whose forward signatures follow the I/O specs
(`ldm_deploy.engine.spec.component_specs`): same names, same order, same meaning.

Each takes the dtype its model body runs in. Interfaces stay float32 whatever it is: latents,
coefficients and the sampler update are fp32, only the networks run in fp16 on GPUs. (For
float32 the casts are no-ops and leave no trace in the exported graph.)"""

from __future__ import annotations

import torch
from torch import nn

from ldm_deploy.engine.samplers import update


class TextEncoder(nn.Module):
    """(K, B, 77) token ids, (1,) clip_skip, (K, B, 77) token weights -> (K, B, 77, D) hidden
    states of the layer clip_skip layers below the last, after the final layer norm, as
    diffusers' encode_prompt computes them (0: the last layer's, what diffusers uses by default;
    1: the penultimate), each token's scaled by its weight and the prompt's rescaled to its
    unweighted mean (AUTOMATIC1111's prompt emphasis, engine/prompt_weights.py).

    The selection is a gather and weights of 1 multiply by exactly 1 (and by mean / mean = 1):
    without skip or weights the result is bit for bit the plain encoder's. Without clip_skip
    and weights: the graph of engines from before them, kept for the tests of that path."""

    def __init__(self, clip, dtype=torch.float32):
        super().__init__()
        self.clip = cast(clip, dtype)

    def forward(self, input_ids, clip_skip=None, token_weights=None):
        ids = input_ids.flatten(0, 1)
        if clip_skip is None:
            hidden = self.clip(ids)[0].float()  # (K*B, 77, D)
        else:
            states = self.clip(ids, output_hidden_states=True).hidden_states  # L + 1: embeddings, each layer
            hidden = torch.stack(states).index_select(0, len(states) - 1 - clip_skip)[0]
            # transformers 5 dropped CLIPTextModel's text_model wrapper (4.x: clip.text_model.final_layer_norm)
            hidden = getattr(self.clip, "text_model", self.clip).final_layer_norm(hidden).float()
        if token_weights is not None:
            hidden = emphasis(hidden, token_weights.flatten(0, 1))
        return hidden.reshape(*input_ids.shape, hidden.shape[-1])


class TextEncoderXL(nn.Module):
    """SDXL's two text encoders as one, as diffusers' StableDiffusionXLPipeline.encode_prompt runs
    them: (K, B, 77) token ids, (1,) clip_skip, (K, B, 77) token weights -> (K, B, 77, D1 + D2)
    hidden states, each encoder's clip_skip + 2 layers from the end (0: the penultimate layer's,
    as SDXL was trained; no final layer norm), side by side; and (K, B, P) the second encoder's
    pooled, projected end token.

    Both tokenizers split text alike (the same BPE); the second pads after the end token with its
    own token ("!" in SDXL base), put in here. Emphasis weighs each encoder's hidden states and
    restores each one's mean, as AUTOMATIC1111's two SDXL embedders do; the pooled vector is
    not weighed (nor there).

    An SDXL refiner has the second encoder alone (clip None): its hidden states (D2 wide) and pooled
    vector, as diffusers' StableDiffusionXLImg2ImgPipeline.encode_prompt gives them."""

    def __init__(self, clip, clip_2, end_id: int, pad_2: int, dtype=torch.float32):
        super().__init__()
        self.clip = None if clip is None else cast(clip, dtype)
        self.clip_2 = cast(clip_2, dtype)
        self.end_id, self.pad_2 = end_id, pad_2

    def forward(self, input_ids, clip_skip, token_weights):
        ids = input_ids.flatten(0, 1)  # (K*B, 77)
        # Past the first end token: an end token at any earlier position, counted with a float
        # matrix product by a strictly upper triangle (MatMul rather than CumSum, which not every
        # ONNX consumer takes; the pooling below is transformers' own, an ArgMax).
        n = ids.shape[-1]
        earlier = torch.ones(n, n, device=ids.device).triu(1)  # [i, j] = 1 where i < j
        after_end = (ids == self.end_id).float() @ earlier > 0
        ids_2 = torch.where(after_end, torch.full_like(ids, self.pad_2), ids)
        weights = token_weights.flatten(0, 1)
        hidden = []
        for clip, tokens in ((self.clip, ids), (self.clip_2, ids_2)):
            if clip is None:  # a refiner's
                continue
            out = clip(tokens, output_hidden_states=True)
            states = torch.stack(out.hidden_states)  # (L + 1, K*B, 77, D): embeddings, each layer
            hidden.append(emphasis(states.index_select(0, len(out.hidden_states) - 2 - clip_skip)[0].float(),
                                   weights))
        pooled = out.text_embeds.float()  # (K*B, P): the second's
        hidden = torch.cat(hidden, dim=-1)
        return (hidden.reshape(*input_ids.shape, hidden.shape[-1]),
                pooled.reshape(*input_ids.shape[:2], pooled.shape[-1]))


def emphasis(hidden, weights):
    """(N, 77, D) hidden states, (N, 77) weights -> each token's scaled by its weight and each
    prompt's rescaled to its unweighted mean (AUTOMATIC1111's prompt emphasis)."""
    mean = hidden.mean(dim=(1, 2), keepdim=True)  # (N, 1, 1): per prompt
    hidden = hidden * weights.unsqueeze(-1)
    weighted = hidden.mean(dim=(1, 2), keepdim=True)
    return hidden * torch.where(weighted == 0, 1.0, mean / weighted)  # 0: never divide by it


class UnetStep(nn.Module):
    """One denoising step: CFG batching, the U-Net, guidance, x0 conversion, sampler update.

    text_embeddings is (K, B, 77, D) with K = 2 ([uncond, cond]) under guidance or K = 1
    ([cond]) without; the latents are repeated K times, so skipping guidance halves the U-Net's
    work rather than wasting it.

    mask (B, 1, h, w) and image_latents (B, C, h, w), as diffusers' StableDiffusionInpaintPipeline
    uses them: an inpainting U-Net (2C + 1 channels in) takes them beside the latents; any other
    gets the known part put back after the update (spec.py).
    """

    def __init__(self, unet, dtype=torch.float32, controlnets=()):
        super().__init__()
        self.unet = cast(unet, dtype)
        self.dtype = dtype
        self.inpainting = unet.config.in_channels != unet.config.out_channels
        self.controlnets = nn.ModuleList(cast(net, dtype) for net in controlnets)

    def forward(self, latents, text_embeddings, coeffs, state, noise, state2=None, mask=None, image_latents=None,
                control_images=None, control_scales=None):
        return self.step(latents, text_embeddings, coeffs, state, noise, state2, mask, image_latents,
                         control_images, control_scales)

    def step(self, latents, text_embeddings, coeffs, state, noise, state2=None, mask=None, image_latents=None,
             control_images=None, control_scales=None, added=None):
        k = text_embeddings.shape[0]
        x_in = update.model_input(coeffs, latents)  # (B, C, h, w)
        # repeat, not expand + flatten: flattening a broadcast view depends on whether B is 1,
        # which torch.export would then have to guard (and refuse batch 1 for).
        x_latent = x_in.repeat(k, 1, 1, 1)  # (K*B, C, h, w), K-major
        if self.inpainting:
            x_in = torch.cat([x_in, mask, image_latents], dim=1)  # (B, 2C + 1, h, w)
        x_in = x_in.repeat(k, 1, 1, 1)
        emb = text_embeddings.flatten(0, 1).to(self.dtype)  # (K*B, 77, D)
        t = coeffs[update.T]
        residuals = {}
        if len(self.controlnets):
            residuals = self.control(x_latent, t, emb, control_images, control_scales, k, added)
        out = self.unet(x_in.to(self.dtype), t, encoder_hidden_states=emb, added_cond_kwargs=added,
                        **residuals).sample.float()
        out = out.reshape(k, *latents.shape)  # (K, B, C, h, w): [uncond, cond] or [cond]
        model_out = update.guide(out[0], out[-1], coeffs)
        x_next, x0 = update.update(coeffs, latents, state, noise, model_out, state2)
        if mask is not None and not self.inpainting:  # diffusers' order of operations, so that a
            x_next = (1 - mask) * image_latents + mask * x_next  # mask of 1 keeps x_next exactly
        return x_next, x0

    def control(self, x, t, emb, images, scales, k, added=None) -> dict:
        """The ControlNets' residuals, summed, as the U-Net's keyword arguments. Each sees the
        (K*B, C, h, w) latent input (an inpainting U-Net's extra channels not), as diffusers'
        ControlNet pipelines give it, its (B, 3, H, W) image repeated K times, and SDXL's added
        conditioning as the U-Net does."""
        down, mid = None, None
        for i, net in enumerate(self.controlnets):
            image = images[i].repeat(k, 1, 1, 1).to(self.dtype)  # (K*B, 3, H, W)
            d, m = net(x.to(self.dtype), t, encoder_hidden_states=emb, controlnet_cond=image,
                       conditioning_scale=scales[i].to(self.dtype), added_cond_kwargs=added, return_dict=False)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}


class UnetStepXL(UnetStep):
    """SDXL's step: the same, with the U-Net's added conditioning: (K, B, P) pooled text and
    (B, 6) sizes (original height and width, crop top and left, target height and width, as
    diffusers' _get_add_time_ids lists them), taken after the step's other inputs, in the spec's order.
    A refiner's: (K, B, 5) time_ids, four sizes and an aesthetic score, which differs between the
    halves (diffusers' add_neg_time_ids with negative_aesthetic_score)."""

    def forward(self, latents, text_embeddings, coeffs, state, noise, state2, mask, image_latents,
                pooled_embeddings, time_ids, control_images=None, control_scales=None):
        k = text_embeddings.shape[0]
        # (K*B, 6) sizes repeated K-major as the latents; a refiner's (K, B, 5) flattened likewise
        ids = time_ids.flatten(0, 1) if time_ids.dim() == 3 else time_ids.repeat(k, 1)
        added = {"text_embeds": pooled_embeddings.flatten(0, 1).to(self.dtype),  # (K*B, P)
                 "time_ids": ids.to(self.dtype)}
        return self.step(latents, text_embeddings, coeffs, state, noise, state2, mask, image_latents,
                         control_images, control_scales, added=added)


class VaeDecoder(nn.Module):
    """(B, 4, h, w) final latents -> (B, 3, 8h, 8w) images in [0, 1], as diffusers postprocesses."""

    def __init__(self, vae, dtype=torch.float32):
        super().__init__()
        self.vae = cast(vae, dtype)
        self.dtype = dtype
        self.scaling = float(vae.config.scaling_factor)

    def forward(self, latents):
        images = self.vae.decode((latents / self.scaling).to(self.dtype)).sample.float()
        return (images * 0.5 + 0.5).clamp(0, 1)


class VaeEncoder(nn.Module):
    """(B, 3, H, W) images in [-1, 1] -> the sampler's starting latents for img2img.

    z = scaling * (mean + std * sample_noise) is diffusers' `latent_dist.sample()`; the start is
    image_scale * z + noise_scale * start_noise, the sampler's `add_noise` at the first step."""

    def __init__(self, vae, dtype=torch.float32):
        super().__init__()
        self.vae = cast(vae, dtype)
        self.dtype = dtype
        self.scaling = float(vae.config.scaling_factor)

    def forward(self, images, sample_noise, start_noise, start_coeffs):
        dist = self.vae.encode(images.to(self.dtype)).latent_dist
        z = self.scaling * (dist.mean.float() + dist.std.float() * sample_noise)
        return start_coeffs[0] * z + start_coeffs[1] * start_noise


def cast(module, dtype):
    # Loaded modules are float32 already; diffusers warns on every .to(dtype), needed or not.
    return module if dtype == torch.float32 else module.to(dtype)


def text_encoder(m, dtype):
    if m.text_encoder_2 is None:
        return TextEncoder(m.text_encoder, dtype)
    return TextEncoderXL(m.text_encoder, m.text_encoder_2, int(m.tokenizer.eos_token_id),
                         int(m.tokenizer_2.pad_token_id), dtype)  # a refiner's text_encoder: None


def unet_step(m, dtype):
    if m.text_encoder_2 is None:
        return UnetStep(m.unet, dtype, m.controlnets)
    return UnetStepXL(m.unet, dtype, m.controlnets)


WRAPPERS = {
    "text_encoder": text_encoder,
    "unet_step": unet_step,
    "vae_decoder": lambda m, dtype: VaeDecoder(m.vae, dtype),
    "vae_encoder": lambda m, dtype: VaeEncoder(m.vae, dtype),
}


def example_inputs(spec, dims: dict[str, int]) -> tuple[torch.Tensor, ...]:
    """Non-degenerate example inputs for tracing, shaped by the spec at `dims`."""
    g = torch.Generator().manual_seed(0)
    out = []
    for t in spec.inputs:
        shape = t.resolve(dims)
        if t.name == "clip_skip":  # 0: the checks compare the whole text encoder
            out.append(torch.zeros(shape, dtype=torch.int64))
        elif t.name == "mask":  # 0 / 1, as masks are (the traced graph does not depend on it)
            out.append((torch.rand(shape, generator=g) < 0.5).float())
        elif t.name == "time_ids":  # sizes, as SDXL's are (the traced graph does not depend on them)
            out.append(torch.full(shape, 1024.0))
        elif t.name == "token_weights":  # 1: random weights would make the mean rescale of a
            out.append(torch.ones(shape))  # random model (mean ~1e-8) compare rounding noise
        elif t.dtype == "int64":
            out.append(torch.randint(0, 1000, shape, generator=g))
        else:
            out.append(torch.rand(shape, generator=g))
    return tuple(out)
