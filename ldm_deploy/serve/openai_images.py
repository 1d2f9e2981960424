"""OpenAI's image API (`POST /v1/images/generations`, `POST /v1/images/edits`), for the clients and
gateways that speak it: a prompt, `n`, `size` "WIDTHxHEIGHT", images back as `b64_json`. An edit
sends an image and a mask (multipart/form-data, as OpenAI's API takes them) whose fully
transparent pixels are redrawn (no mask: the image's own transparent pixels): inpainting.

Besides OpenAI's fields, the ones that make a diffusion image repeatable are taken too (as other
servers of this API take them): `negative_prompt`, `seed`, `steps`, `guidance`, `sampler`.
`model` names one of the engines served (GET /v1/models), or none: the default; `quality`, `style` and `user` are accepted
and change nothing; `response_format` "url" is refused (no image is kept to link to).
"""

from __future__ import annotations

import re
import time

from ldm_deploy.engine import images
from ldm_deploy.engine.noise import random_seed
from ldm_deploy.errors import InvalidRequest
from ldm_deploy.serve import fields
from ldm_deploy.serve.a1111 import admit, png_base64, run
from ldm_deploy.serve.form import numbers
from ldm_deploy.serve.server import Route

KNOWN = {"prompt", "n", "size", "response_format", "model", "quality", "style", "user", "negative_prompt", "seed",
         "steps", "guidance", "sampler"}
# gpt-image-1's fields (background, output_format png, ...): accepted, changing nothing
KNOWN_EDIT = KNOWN | {"image", "mask", "strength", "background", "output_format", "output_compression",
                      "input_fidelity"}
FILES = ("image", "mask")
NUMBERS = {"n": int, "seed": int, "steps": int, "guidance": float, "strength": float}  # form fields are text


def error_body(status: int, message: str, kind: str | None = None) -> dict:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                      "param": None, "code": kind}}


class OpenAIImages:
    def __init__(self, worker):
        self.worker = worker
        self.engines = worker.engines

    def routes(self) -> dict:
        names = {"num_images": "n"}  # Pipeline keywords -> its fields, in mistakes' messages
        return {("POST", "/v1/images/generations"): Route(self.generations, error_body, body=True, invalid=400,
                                                          names=names),
                ("POST", "/v1/images/edits"): Route(self.edits, error_body, form=FILES, invalid=400, names=names),
                ("GET", "/v1/models"): Route(self.models, error_body, invalid=400)}

    def models(self, _):
        return 200, {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "ldm-deploy"}
                                                for name in self.engines.names]}

    def generations(self, body: dict):
        admit(self.worker)
        engine, options = self.options(body, KNOWN, None)
        return self.draw(options, engine)

    def edits(self, form: dict):
        """An image and its mask (form fields, files) redrawn where the mask is transparent; the
        image's size (rounded down to the engine's grid, as the Pipeline takes it) unless `size`."""
        admit(self.worker)
        files = sorted(k for k, v in form.items() if isinstance(v, bytes) and k not in FILES)
        if files:
            raise InvalidRequest(f"{files[0][:40]!r} is sent as a file; only image and mask are files")
        if "image" not in form:
            raise InvalidRequest("image: send the image to edit as a file field of the form")
        if form.get("output_format", "png") != "png":
            raise InvalidRequest("output_format: only \"png\" is offered (its text chunk holds the parameters)")
        form = numbers(form, NUMBERS)
        engine, options = self.options(form, KNOWN_EDIT, edit=True)  # before any image is decoded
        image = fields.image_file(form["image"], "image")
        mask = fields.image_file(form["mask"], "mask") if "mask" in form else None
        redraw = transparent(mask if mask is not None else image, "mask" if mask is not None else "image")
        if redraw.size != image.size:
            raise InvalidRequest(f"the mask is {redraw.size[0]}x{redraw.size[1]}, the image "
                                 f"{image.size[0]}x{image.size[1]}: give them the same size")
        options.update(init_image=image if image.mode == "RGBA" else images.to_rgb(image, "image"), mask=redraw)
        if "strength" in form:
            options["strength"] = fields.number(form, "strength", 1.0)
        return self.draw(options, engine)

    def options(self, body: dict, known: set, edit: bool = False) -> tuple[str, dict]:
        """-> (the engine, Pipeline keywords) of a request's fields; an edit's size is its image's
        unless given (width and height None)."""
        unknown = sorted(set(body) - known)
        if unknown:
            raise InvalidRequest(f"unknown field {unknown[0]!r}; this endpoint takes {', '.join(sorted(known))}")
        prompt = fields.text(body, "prompt")
        if not prompt:
            raise InvalidRequest("prompt: say what to draw")
        engine = self.engines.find(body.get("model"))
        if body.get("response_format", "b64_json") != "b64_json":
            raise InvalidRequest("response_format: only \"b64_json\" is offered (no image is kept to link to)")
        width, height = (None, None) if edit else self.engines.default_size(engine)
        given = body.get("size")
        if given not in (None, "auto"):
            match = re.fullmatch(r"([0-9]{1,6})x([0-9]{1,6})", str(given))
            if not match:
                raise InvalidRequest(f"size must be \"WIDTHxHEIGHT\" (e.g. \"512x512\"), got {str(given)[:40]!r}")
            width, height = int(match.group(1)), int(match.group(2))
        sampler = body.get("sampler") or "dpmpp_2m_karras"
        if not isinstance(sampler, str) or len(sampler) > 40:
            raise InvalidRequest(f"sampler must be one of ours by name (GET /sdapi/v1/samplers), got "
                                 f"{str(sampler)[:40]!r}")
        seed = fields.integer(body, "seed", -1)
        n = fields.integer(body, "n", 1)
        if n < 1:
            raise InvalidRequest(f"n must be at least 1, got {n}")
        return engine, {"prompt": prompt, "negative_prompt": fields.text(body, "negative_prompt") or None,
                        "steps": fields.integer(body, "steps", 30), "guidance": fields.number(body, "guidance", 7.5),
                        "seed": random_seed() if seed == -1 else seed, "num_images": n, "width": width,
                        "height": height, "sampler": sampler,
                        "prompt_weighting": True,
                        "clip_skip": 0}  # as AUTOMATIC1111's requests have it, so that the two may share a call

    def draw(self, options: dict, engine: str):
        images = run(self.worker, options, engine)
        return 200, {"created": int(time.time()), "data": [{"b64_json": png_base64(im)} for im in images]}


def transparent(image, what: str):
    """-> an "L" mask, white where `image` is fully transparent (what OpenAI's API redraws): its
    alpha, or the colour a PNG's tRNS chunk makes transparent."""
    if "transparency" in image.info and image.mode not in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
    if image.mode not in ("RGBA", "LA", "PA"):
        raise InvalidRequest(f"the {what} has no transparency: OpenAI's edit API redraws the mask's fully "
                             "transparent pixels (with no mask, the image's); send a PNG with an alpha channel")
    return image.getchannel("A").point(lambda a: 255 if a == 0 else 0)
