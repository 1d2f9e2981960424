"""diffusers' keywords for Pipeline.__call__'s settings, taken as ours by callers moving from its
StableDiffusion(Img2Img|Inpaint|ControlNet)Pipeline."""

from __future__ import annotations

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
