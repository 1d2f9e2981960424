"""Malformed requests, as a fuzzing review found them: each is a clear 4xx, never a server error,
and none holds the worker at a size it would refuse anyway."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from PIL import Image
from serve_http import b64, call, running

from ldm_deploy import Pipeline
from ldm_deploy.engine import infotext
from ldm_deploy.errors import InvalidRequest
from ldm_deploy.serve import Auth
from ldm_deploy.serve import a1111_request as a1111

MODEL = SimpleNamespace(pooled_width=0, tiling=False, controlnets=())


def seven():
    return 7


@pytest.fixture(scope="module")
def server(engine_dirs):
    with running(Pipeline.load(engine_dirs["tiny-sd1"]), max_body=1 << 20) as s:
        yield s


@pytest.mark.parametrize("body,match", [
    ({"cfg_scale": 10 ** 400}, "cfg_scale"), ({"prompt": "\ud800"}, "Unicode"),
    ({"enable_hr": True, "hr_resize_x": 128, "width": 0}, "positive"),
])
def test_translation_refusals(body, match):
    with pytest.raises(InvalidRequest, match=match):
        a1111.txt2img(body, MODEL, (64, 64), seven)


def test_unreadable_images_are_refused():
    broken = b64(Image.new("RGB", (8, 8)))[:40] + "A" * 40  # a PNG header, then nonsense
    with pytest.raises(InvalidRequest, match="init_images\\[0\\]"):
        a1111.img2img({"init_images": [broken]}, MODEL, (64, 64), seven)


@pytest.mark.parametrize("path,body,status", [
    ("/sdapi/v1/txt2img", {"steps": 10 ** 400}, 422), ("/sdapi/v1/txt2img", {"prompt": "\ud800", "steps": 1}, 422),
    ("/sdapi/v1/txt2img", {"width": 10 ** 30, "steps": 1}, 422),
    ("/v1/images/generations", {"prompt": "a", "size": "\u00b2x\u00b2"}, 400),
    ("/v1/images/generations", {"prompt": "a", "n": 10 ** 400}, 400),
])
def test_over_http(server, path, body, status):
    got, answer, _ = call(server.url + path, "POST", body)
    assert got == status, answer


def test_bodies_that_are_no_object_and_other_methods(server):
    """No body, or one that is no object, is the API's own mistake status (AUTOMATIC1111's 422,
    OpenAI's 400); a method no route takes is a JSON 405 naming the ones it does."""
    got, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", raw=b"")
    assert got == 422 and "the body is empty" in answer["detail"]
    got, answer, _ = call(server.url + "/v1/images/generations", "POST", raw=b"[]")
    assert got == 400 and "must be a JSON object" in answer["error"]["message"]
    got, answer, headers = call(server.url + "/sdapi/v1/txt2img", "PUT", {"prompt": "a"})
    assert got == 405 and "takes POST, not PUT" in answer["detail"] and headers["Allow"] == "POST"


@pytest.mark.parametrize("path,body,message", [
    ("/sdapi/v1/txt2img", {"steps": 1, "enable_hr": True, "hr_scale": 1}, "hr_scale must be above 1"),
    ("/sdapi/v1/txt2img", {"steps": 1, "cfg_scale": -1}, "cfg_scale must be a finite number, 0 or more"),
    ("/sdapi/v1/txt2img", {"steps": 1, "batch_size": 10, "n_iter": 10}, "batch_size x n_iter 100 is more than"),
    ("/sdapi/v1/img2img", {"steps": 1, "init_images": ["IMAGE"], "denoising_strength": 0},
     "denoising_strength must lie in (0, 1]"),
    ("/v1/images/generations", {"prompt": "a", "n": 100}, "n 100 is more than"),
])
def test_mistakes_name_the_apis_own_fields(server, path, body, message):
    """The pipeline's mistakes name the field the request gave, not the pipeline's keyword."""
    body = {k: [b64(Image.new("RGB", (64, 64)))] if v == ["IMAGE"] else v for k, v in body.items()}
    got, answer, _ = call(server.url + path, "POST", body)
    text = answer["detail"] if "detail" in answer else answer["error"]["message"]
    assert got in (400, 422) and text.startswith(message), text


def test_nan_is_not_json(server):
    got, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", raw=b'{"eta": NaN, "steps": 1}')
    assert got == 400 and "NaN" in answer["detail"]


def test_inpainting_sizes_are_checked_before_anything_is_cut(pipelines):
    image, mask = Image.new("RGB", (64, 64)), Image.new("L", (64, 64), 255)
    for size in ({"width": 100_000}, {"height": 0}):
        with pytest.raises(InvalidRequest, match="outside this engine's range"):
            pipelines["tiny-sd1"]("x", init_image=image, mask=mask, masked_content="fill", mask_crop=0, steps=1,
                                  progress=False, **size)
    with pytest.raises(InvalidRequest, match="0 to 100000"):
        pipelines["tiny-sd1"]("x", init_image=image, mask=mask, mask_crop=10 ** 30, steps=1, progress=False)


def test_an_overlong_fields_line_is_text():
    line = "a" * (infotext.MAX_FIELDS_LINE + 1)
    assert infotext.parse("a prompt\n" + line) == ("a prompt\n" + line, "", {})
    assert infotext.parse("a prompt\nSteps: 2, Seed: 3, Size: 64x64")[2] == {"Steps": "2", "Seed": "3",
                                                                              "Size": "64x64"}


@pytest.mark.parametrize("refusal", ["401", "413"])
def test_large_bodies_read_their_refusal(engine_dirs, refusal):
    """A client still sending a large body reads the 401 or 413 rather than a reset."""
    pipe = Pipeline.load(engine_dirs["tiny-sd1"])
    options = {"auth": Auth(keys=("k",))} if refusal == "401" else {"max_body": 1000}
    body = json.dumps({"prompt": "x", "init_images": ["A" * (4 << 20)]}).encode()
    with running(pipe, **options) as server:
        request = urllib.request.Request(server.url + "/sdapi/v1/img2img", body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=60)
    assert e.value.code == int(refusal)
    assert ("credentials" if refusal == "401" else "--max-body-mb") in json.loads(e.value.read())["detail"]


BOUNDARY = "b0undary"


@pytest.mark.parametrize("raw,content_type,match", [
    (b"garbage", f"multipart/form-data; boundary={BOUNDARY}", "could not be read"),
    (b"garbage", "multipart/form-data", "names no boundary"),
    (b"x=1", "application/x-www-form-urlencoded", "send the body as multipart/form-data"),
    (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na\r\n".encode(),  # never closed
     f"multipart/form-data; boundary={BOUNDARY}", "send the image to edit as a file"),
    (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n\xff\xfe\r\n--{BOUNDARY}--\r\n"
     .encode("latin-1"), f"multipart/form-data; boundary={BOUNDARY}", "is not UTF-8 text"),
    (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
     f"PNG?\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na\r\n--{BOUNDARY}--\r\n"
     .encode(), f"multipart/form-data; boundary={BOUNDARY}", "not an image file PIL can read"),
])
def test_malformed_forms_are_400s(server, raw, content_type, match):
    status, answer, _ = call(server.url + "/v1/images/edits", "POST", raw=raw, headers={"Content-Type": content_type})
    assert status == 400 and match in answer["error"]["message"], answer


def raw_form(*parts: bytes) -> bytes:
    return b"".join(f"--{BOUNDARY}\r\n".encode() + p + b"\r\n" for p in parts) + f"--{BOUNDARY}--\r\n".encode()


PROMPT_PART = b'Content-Disposition: form-data; name="prompt"\r\n\r\na'


@pytest.mark.parametrize("raw,match", [
    (raw_form(b'Content-Disposition: form-data; name*\r\n\r\nx', PROMPT_PART), "send the image to edit as a file"),
    (raw_form(b'Content-Disposition: form-data; name="p"' + b"\r\n ;" * 5000 + b"\r\n\r\nx"), "longer than 8192"),
    (raw_form(*[b"\r\n"] * 100), "more than 64 parts"),
    (raw_form(b'Content-Disposition: form-data; name="image"\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n'
              b"--c--"), "another multipart body"),
    (raw_form(b'Content-Disposition: form-data; name="image"\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAA'),
     "Content-Transfer-Encoding"),
    (raw_form(b'Content-Disposition: form-data; name="image[]"; filename="a.png"\r\n\r\nx',
              b'Content-Disposition: form-data; name="image[]"; filename="b.png"\r\n\r\nx', PROMPT_PART), "sent twice"),
    (raw_form(b'Content-Disposition: form-data; name="n"; x=' + b"(" * 5000 + b"\r\n\r\n2", PROMPT_PART),
     "send the image to edit as a file"),
])
def test_hostile_forms_are_400s_at_once(server, raw, match):
    status, answer, _ = call(server.url + "/v1/images/edits", "POST", raw=raw,
                             headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert status == 400 and match in answer["error"]["message"], answer


def test_an_image_part_without_a_file_name_is_a_file(server):
    """curl -F 'image=<a.png' sends no filename: image and mask are read as files by their names."""
    import io

    image = Image.new("RGBA", (64, 64), (200, 0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    raw = raw_form(b'Content-Disposition: form-data; name="image"\r\n\r\n' + buffer.getvalue(), PROMPT_PART,
                   b'Content-Disposition: form-data; name="steps"\r\n\r\n1')
    status, answer, _ = call(server.url + "/v1/images/edits", "POST", raw=raw,
                             headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert status == 200, answer


def test_form_framing_as_rfc_2046_has_it():
    """A delimiter is one only at a line's start and followed by "--" or the line's end: content
    that merely begins like one is content; the boundary is the Content-Type's own parameter."""
    from ldm_deploy.serve.form import MAX_TEXT, numbers, parse_form

    def body(*fields):
        return raw_form(*[b'Content-Disposition: form-data; name="' + n + b'"\r\n\r\n' + v for n, v in fields])

    ct = f"multipart/form-data; boundary={BOUNDARY}"
    tricky = f"a\r\n--{BOUNDARY}x more\r\nb --{BOUNDARY}\r\nc".encode()
    assert parse_form(body((b"prompt", tricky), (b"n", b"2")), ct) == {"prompt": tricky.decode(), "n": "2"}
    assert parse_form(b"preamble\r\n" + body((b"n", b"3")), f"multipart/form-data; xboundary=x; boundary={BOUNDARY}") \
        == {"n": "3"}
    with pytest.raises(InvalidRequest, match="bytes of text; at most"):
        parse_form(body((b"prompt", b"x" * (MAX_TEXT + 1))), ct)
    with pytest.raises(InvalidRequest, match="n must be a number"):
        numbers({"n": "9" * 100}, {"n": int})
    with pytest.raises(InvalidRequest, match="names no boundary"):
        parse_form(b"", "multipart/form-data; boundary=" + "b" * 201)
