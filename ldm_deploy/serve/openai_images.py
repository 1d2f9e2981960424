"""OpenAI's image generation API (`POST /v1/images/generations`), for the clients and gateways
that speak it: a prompt, `n`, `size` "WIDTHxHEIGHT", images back as `b64_json`.

Besides OpenAI's fields, the ones that make a diffusion image repeatable are taken too (as other
servers of this API take them): `negative_prompt`, `seed`, `steps`, `guidance`, `sampler`.
`model` names one of the engines served (GET /v1/models), or none: the default; `quality`, `style` and `user` are accepted
and change nothing; `response_format` "url" is refused (no image is kept to link to).
"""

from __future__ import annotations

import re
import time

from ldm_deploy.engine.noise import random_seed
from ldm_deploy.errors import InvalidRequest
from ldm_deploy.serve import fields
from ldm_deploy.serve.a1111 import admit, png_base64, run
from ldm_deploy.serve.server import Route

KNOWN = {"prompt", "n", "size", "response_format", "model", "quality", "style", "user", "negative_prompt", "seed",
         "steps", "guidance", "sampler"}


def error_body(status: int, message: str, kind: str | None = None) -> dict:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                      "param": None, "code": kind}}


class OpenAIImages:
    def __init__(self, worker):
        self.worker = worker
        self.engines = worker.engines

    def routes(self) -> dict:
        return {("POST", "/v1/images/generations"): Route(self.generations, error_body, body=True, invalid=400),
                ("GET", "/v1/models"): Route(self.models, error_body, invalid=400)}

    def models(self, _):
        return 200, {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "ldm-deploy"}
                                                for name in self.engines.names]}

    def generations(self, body: dict):
        admit(self.worker)
        unknown = sorted(set(body) - KNOWN)
        if unknown:
            raise InvalidRequest(f"unknown field {unknown[0]!r}; this endpoint takes {', '.join(sorted(KNOWN))}")
        prompt = fields.text(body, "prompt")
        if not prompt:
            raise InvalidRequest("prompt: say what to draw")
        engine = self.engines.find(body.get("model"))
        if body.get("response_format", "b64_json") != "b64_json":
            raise InvalidRequest("response_format: only \"b64_json\" is offered (no image is kept to link to)")
        width, height = self.engines.default_size(engine)
        size = body.get("size")
        if size not in (None, "auto"):
            match = re.fullmatch(r"([0-9]{1,6})x([0-9]{1,6})", str(size))
            if not match:
                raise InvalidRequest(f"size must be \"WIDTHxHEIGHT\" (e.g. \"{width}x{height}\"), got {size!r}")
            width, height = int(match.group(1)), int(match.group(2))
        seed = fields.integer(body, "seed", -1)
        n = fields.integer(body, "n", 1)
        if n < 1:
            raise InvalidRequest(f"n must be at least 1, got {n}")
        options = {"prompt": prompt, "negative_prompt": fields.text(body, "negative_prompt") or None,
                   "steps": fields.integer(body, "steps", 30), "guidance": fields.number(body, "guidance", 7.5),
                   "seed": random_seed() if seed == -1 else seed, "num_images": n, "width": width,
                   "height": height, "sampler": body.get("sampler") or "dpmpp_2m_karras", "prompt_weighting": True,
                   "clip_skip": 0}  # as AUTOMATIC1111's requests have it, so that the two may share a call
        images = run(self.worker, options, engine)
        return 200, {"created": int(time.time()), "data": [{"b64_json": png_base64(im)} for im in images]}
