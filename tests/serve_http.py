"""HTTP calls and base64 images for the server tests."""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager

import numpy as np
from PIL import Image

from ldm_deploy import serve


def call(url: str, method: str = "GET", body=None, headers: dict | None = None, raw: bytes | None = None):
    """-> (status, JSON answer, headers)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def unb64(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), np.int16) for im in images])


@contextmanager
def running(pipe, **options):
    """A server of `pipe` on a free port, serving in a thread; stopped after."""
    server = serve.build(pipe, ("127.0.0.1", 0), **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.worker.stop()
        server.server_close()


def form(fields: dict) -> tuple[bytes, dict]:
    """A multipart/form-data body, as OpenAI's SDK sends its image edits: text fields, and PIL
    images as PNG files -> (body, headers)."""
    boundary = "----ldm-deploy-test-boundary"
    parts = []
    for name, value in fields.items():
        if isinstance(value, Image.Image):
            buffer = io.BytesIO()
            value.save(buffer, format="PNG")
            head = (f'Content-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
                    "Content-Type: image/png\r\n\r\n")
            parts.append(head.encode() + buffer.getvalue())
        else:
            parts.append(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode())
    body = b"".join(f"--{boundary}\r\n".encode() + p + b"\r\n" for p in parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
