"""Inpainting as diffusers' StableDiffusionInpaintPipeline does it: the checks, the start latents
and each step's mask inputs, and the crop of AUTOMATIC1111's "Only masked" (mask_crop.py).

The U-Net step takes `mask` and `image_latents` (spec.py): an inpainting U-Net beside its latents,
any other by putting the kept part back after each step.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from ldm_deploy.engine import images, noise
from ldm_deploy.engine import mask_crop as mask_crop_
from ldm_deploy.engine import resize_mode as resize_mode_
from ldm_deploy.engine.latent_resize import resize
from ldm_deploy.engine.request import whole
from ldm_deploy.errors import InvalidRequest

log = logging.getLogger(__name__)


def prepare(pipe, init_image, mask, mask_blur, resize_mode, mask_crop, width, height, hires_scale,
            output_type) -> tuple:
    """A call's init image and mask as given -> (init, mask, crop, width, height): read, the mask
    blurred, both fitted by the resize mode (resize_mode.py), checked, and with mask_crop cut to
    the box around the mask (crop: (pad, box, the original image, the original mask), else None;
    width and height the box's drawn size)."""
    m = pipe.manifest.model
    init = images.as_init_image(init_image)
    mask = images.as_mask(mask)
    if mask_blur is not None:
        mask = blur(mask, mask_blur)
    init, mask = resize_mode_.fit_request(resize_mode, init, mask, width, height, mask_crop, m.vae_scale, pipe.warned)
    check(m, init, mask, hires_scale)
    cut = None
    if mask_crop is not None:
        cut, init, mask, width, height = crop(init, mask, mask_crop, width, height, output_type, pipe.default_size)
    elif mask is not None and all_black(mask):  # (mask_crop refuses it)
        log.warning("the mask is all black (white marks what to redraw): %s", "the inpainting model draws the "
                    "image again from the whole of it, near it, not it" if m.inpainting else
                    "nothing is redrawn; the image comes back through the VAE")
    return init, mask, cut, width, height


def check(model, init, mask, hires_scale) -> None:
    """A mask needs an image (not latents), no hires fix, and an engine whose step takes one."""
    if mask is None:
        return
    if init is None:
        raise InvalidRequest("a mask needs the image it masks: pass init_image (ldm-run --init-image)")
    if isinstance(init, images.InitLatents):
        raise InvalidRequest("a mask needs an init image, not latents: pass the image itself")
    if hires_scale is not None:
        raise InvalidRequest("the hires fix draws a new image; it does not inpaint: leave out the mask "
                             "or hires_scale (--hires-scale)")
    if not model.masks:
        raise InvalidRequest("this engine's U-Net step takes no mask (it was exported before inpainting); "
                             "re-export it with ldm-export --force to inpaint")


def all_black(mask) -> bool:
    """Whether a mask (images.as_mask's) marks nothing to redraw."""
    return not images.mask_image(mask).convert("L").getbbox()


def blur(mask, radius) -> Image.Image:
    """The mask blurred by a Gaussian of `radius` px (PIL's GaussianBlur, as diffusers'
    mask_processor.blur and AUTOMATIC1111's "Mask blur" do it); an array mask as its image."""
    if mask is None:
        raise InvalidRequest("mask_blur blurs a mask: give the mask too")
    if isinstance(radius, bool) or not isinstance(radius, (int, float, np.integer, np.floating)) \
            or not 0 <= radius <= 10_000:
        raise InvalidRequest(f"mask_blur is a radius in pixels, from 0 to 10000; got {radius!r}")
    image = images.mask_image(mask)
    if image.mode in ("1", "P"):  # modes PIL cannot blur
        image = image.convert("L")
    return image.filter(ImageFilter.GaussianBlur(float(radius)))


# AUTOMATIC1111's "Masked content" choices (its API's inpainting_fill 1, 0, 2, 3)
MASKED_CONTENT = ("original", "fill", "latent noise", "latent nothing")


def masked_content(content: str, init, mask, width: int, height: int, strength: float, warned: set):
    """AUTOMATIC1111's "Masked content" checked -> the init image (with "fill": filled at the size
    drawn); "latent noise" / "latent nothing" act on its latents later (latent_fill). `warned`:
    the pipeline's warnings given once."""
    if content not in MASKED_CONTENT:
        raise InvalidRequest(f"masked_content must be one of {', '.join(MASKED_CONTENT)}, got {content!r}")
    if content != "original" and mask is None:
        raise InvalidRequest(f"masked_content \"{content}\" fills the masked part of an image: give the mask too")
    if content.startswith("latent") and strength >= 1 and "latent fill" not in warned:
        warned.add("latent fill")
        log.warning("masked content \"%s\" changes nothing at strength 1 (the start is noise anyway); give a "
                    "strength below 1, e.g. 0.75", content)
    return fill(init, mask, width, height) if content == "fill" else init


def fill(init: Image.Image, mask, width: int, height: int) -> Image.Image:
    """AUTOMATIC1111's masked content "fill": the image at the size drawn, the part to redraw
    painted with the colours around it, so that the drawing starts from them rather than from
    what was there. The kept pixels, premultiplied by a keep-alpha (the mask inverted, soft where
    it is blurred), are blurred at falling radii (colour times alpha over alpha: each pixel the mean
    colour of the kept pixels near it) and laid over each other, the finer on top where they reach;
    kept pixels stay as they are."""
    image = init.convert("RGB")
    keep = ImageOps.invert(images.mask_image(mask).convert("L"))
    if image.size != (width, height):  # as it will be drawn: the fill at that size, as AUTOMATIC1111's
        image = image.resize((width, height), resample=Image.LANCZOS)
    if keep.size != (width, height):
        keep = keep.resize((width, height), resample=Image.LANCZOS)
    image.putalpha(keep)
    premultiplied = image.convert("RGBa")
    canvas = Image.new("RGBA", (width, height))
    for radius, times in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = premultiplied.filter(ImageFilter.GaussianBlur(radius)) if radius else premultiplied
        layer = layer.convert("RGBA")
        for _ in range(times):
            canvas.alpha_composite(layer)
    return canvas.convert("RGB")


def crop(init, mask, pad, width, height, output_type, default_size):
    """mask_crop: ((pad, box, the image, the mask), the image and mask cut to the box and resized
    to width x height (default: the engine's size), width, height), as diffusers'
    padding_mask_crop makes them."""
    pad = whole("mask_crop", pad, None)
    if not 0 <= pad <= 100_000:
        raise InvalidRequest(f"mask_crop is the padding around the mask in pixels, 0 to 100000; got {pad}")
    if mask is None:
        raise InvalidRequest("mask_crop inpaints the area around a mask: give the mask too")
    mask = images.mask_image(mask)
    if output_type == "latent":
        raise InvalidRequest("mask_crop pastes the drawn area back into the image, which latents cannot "
                             "show: use output_type 'pil' or 'np'")
    if mask.size != init.size:
        raise InvalidRequest(f"the mask is {mask.size[0]}x{mask.size[1]} and the image {init.size[0]}x"
                             f"{init.size[1]}: mask_crop (--mask-crop) cuts both around the mask, so give a mask of "
                             "the image's size")
    if all_black(mask):
        raise InvalidRequest("the mask is all black: nothing to inpaint (white marks what to redraw)")
    width, height = whole("width", width, default_size[0]), whole("height", height, default_size[1])
    box = mask_crop_.crop_region(mask, width, height, pad)
    cut_image = mask_crop_.fill_resize(init.crop(box), width, height)
    cut_mask = mask_crop_.fill_resize(mask.crop(box), width, height).convert("L")
    return (pad, box, init, mask), cut_image, cut_mask, width, height


def start(be, model, encode_latents, init, mask, req, sp, generator, latents, shape, shared: dict):
    """Inpainting's start latents and each step's (mask, image_latents), as diffusers'
    StableDiffusionInpaintPipeline makes them, its noise drawn in its order: the image's VAE
    sample (not for an inpainting model at strength 1), the start noise, the masked image's
    VAE sample. A list of generators (our seeds) samples the image once per image, each with its
    own, so that each image of a batch is the one its seed draws alone (and its PNG draws again);
    diffusers samples it once for the batch with the first, which only image 0 matches. One
    generator for the batch samples it once, as diffusers; `shared` keeps those samples for the
    call's later chunks (past the engine's batch), which draw only their start noise. No mask:
    all of it is redrawn; no image: a blank one. latents: the start noise (at strength < 1 added
    to the image, as for img2img; diffusers' inpainting pipeline would start from them alone).
    encode_latents: (pixels, sample noise, repeat) -> the VAE's scaled latents."""
    b, c, h, w = shape
    given = isinstance(init, images.InitLatents)  # (a Latent hires pass): no image to mask
    pixels = (images.to_model_input(init, req.width, req.height) if init is not None and not given
              else np.zeros((1, 3, req.height, req.width), np.float32))  # (1, 3, H, W)
    redraw = (images.mask_to_model_input(mask, req.width, req.height) if mask is not None
              else np.ones((1, 1, req.height, req.width), np.float32))  # (1, 1, H, W): 1 redraws
    per_image = isinstance(generator, (list, tuple))
    rows = b if per_image else 1  # the image's samples: one per image, or one for the batch
    kept = {} if per_image else shared  # one generator's samples, kept for the later chunks
    if "masked" not in kept and given:
        kept["z"] = init.array
    sampled = not given and (not model.inpainting or req.strength < 1)  # the image's sample drawn
    if "masked" not in kept and sampled:
        kept["z"] = encode_latents(pixels, noise.draw(generator, (rows, c, h, w)), rows)
    z = np.repeat(kept["z"], b // len(kept["z"]), axis=0) if "z" in kept else None
    drawn = latents.astype(np.float32) if latents is not None else noise.draw(generator, shape)
    start_noise = drawn if latents is not None else noise.varied(drawn, req, generator)
    small = resize(redraw, h, w, "nearest")  # torch's interpolate, as diffusers shrinks it
    if z is not None and req.masked_content.startswith("latent"):
        z = latent_fill(z, small, req.masked_content, drawn)
    # (the kept part is put back with the noise unscaled: the multiplier is the start's alone)
    scaled = start_noise * np.float32(req.noise_multiplier)
    if req.strength == 1:
        x = scaled * np.float32(sp.init_noise_scale)
    else:
        x = np.float32(sp.image_scale) * z + np.float32(sp.noise_scale) * scaled
    if "masked" not in kept:  # a text-to-image U-Net never sees the masked image: only its draw is kept
        sample = noise.draw(generator, (rows, c, h, w))
        kept["masked"] = encode_latents(pixels * (redraw < 0.5), sample, rows) if model.inpainting else None
    masked = kept["masked"]
    mask_buffer = be.upload(np.repeat(small, b, axis=0))  # (B, 1, h, w)
    if model.inpainting:  # the masked image, beside the latents at every step
        known = [be.upload(np.repeat(masked, b // len(masked), axis=0))] * sp.steps
    else:  # the image where it is kept, noised to the level the next step starts from
        known = [be.upload(np.float32(a) * z + np.float32(s) * start_noise) for a, s in sp.known_levels()]
    return be.upload(x), [{"mask": mask_buffer, "image_latents": k} for k in known]


def latent_fill(z: np.ndarray, redraw: np.ndarray, content: str, drawn: np.ndarray) -> np.ndarray:
    """AUTOMATIC1111's masked content "latent noise" / "latent nothing": the image's latents z
    (B, C, h, w), where the latent-size mask `redraw` (1, 1, h, w) is 1, replaced by the start noise
    as drawn (before any variation: its create_random_tensors of the seeds draws no variation) or by
    zeros, before they are noised to the first step. With "latent noise" that is the noise then
    added, so the hole starts from it alone, louder than fresh noise, as in AUTOMATIC1111 (its fill
    and its start noise are one draw of the seed)."""
    fill = drawn if content == "latent noise" else np.zeros_like(z)
    return (z * (1 - redraw) + fill * redraw).astype(np.float32)
