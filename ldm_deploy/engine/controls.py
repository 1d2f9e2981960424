"""A call's ControlNet settings, for engines exported with ControlNets (export/controlnet.py):
each one's control image, scale and the part of the steps it acts in, as diffusers'
StableDiffusionControlNet(Img2Img)Pipeline takes them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ldm_deploy.engine import images
from ldm_deploy.errors import InvalidRequest


@dataclass(frozen=True)
class Control:
    pictures: tuple  # one per ControlNet: an RGB PIL image, or None (off for this call)
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]

    @classmethod
    def of(cls, image, scale, start, end, count: int, settings_given: bool = False) -> "Control":
        """Checked settings for an engine of `count` ControlNets; settings_given: the call set a
        scale, start or end, which without a control image would silently do nothing."""
        if count == 0 and (image is not None or settings_given):
            raise InvalidRequest("this engine has no ControlNet; export one into it with ldm-export "
                                 "--controlnet DIR (ldm-run --model: add --controlnet DIR) to use control images"
                                 + (" and their settings" if settings_given else ""))
        if image is None and settings_given:
            raise InvalidRequest("control_scale, control_start and control_end (--control-scale, --control-start, "
                                 "--control-end; diffusers' controlnet_conditioning_"
                                 "scale, control_guidance_start / _end) set how ControlNets steer, but no control "
                                 "image is given: pass control_image= (ldm-run --control-image; diffusers' ControlNet "
                                 "txt2img pipeline calls it image=, which here is the init image)")
        if count == 0:
            return cls((), (), (), ())
        if image is None or not isinstance(image, (list, tuple)):
            if count > 1 and image is not None:
                raise InvalidRequest(f"this engine has {count} ControlNets: give a list of {count} control "
                                     "images (None for one that is off)")
            image = [image] * count if image is None else [image]
        if len(image) != count:
            raise InvalidRequest(f"{len(image)} control images for this engine's {count} ControlNets")
        pictures = tuple(None if im is None else as_picture(im) for im in image)
        scales, starts, ends = (per_net(name, value, count) for name, value in
                                (("control_scale", scale), ("control_start", start), ("control_end", end)))
        for s, e in zip(starts, ends):
            if not 0 <= s < e <= 1:
                raise InvalidRequest(f"control_start and control_end are fractions of the steps with 0 <= start "
                                     f"< end <= 1; got {s} and {e}")
        return cls(pictures, scales, starts, ends)

    @property
    def first_image(self):
        return next((p for p in self.pictures if p is not None), None)

    def cropped(self, box, image_size: tuple[int, int], width: int, height: int) -> "Control":
        """Each image cut to the inpainting box and resized into width x height as the init image
        is (mask_crop; diffusers' ControlNet inpainting with padding_mask_crop)."""
        from ldm_deploy.engine import mask_crop

        for picture in self.pictures:
            if picture is not None and picture.size != image_size:
                raise InvalidRequest(f"the control image is {picture.size[0]}x{picture.size[1]} and the image "
                                     f"{image_size[0]}x{image_size[1]}: mask_crop needs them the same size")
        cut = tuple(None if p is None else mask_crop.fill_resize(p.crop(box), width, height) for p in self.pictures)
        return Control(cut, self.scales, self.starts, self.ends)

    def inputs(self, batch: int, width: int, height: int, rows: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """(N, B, 3, H, W) control images in [0, 1] (zeros where off), resized as diffusers'
        control image processor resizes them (Lanczos), and each of the `rows` U-Net calls' (N,)
        scales: the scale while the call lies in [start, end] of the steps, as diffusers'
        controlnet_keep counts them, else 0 (and 0 where a ControlNet has no image)."""
        out = np.zeros((len(self.pictures), batch, 3, height, width), np.float32)
        for i, picture in enumerate(self.pictures):
            if picture is not None:  # resized in its own mode, then made RGB, as diffusers does
                if picture.size != (width, height):
                    picture = picture.resize((width, height), resample=Image.LANCZOS)
                out[i] = (np.asarray(picture.convert("RGB"), np.float32) / 255.0).transpose(2, 0, 1)
        scales = []
        for r in range(rows):
            keep = [0.0 if r / rows < s or (r + 1) / rows > e else 1.0 for s, e in zip(self.starts, self.ends)]
            scales.append(np.array([0.0 if p is None else w * k for p, w, k in zip(self.pictures, self.scales, keep)],
                                   np.float32))
        return out, scales

    def fields(self, records) -> dict:
        """AUTOMATIC1111's ControlNet extension's PNG fields, one per ControlNet given an image."""
        out = {}
        for i, (picture, record) in enumerate(zip(self.pictures, records)):
            if picture is not None:
                model = record.get("a1111_name", record["name"])  # (the extension's "name [hash]"; older engines: none)
                out[f"ControlNet {i}"] = (f'"Module: none, Model: {model}, Weight: {self.scales[i]}, '
                                          f'Guidance Start: {self.starts[i]}, Guidance End: {self.ends[i]}"')
        return out


def as_picture(value) -> Image.Image:
    """A control image: a path or PIL image (kept in its mode until resized), or an (H, W, 3) /
    (H, W) array (as RGB)."""
    if isinstance(value, (str, images.Path, Image.Image)):
        return images.as_picture(value, "control image")
    if images.is_image_array(value):
        return images.array_to_rgb(value, "the control image array")
    what = f"an array of shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
    raise InvalidRequest(f"a control image must be a path, a PIL image or an (H, W, 3) array; got {what}")


def per_net(name: str, value, count: int) -> tuple[float, ...]:
    """A number, or a list of one per ControlNet, as floats."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise InvalidRequest(f"{name}: {len(values)} values for this engine's {count} ControlNets")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise InvalidRequest(f"{name} must be a finite number (or a list of them), got {v!r}")
    return tuple(float(v) for v in values)
