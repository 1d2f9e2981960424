"""I/O specs: the single source of truth for every exported component's tensors.

A shape is a tuple of ints and `Sym`s. A `Sym` names a dynamic dimension and a factor, e.g.
`Sym("latent_height", 8)` is the image height of a latent of height `latent_height`. The ranges
of the named dims (min / opt / max) live in the manifest. From these we derive: ONNX dynamic
axes, TensorRT optimization profiles, buffer shapes, and the checks on a user's request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ldm_deploy.engine.samplers.update import COLUMNS

# The VAE shrinks each side by this factor in every SD 1.x / 2.x model (Rombach et al.); a
# model's own factor is `ModelFacts.vae_scale` (our 64 px shapes model uses 4).
VAE_SCALE = 8


@dataclass(frozen=True)
class Sym:
    """A dynamic dimension: `factor * dims[name]`."""

    name: str
    factor: int = 1


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: tuple  # of int | Sym

    def resolve(self, dims: dict[str, int]) -> tuple[int, ...]:
        """The concrete shape for the given dim values."""
        return tuple(d if isinstance(d, int) else d.factor * dims[d.name] for d in self.shape)

    def nbytes(self, dims: dict[str, int]) -> int:
        return int(np.prod(self.resolve(dims))) * np.dtype(self.dtype).itemsize

    def dynamic_axes(self) -> dict[int, str]:
        """ONNX dynamic axes: axis -> symbolic name (factor folded into the name)."""
        return {
            i: d.name if d.factor == 1 else f"{d.name}*{d.factor}"
            for i, d in enumerate(self.shape)
            if isinstance(d, Sym)
        }


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}")

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes() for t in self.inputs + self.outputs if t.dynamic_axes()}

    def profile(self, ranges: dict[str, "DimRange"]) -> dict[str, tuple[tuple, tuple, tuple]]:
        """Input name -> (min, opt, max) shapes, as a TensorRT optimization profile wants them."""
        lo = {k: r.min for k, r in ranges.items()}
        opt = {k: r.opt for k, r in ranges.items()}
        hi = {k: r.max for k, r in ranges.items()}
        return {t.name: (t.resolve(lo), t.resolve(opt), t.resolve(hi)) for t in self.inputs}


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"need 1 <= min <= opt <= max, got {self}")

    def to_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclass(frozen=True)
class ModelFacts:
    """What the specs need to know about a model."""

    latent_channels: int  # 4 for SD 1.x / 2.x
    text_length: int  # 77 tokens
    text_width: int  # 768 (CLIP-L, SD 1.x), 1024 (OpenCLIP-H, SD 2.x), 2048 (SDXL: CLIP-L's and OpenCLIP-G's)
    vae_scale: int = VAE_SCALE  # image side / latent side
    # The text encoder's layers (12 CLIP-L, 23 OpenCLIP-H as SD 2.x runs it). With it the text
    # encoder takes `clip_skip` and `token_weights`; 0: engines from before those inputs, which
    # return the last layer's hidden states only, unweighted.
    text_layers: int = 0
    # With it the U-Net step takes text of any number of 77-token chunks (dim `text_chunks`):
    # prompts longer than 75 tokens, encoded chunk by chunk as AUTOMATIC1111 does (tokenizer.py).
    # False: engines from before it, whose U-Net step takes one chunk.
    long_prompts: bool = False
    # With it the U-Net step takes `mask` and `image_latents` (inpainting, below). False: engines
    # from before it, which draw without masks.
    masks: bool = False
    # The U-Net is an inpainting one (SD 1.5 / 2.0 inpainting and their fine-tunes): it takes the
    # mask and the masked image's latents beside the latents, 2 * latent_channels + 1 channels.
    inpainting: bool = False
    # ControlNets run inside the U-Net step: it then takes their control images and each step's
    # scales (ldm-export --controlnet).
    controlnets: int = 0
    # With it the U-Net step also takes `state2`, the x0 of two steps back, and a coefficient row
    # of len(COLUMNS) (UniPC's corrector). False: engines from before it (rows of 9, no state2).
    history: bool = False
    # SDXL: the width of the second text encoder's pooled projection (1280), which the text
    # encoder also returns and the U-Net step takes with six size numbers (`time_ids`: original
    # height and width, crop top and left, target height and width). 0: SD 1.x / 2.x.
    pooled_width: int = 0
    # An SDXL refiner: its U-Net takes an aesthetic score after four sizes (original height and
    # width, crop top and left), and the unconditional half its own (the negative score), so
    # time_ids are (cfg, batch, 5) rather than (batch, 6).
    aesthetic: bool = False


def component_specs(facts: ModelFacts) -> dict[str, ComponentSpec]:
    """The four components. Dims: cfg (2 with classifier-free guidance: [uncond, cond];
    1 without), batch (images), latent_height / latent_width (image size / vae_scale),
    text_chunks (77-token chunks of text the U-Net step attends to; the text encoder runs once a chunk).

    Text tensors carry cfg and batch as two axes rather than one (cfg * batch) axis: every
    exporter (ONNX, torch.export) can then express the shapes without a division."""
    c, L, D = facts.latent_channels, facts.text_length, facts.text_width
    text = Sym("text_chunks", L) if facts.long_prompts else L  # (n * 77) tokens
    k, b = Sym("cfg"), Sym("batch")
    lh, lw = Sym("latent_height"), Sym("latent_width")
    ih, iw = Sym("latent_height", facts.vae_scale), Sym("latent_width", facts.vae_scale)
    latents = (b, c, lh, lw)

    def f32(name, shape):
        return TensorSpec(name, "float32", shape)

    return {
        # clip_skip: layers skipped from the last (diffusers' clip_skip; 0: none), 0..text_layers - 1.
        # token_weights: each token's emphasis (1: none; engine/prompt_weights.py).
        "text_encoder": ComponentSpec(
            "text_encoder",
            inputs=(TensorSpec("input_ids", "int64", (k, b, L)),
                    *([TensorSpec("clip_skip", "int64", (1,)), f32("token_weights", (k, b, L))]
                      if facts.text_layers else [])),
            outputs=(f32("text_embeddings", (k, b, L, D)),
                     *([f32("pooled_embeddings", (k, b, facts.pooled_width))] if facts.pooled_width else [])),
        ),
        # One denoising step: CFG batching, U-Net, guidance, x0 conversion, sampler update.
        # Inpainting (facts.masks), as diffusers' StableDiffusionInpaintPipeline: mask is 1 where
        # the image is redrawn. An inpainting U-Net takes [mask, image_latents] (the masked
        # image's latents) beside the latents; any other U-Net's step ends by putting the known
        # part back, (1 - mask) * image_latents + mask * latents_out, image_latents being the
        # image's latents noised to the next step's level. Without a mask: mask 1, which keeps
        # latents_out bit for bit.
        "unet_step": ComponentSpec(
            "unet_step",
            inputs=(
                f32("latents", latents),
                f32("text_embeddings", (k, b, text, D)),
                f32("coeffs", (len(COLUMNS) if facts.history else len(COLUMNS) - 1,)),
                f32("state", latents),
                f32("noise", latents),
                *([f32("state2", latents)] if facts.history else []),
                *([f32("mask", (b, 1, lh, lw)), f32("image_latents", latents)] if facts.masks else []),
                # SDXL: the first chunk's pooled text and each image's six size numbers
                *([f32("pooled_embeddings", (k, b, facts.pooled_width)),
                   f32("time_ids", (k, b, 5) if facts.aesthetic else (b, 6))] if facts.pooled_width else []),
                # ControlNets: each one's image in [0, 1] and its scale at this step (0: off)
                *([f32("control_images", (facts.controlnets, b, 3, ih, iw)),
                   f32("control_scales", (facts.controlnets,))] if facts.controlnets else []),
            ),
            outputs=(f32("latents_out", latents), f32("state_out", latents)),
        ),
        # Latents (unscaled, as the sampler ends) -> images in [0, 1].
        "vae_decoder": ComponentSpec(
            "vae_decoder",
            inputs=(f32("latents", latents),),
            outputs=(f32("images", (b, 3, ih, iw)),),
        ),
        # Images in [-1, 1] -> the sampler's start: image_scale * z + noise_scale * noise,
        # with z = scaling_factor * (mean + std * sample_noise).
        "vae_encoder": ComponentSpec(
            "vae_encoder",
            inputs=(
                f32("images", (b, 3, ih, iw)),
                f32("sample_noise", latents),
                f32("start_noise", latents),
                f32("start_coeffs", (2,)),
            ),
            outputs=(f32("latents", latents),),
        ),
    }
