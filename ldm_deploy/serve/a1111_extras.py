"""AUTOMATIC1111's Extras upscaling (`POST /sdapi/v1/extra-single-image`, `/extra-batch-images`):
an image enlarged by an upscaler, without drawing.

Its fields: `resize_mode` 0 enlarges by `upscaling_resize` (2), 1 to `upscaling_resize_w` x
`upscaling_resize_h` (512 x 512: by the larger of the two ratios, then, with `upscaling_crop`
(true), cropped to that size about the centre); `upscaler_1` ("None": the image as it is, made RGB
as AUTOMATIC1111 makes it) and
`upscaler_2`, blended over the first by `extras_upscaler_2_visibility`. The upscalers are Lanczos and
the upscale models exported into the engines (ldm-export --upscaler), found by name in any engine,
run as AUTOMATIC1111 runs them (engine/upscale.py). Face restoration (`gfpgan_visibility`,
`codeformer_visibility`) is not offered: refused where asked for. The answer's image carries
AUTOMATIC1111's "postprocessing" text ("Postprocess upscale by: 2.0, Postprocess upscaler: ...") and the
input's own generation parameters; `html_info` says the same. One request enlarges at a time (each
is a few CPU-seconds to minutes), and no image, enlarged or between passes, may pass
fields.MAX_PIXELS.
"""

from __future__ import annotations

import html
import threading
from pathlib import Path

from PIL import Image

from ldm_deploy.engine import hires, upscale
from ldm_deploy.errors import InvalidRequest
from ldm_deploy.serve import fields
from ldm_deploy.serve.server import HttpError

LANCZOS = "Lanczos"
MAX_SCALE = 8  # AUTOMATIC1111's slider's end
MAX_BATCH = 16  # images of one extra-batch-images request


class Extras:
    def __init__(self, engines):
        self.engines = engines
        self.models = {}  # (engine, name) -> upscale.Upscaler, loaded on first use
        self.lock = threading.Lock()
        self.running = threading.Lock()  # one enlargement at a time: each takes all the cores

    def single(self, body: dict):
        image = fields.picture(body.get("image"), "image")
        with self.running:
            out, info = self.process(image, body)
        return 200, {"html_info": html_info(info), "image": encode(out, info, image)}

    def batch(self, body: dict):
        items = body.get("imageList")
        if not isinstance(items, list) or not items or len(items) > MAX_BATCH:
            raise InvalidRequest(f"imageList must be a list of 1 to {MAX_BATCH} {{data, name}} images")
        done = []
        for i, item in enumerate(items):
            data = item.get("data") if isinstance(item, dict) else None
            image = fields.picture(data, f"imageList[{i}].data")
            with self.running:
                out, info = self.process(image, body)
            done.append(encode(out, info, image))
        return 200, {"html_info": html_info(info), "images": done}

    def process(self, image: Image.Image, body: dict) -> tuple[Image.Image, dict]:
        """(the image enlarged as the request says, AUTOMATIC1111's postprocessing fields)."""
        for key in ("gfpgan_visibility", "codeformer_visibility"):
            if fields.number(body, key, 0.0) != 0:
                raise InvalidRequest(f"{key}: face restoration (GFPGAN, CodeFormer) is not offered here; send 0")
        mode = fields.integer(body, "resize_mode", 0)
        names = [fields.text(body, k) or "None" for k in ("upscaler_1", "upscaler_2")]
        visibility = fields.number(body, "extras_upscaler_2_visibility", 0.0)
        if not 0 <= visibility <= 1:
            raise InvalidRequest(f"extras_upscaler_2_visibility must be in [0, 1], got {visibility}")
        rgb = image.convert("RGB")
        info = {}
        if mode == 1:
            to = tuple(fields.integer(body, k, 512) for k in ("upscaling_resize_w", "upscaling_resize_h"))
            if not all(0 < v <= 16384 for v in to):
                raise InvalidRequest(f"upscaling_resize_w and _h must be 1 to 16384 pixels, got {to[0]}x{to[1]}")
            scale = max(to[0] / rgb.width, to[1] / rgb.height)
            info["Postprocess upscale to"] = f"{to[0]}x{to[1]}"
            crop = fields.flag(body, "upscaling_crop", True)
        elif mode == 0:
            scale, to, crop = fields.number(body, "upscaling_resize", 2.0), None, False
            info["Postprocess upscale by"] = scale
        else:
            raise InvalidRequest(f"resize_mode must be 0 (scale by upscaling_resize) or 1 (to upscaling_resize_w x "
                                 f"upscaling_resize_h), got {mode}")
        if not 0 < scale <= MAX_SCALE:
            raise InvalidRequest(f"the image would be enlarged {scale:g} times; this server enlarges up to "
                                 f"{MAX_SCALE} times")
        found = [self.upscaler(name, which) for name, which in zip(names, ("upscaler_1", "upscaler_2"))]
        if found[0] is None:  # "None": as AUTOMATIC1111, nothing is done
            return rgb, {}
        used = [found[0], *([found[1]] if found[1] is not None and visibility > 0 else [])]
        check_size(rgb.size, scale, to if crop else None, [factor for _, _, factor in used])
        name, enlarge, _ = used[0]
        out = fit(enlarge(rgb, scale), to, crop, info)
        info["Postprocess upscaler"] = name
        if len(used) > 1:
            name, enlarge, _ = used[1]
            out = Image.blend(out, fit(enlarge(rgb, scale), to, crop, info), visibility)
            info["Postprocess upscaler 2"] = name
        return out, info

    def upscaler(self, name: str, field: str):
        """(its name as listed, a function (image, scale) -> image, the scale of one pass; None for
        Lanczos) for upscaler `name`; None for "None"."""
        if name == "None":
            return None
        if name.lower() == LANCZOS.lower():
            return LANCZOS, upscale.lanczos, None
        engine = next((e for e, m in self.engines.manifests.items() if name in m.upscalers), None)
        if engine is None:
            offered = {n for m in self.engines.manifests.values() for n in m.upscalers}
            raise InvalidRequest(f"{field} {name!r} is not offered; choose one of None, {LANCZOS}"
                                 + "".join(f", {n}" for n in sorted(offered))
                                 + ("" if offered else " (upscale models: ldm-export --upscaler FILE)"))
        with self.lock:
            pipe = self.engines.pipes.get(engine)
            if pipe is not None:  # loaded (its files checked): the session its hires fix runs, shared
                model = hires.upscale_model(pipe, name)
            else:
                if (engine, name) not in self.models:
                    manifest, folder = self.engines.manifests[engine], self.engines.dirs[engine]
                    check_file(folder, manifest, name)
                    self.models[engine, name] = upscale.Upscaler(folder, name, manifest.upscalers[name])
                model = self.models[engine, name]
        return name, lambda image, scale: upscale.upscale(image, scale, model), model.scale


def check_size(size: tuple[int, int], scale: float, crop: tuple[int, int] | None, factors: list) -> None:
    """A 422 where the result would have a side under 8 pixels (AUTOMATIC1111 cuts sides to 8s;
    there, a 500), or where it, or an image between a model's passes (factor: the model's scale;
    None for Lanczos), would be over fields.MAX_PIXELS."""
    dest = upscale.dest_size(size, scale)
    if min(dest) < 8:
        raise InvalidRequest(f"the {size[0]}x{size[1]} image enlarged {scale:g} times comes to {dest[0]}x{dest[1]} "
                             "(sides cut to multiples of 8); enlarge it more, to 8 pixels a side at least")
    largest = [dest, crop or dest]
    for factor in filter(None, factors):  # upscale.passes: a pass while the image is short of dest (at most 3)
        side = size
        for i in range(upscale.PASSES):
            if upscale.covers(side, dest, scale, i):
                break
            side = (side[0] * factor, side[1] * factor)
        largest.append(side)
    w, h = max(largest, key=lambda s: s[0] * s[1])
    if w * h > fields.MAX_PIXELS:
        raise InvalidRequest(f"the {size[0]}x{size[1]} image enlarged {scale:g} times comes to a {w}x{h} image "
                             f"on the way; this server makes none over {fields.MAX_PIXELS // 1_000_000} megapixels: "
                             "send a smaller image or scale")


def check_file(folder, manifest, name: str) -> None:
    """The upscaler's graph against the manifest's size and SHA-256 (its engine may not be loaded,
    so not checked yet); a 503 saying to re-export where it differs."""
    from ldm_deploy.engine.manifest import sha256_file
    from ldm_deploy.export.upscalers import COMPONENT

    for file, record in manifest.files.get(COMPONENT + name, {}).items():
        path = Path(folder) / file
        if not path.is_file() or path.stat().st_size != record["bytes"] or sha256_file(path) != record["sha256"]:
            raise HttpError(503, f"the upscale model {name}'s file {path} is missing or damaged; re-export its engine "
                                 "(ldm-export --force)", "EngineUnavailable")


def fit(image: Image.Image, to, crop: bool, info: dict) -> Image.Image:
    """Resize mode 1's crop: the enlarged image on a black canvas of the size asked, centred."""
    if to is None or not crop:
        return image
    canvas = Image.new("RGB", to)
    canvas.paste(image, (to[0] // 2 - image.width // 2, to[1] // 2 - image.height // 2))
    info["Postprocess crop to"] = f"{to[0]}x{to[1]}"
    return canvas


def infotext(info: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in info.items())


def html_info(info: dict) -> str:
    return f"<p>{html.escape(infotext(info))}</p>"


def encode(image: Image.Image, info: dict, source: Image.Image) -> str:
    """The base64 PNG of the answer: the source's generation parameters kept, its postprocessing added."""
    from ldm_deploy.serve.a1111 import png_base64

    image.info = {k: v for k, v in source.info.items() if k == "parameters" and isinstance(v, str)}
    if info:  # (AUTOMATIC1111 replaces an earlier postprocessing text; with "None", by an empty one: dropped here)
        image.info["postprocessing"] = infotext(info)
    return png_base64(image)
