"""A generation request, checked in one place against the engine's ranges."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ldm_deploy.engine import images
from ldm_deploy.engine.manifest import Manifest
from ldm_deploy.engine.samplers import SAMPLERS, plan
from ldm_deploy.engine.samplers.update import C_PP
from ldm_deploy.errors import InvalidRequest


@dataclass(frozen=True)
class Request:
    prompts: tuple[str, ...]  # one per image
    negative_prompts: tuple[str, ...]  # one per image
    seeds: tuple[int, ...]  # one per image (image i of a call gets seed + i)
    steps: int
    guidance: float
    sampler: str
    width: int
    height: int
    strength: float  # 1.0 for txt2img
    clip_skip: int = 0  # text encoder layers skipped (diffusers' clip_skip)
    prompt_weighting: bool = False  # read AUTOMATIC1111's (emphasis:1.2) and [prompt:editing:0.5] in prompts
    # No negative prompt was given and the model draws "none" from zero embeddings (SDXL base,
    # diffusers' force_zeros_for_empty_prompt); negative_prompts are then ""
    zero_negative: bool = False
    # Prompt editing's step count (0: steps) and, in the hires fix's second pass, the first
    # pass's U-Net evaluations (its steps times its sampler's evaluations a step: Heun 2;
    # prompt_schedule.py); the hires pass runs the last edit_steps of `steps`.
    edit_steps: int = 0
    first_pass_steps: int | None = None
    # An SDXL refiner's aesthetic conditioning (diffusers' defaults; AUTOMATIC1111's "SDXL low /
    # high aesthetic score" settings)
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    # SDXL's ensemble of expert denoisers (samplers.plan): the part of the walk this call runs
    denoising_start: float | None = None
    denoising_end: float | None = None
    # A refiner's call: the steps the base drew before it, which prompt editing counts on from
    # (None: those of the whole walk before denoising_start)
    first_step: int | None = None
    # AUTOMATIC1111's "Masked content" (inpaint.MASKED_CONTENT)
    masked_content: str = "original"
    # AUTOMATIC1111's variation seeds (noise.vary): each image's start noise slerped toward its
    # variation seed's by variation_strength (0: none, and no variation seeds), and / or its seed's
    # drawn at seed_resize_from (width, height) and pasted into the middle
    variation_seeds: tuple[int, ...] = ()
    variation_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None
    # AUTOMATIC1111's "Noise multiplier for img2img": the start noise added to the image, scaled
    noise_multiplier: float = 1.0

    @property
    def batch(self) -> int:
        return len(self.prompts)

    def variation(self, i: int | None = None) -> dict:
        """The Pipeline keywords that vary the noise of its images (i: of image i alone) as this
        request's is varied: for the calls it makes (the hires fix's second pass, a refiner)."""
        seeds = self.variation_seeds if i is None else self.variation_seeds[i:i + 1]
        return {"variation_seed": list(seeds) or None, "variation_strength": self.variation_strength,
                "seed_resize_from": self.seed_resize_from}

    @property
    def guided(self) -> bool:
        """diffusers' rule: guidance <= 1 runs only the conditional half."""
        return self.guidance > 1.0


def check_history(manifest: Manifest, sampler: str, steps: int, strength: float) -> None:
    """Engines without state2 (from before UniPC) run what needs no x0 of two steps back."""
    if manifest.model.history:
        return
    rows = plan(sampler, manifest.model.noise_schedule, steps, 1.0, strength).rows
    if np.any(rows[:, C_PP] != 0):
        raise InvalidRequest(f"the {sampler} sampler needs an engine whose U-Net step keeps two steps' x0 "
                             "(exported since UniPC); re-export it with ldm-export --force")


def check_request(r: Request, manifest: Manifest, img2img: bool) -> None:
    """Raise InvalidRequest with the fix for anything the engine or sampler cannot do."""
    if r.sampler not in SAMPLERS:
        raise InvalidRequest(f"unknown sampler {r.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if r.steps < 1:
        raise InvalidRequest(f"steps must be at least 1, got {r.steps}")
    if not 0 <= r.guidance < float("inf"):  # also catches NaN
        raise InvalidRequest(f"guidance must be a finite number, 0 or more, got {r.guidance} "
                             "(values <= 1 disable it)")
    if img2img and not 0.0 < r.strength <= 1.0:
        raise InvalidRequest(f"strength must lie in (0, 1], got {r.strength}")
    if r.batch < 1:
        raise InvalidRequest("num_images must be at least 1")
    layers = manifest.model.text_layers
    if r.clip_skip < 0:
        raise InvalidRequest(f"clip_skip counts the text encoder layers skipped, as diffusers does (0: none; "
                             f"1: the penultimate layer's output, or for SDXL the one below), got {r.clip_skip}")
    if r.clip_skip and not layers:
        raise InvalidRequest("this engine's text encoder returns its last layer only (it was exported "
                             "before clip skip); re-export it with ldm-export --force to use clip_skip")
    if r.clip_skip >= max(layers, 1):
        raise InvalidRequest(f"clip_skip must be from 0 to {layers - 1} (this text encoder has {layers} "
                             f"layers), got {r.clip_skip}")
    check_size(manifest, r.width, r.height)


def check_size(manifest: Manifest, width: int | None, height: int | None) -> None:
    """Image sides against the engine's range and grid (None: not given, not checked)."""
    for name, value, dim in (("width", width, "latent_width"), ("height", height, "latent_height")):
        if value is None:
            continue
        rng = manifest.dims[dim]
        lo, hi = rng.min * manifest.model.vae_scale, rng.max * manifest.model.vae_scale
        step = manifest.size_multiple
        if value % step:
            raise InvalidRequest(
                f"{name} {value} is not a multiple of {step}, as this engine needs; try {max(value - value % step, step)}"
            )
        if not lo <= value <= hi:
            raise InvalidRequest(
                f"{name} {value} is outside this engine's range [{lo}, {hi}]; choose a size in range, "
                "or export the engine again with --min-size / --max-size (ldm-export, or ldm-run / ldm-serve --model)"
            )


def noise_multiplier_of(value) -> float:
    """AUTOMATIC1111's img2img noise multiplier, checked: a number in (0, 10] (its slider: 0.5 to 1.5)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or not 0 < value <= 10:
        raise InvalidRequest(f"noise_multiplier scales the noise added to an img2img image (AUTOMATIC1111's \"Noise "
                             f"multiplier for img2img\", 0.5 to 1.5 there; 1: none), got {value!r}")
    return float(value)


def plain_inputs(prompt, negative_prompt, steps, guidance, num_images, width, height, latents, output_type,
                 progress) -> tuple:
    """Pipeline.__call__'s plain inputs, checked as diffusers users pass them -> (prompts,
    negative prompts (None: ""), steps, guidance, width, height, latents as numpy); an
    InvalidRequest naming the first that is wrong."""
    if not (isinstance(progress, (bool, np.bool_)) or callable(progress)):
        raise InvalidRequest(f"progress must be True, False or a function of (steps done, steps), got {progress!r}")
    prompts = texts("prompt", prompt)
    negs = texts("negative_prompt", "" if negative_prompt is None else negative_prompt, len(prompts))
    if output_type not in ("pil", "np", "latent"):
        raise InvalidRequest(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise InvalidRequest(f"num_images must be a whole number of at least 1, got {num_images!r}")
    width = None if width is None else whole("width", width, None)
    height = None if height is None else whole("height", height, None)
    return (prompts, negs, whole("steps", steps, None), real("guidance", guidance), width, height,
            None if latents is None else latent_array(latents))


def texts(name: str, value, n: int | None = None) -> list[str]:
    """A prompt, or a list of them, as a list (n: one text for n, or a list of n); an
    InvalidRequest for other types and for text that is not Unicode (a command line's bytes
    that are not UTF-8 arrive as lone surrogates)."""
    if isinstance(value, str):
        out = [value] * (n or 1)
    elif isinstance(value, (list, tuple)) and value:
        out = list(value)
        if n is not None and len(out) != n:
            raise InvalidRequest(f"{len(out)} {name.replace('_', ' ')}s for {n} prompts; give one, or one per "
                                 "prompt")
    else:
        raise InvalidRequest(f"{name} must be text or a list of texts, got {type(value).__name__}")
    for i, text in enumerate(out):
        where = name if len(out) == 1 and isinstance(value, str) else f"{name}[{i}]"
        if not isinstance(text, str):
            raise InvalidRequest(f"{where} must be text, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(f"{where} is not valid text: it holds bytes that are not UTF-8 (a file in "
                                 "another encoding?); convert it to UTF-8") from None
    return out


def latent_array(value) -> np.ndarray:
    """`latents=` as float32 numpy: an array, nested lists, or a torch tensor (as diffusers takes them)."""
    if hasattr(value, "detach"):  # torch.Tensor (not imported: the runtime has no torch)
        value = value.detach().cpu().float().numpy()
    try:
        out = np.asarray(value, np.float32)
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"latents must be an array of numbers (B, C, H/8, W/8), got {type(value).__name__} "
                             f"({e})") from None
    if out.ndim != 4 or not np.isfinite(out).all():
        raise InvalidRequest(f"latents must be a 4-dimensional (B, C, H/8, W/8) array of finite numbers, got shape "
                             f"{out.shape}")
    return out


def real(name: str, value) -> float:
    """value as a float; an InvalidRequest for what is not a number (text, None, True)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidRequest(f"{name} must be a number, got {value!r}")
    return float(value)


def whole(name: str, value, default) -> int:
    """value as an int (default when None); an InvalidRequest for fractions and non-numbers."""
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or int(value) != value:
        raise InvalidRequest(f"{name} must be a whole number, got {value!r}")
    return int(value)


def check_init_size(manifest: Manifest, init, width: int | None, height: int | None, what: str = "init image") -> None:
    """An init image whose own size is out of the engine's range, with no size given to
    resize it to: say so in its terms, not as a width the user never passed."""
    m, dims = manifest.model, manifest.dims
    w, h = images.init_image_size(init, m.vae_scale)
    if isinstance(init, images.InitLatents):
        if init.array.shape[1] != m.latent_channels:
            raise InvalidRequest(f"init latents have {init.array.shape[1]} channels; this model's have "
                                 f"{m.latent_channels}")
        for name, given, value in (("width", width, w), ("height", height, h)):
            if given is not None and given != value:
                raise InvalidRequest(f"init latents of {init.size[0]}x{init.size[1]} make {w}x{h} images, "
                                     f"not {name} {given}: latents are not resized; leave width and height out")
        for name, value, dim in (("width", w, "latent_width"), ("height", h, "latent_height")):
            lo, hi = dims[dim].min * m.vae_scale, dims[dim].max * m.vae_scale
            if not lo <= value <= hi:
                raise InvalidRequest(f"init latents of {init.size[0]}x{init.size[1]} make {w}x{h} images, "
                                     f"and {name} {value} is outside this engine's range [{lo}, {hi}]")
        return
    for name, given, value, dim in (("width", width, w, "latent_width"),
                                    ("height", height, h, "latent_height")):
        lo, hi = dims[dim].min * m.vae_scale, dims[dim].max * m.vae_scale
        if given is None and not lo <= value <= hi:
            raise InvalidRequest(
                f"the {what} is {init.size[0]}x{init.size[1]}, and its {name} {value} is "
                f"outside this engine's range [{lo}, {hi}]; pass --width / --height (width= / "
                f"height=) in range to resize it, or resize the image")


def split(req: Request, latents, generator, max_batch: int, init=None):
    """Yield (request, latents, generator, init image) chunks of at most `max_batch` images (init
    latents of one per image: each chunk's)."""
    if req.batch <= max_batch:
        yield req, latents, generator, init
        return
    for lo in range(0, req.batch, max_batch):
        sl = slice(lo, lo + max_batch)
        sub = replace(req, prompts=req.prompts[sl], negative_prompts=req.negative_prompts[sl], seeds=req.seeds[sl],
                      variation_seeds=req.variation_seeds[sl])
        gen = generator[sl] if isinstance(generator, (list, tuple)) else generator
        sub_init = images.InitLatents(init.array[sl]) \
            if isinstance(init, images.InitLatents) and len(init.array) > 1 else init
        yield sub, None if latents is None else latents[sl], gen, sub_init
