"""diffusers' keywords for Pipeline.__call__'s settings, taken as ours by callers moving from its
StableDiffusion(Img2Img|Inpaint|ControlNet)Pipeline."""

from __future__ import annotations

import functools
import inspect

from ldm_deploy.errors import InvalidRequest

# diffusers' keyword -> ours
NAMES = {"num_inference_steps": "steps", "guidance_scale": "guidance",
         "num_images_per_prompt": "num_images", "image": "init_image", "mask_image": "mask",
         "padding_mask_crop": "mask_crop", "controlnet_conditioning_scale": "control_scale",
         "control_guidance_start": "control_start", "control_guidance_end": "control_end"}


def take(ours: dict, theirs: dict, call) -> tuple:
    """The values of our keywords in `ours` (as `call`, Pipeline.__call__, got them), with those
    diffusers' names in `theirs` give taken in, in ours' order: a TypeError for a keyword neither
    takes (as Python's own), an InvalidRequest where both name one setting (ours given: not its
    default)."""
    if not theirs:  # (the usual call: nothing to take)
        return tuple(ours.values())
    defaults = inspect.signature(call).parameters
    for name in theirs:
        key = NAMES.get(name)
        if key is None:
            raise TypeError(f"Pipeline.__call__() got an unexpected keyword argument {name!r}")
        default = defaults[key].default
        if not (ours[key] is default or default is not None and ours[key] == default):
            raise InvalidRequest(f"{name} and {key} name the same setting; pass one")
    their_name = {key: name for name, key in NAMES.items()}
    return tuple(theirs.get(their_name[key], value) for key, value in ours.items())


class Images(list):
    """The PIL images a call returns, also as diffusers' output holds them (`.images`; no safety
    checker runs here, so `.nsfw_content_detected` is None)."""

    nsfw_content_detected = None

    @property
    def images(self) -> "Images":
        return self


def returns(call):
    """diffusers' return conventions around Pipeline.__call__: `.images` on its list of PIL
    images, return_dict=False's (images, None) tuple, and its eta, which only DDIM reads: 0
    (diffusers' default) is DDIM here."""
    @functools.wraps(call)  # (inspect.signature, take()'s, follows it to the call's own)
    def wrapper(self, *args, return_dict: bool = True, eta: float = 0.0, **kwargs):
        if eta:
            raise InvalidRequest(f"eta {eta}: DDIM runs with eta 0 here; for fresh noise at each step take an "
                                 "ancestral sampler (sampler='ddpm' or 'euler_a')")
        out = call(self, *args, **kwargs)
        out = Images(out) if isinstance(out, list) else out
        return out if return_dict else (out, None)
    return wrapper
