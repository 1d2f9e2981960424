"""ldm-serve over HTTP on the tiny SD 1.x engine: each answer's images are the ones the Pipeline
(tested against diffusers elsewhere) draws for what the request asks, in AUTOMATIC1111's and
OpenAI's formats; mistakes get their error bodies; bodies, credentials and limits over raw sockets
(the worker and several engines: test_worker.py)."""

from __future__ import annotations

import base64
import json
import re
import socket
import threading

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps
from serve_http import b64, call, form, pixels, running, unb64

from ldm_deploy import Pipeline
from ldm_deploy.engine import resize_mode
from ldm_deploy.serve import Auth


@pytest.fixture(scope="module")
def pipe(engine_dirs):
    """The server's own pipeline (the oracle is the session's `pipelines`, another instance)."""
    return Pipeline.load(engine_dirs["tiny-sd1"])


@pytest.fixture(scope="module")
def server(pipe):
    with running(pipe) as s:
        yield s


@pytest.fixture(scope="module")
def oracle(pipelines):
    return pipelines["tiny-sd1"]


@pytest.fixture(scope="module")
def photo():
    y, x = np.mgrid[0:64, 0:96]
    rgb = np.stack([x / 96, y / 64, 0.5 + 0.5 * np.sin(x / 7.0)], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def test_txt2img_draws_what_the_pipeline_draws(server, oracle):
    body = {"prompt": "a (red:1.2) cat", "negative_prompt": "blurry", "steps": 6, "cfg_scale": 6.5, "seed": 11,
            "sampler_name": "Euler a", "batch_size": 2, "n_iter": 2, "width": 96, "height": 64}
    status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", body)
    assert status == 200, answer
    got = [unb64(s) for s in answer["images"]]
    want = oracle("a (red:1.2) cat", negative_prompt="blurry", steps=6, guidance=6.5, seed=11, num_images=4,
                  sampler="euler_a", width=96, height=64, prompt_weighting=True, progress=False)
    assert np.array_equal(pixels(got), pixels(want))
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [11, 12, 13, 14] and info["seed"] == 11
    assert (info["width"], info["height"], info["sampler_name"], info["steps"]) == (96, 64, "Euler a", 6)
    assert info["infotexts"] == [im.info["parameters"] for im in want]
    assert [im.info["parameters"] for im in got] == info["infotexts"]  # inside each PNG, as AUTOMATIC1111's
    assert answer["parameters"] == body
    # a schedule its parser would cut from the name ("Euler a SGM Uniform" at " Uniform") comes apart
    small = {"prompt": "x", "steps": 1, "seed": 1, "width": 64, "height": 64}
    for name, scheduler, schedule in (("Euler a", "sgm_uniform", "SGM Uniform"), ("DPM++ 2M", "uniform", "Uniform")):
        status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST",
                                 {**small, "sampler_name": name, "scheduler": scheduler})
        assert status == 200, answer
        info = json.loads(answer["info"])
        assert (info["sampler_name"], info["extra_generation_params"]) == (name, {"Schedule type": schedule})
    # the Beta schedule's distribution is ours only (AUTOMATIC1111's default), where a pass draws with it
    beta = {**small, "sampler_name": "Euler", "scheduler": "beta"}
    status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", {**beta, "override_settings": {"beta_dist_alpha": 0.6}})
    assert status == 200, answer
    assert json.loads(answer["info"])["extra_generation_params"] == {"Beta schedule alpha": 0.6, "Beta schedule beta": 0.6}
    for body in ({**beta, "override_settings": {"beta_dist_beta": 0.5}},
                 {**small, "enable_hr": True, "hr_scheduler": "beta", "override_settings": {"beta_dist_beta": "0.6"}}):
        status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", body)
        assert status == 422 and "beta_dist_beta is" in answer["detail"], answer
    status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST",  # no Beta: not read, as there
                             {**small, "override_settings": {"beta_dist_beta": 0.5}})
    assert status == 200, answer


def test_txt2img_defaults(server, oracle):
    status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", {"prompt": "a dog", "seed": 5, "steps": 4})
    assert status == 200, answer
    want = oracle("a dog", steps=4, guidance=7.0, seed=5, sampler="euler", prompt_weighting=True, progress=False)
    assert unb64(answer["images"][0]).size == oracle.default_size
    assert np.array_equal(pixels([unb64(answer["images"][0])]), pixels(want))
    random = json.loads(call(server.url + "/sdapi/v1/txt2img", "POST", {"steps": 1, "send_images": False})[1]["info"])
    assert random["seed"] >= 0  # -1: drawn, and answered


def test_variation_seeds(server, oracle):
    """AUTOMATIC1111's variation fields: a batch of variations of one seed, and its info."""
    body = {"prompt": "a cat", "steps": 3, "seed": 4, "subseed": 30, "subseed_strength": 0.3, "batch_size": 2,
            "seed_resize_from_w": 48, "seed_resize_from_h": 80, "width": 64, "height": 64}
    status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", body)
    assert status == 200, answer
    want = oracle("a cat", steps=3, guidance=7.0, seed=4, variation_seed=30, variation_strength=0.3, num_images=2,
                  seed_resize_from=(48, 80), sampler="euler", width=64, height=64, prompt_weighting=True,
                  progress=False)
    assert np.array_equal(pixels([unb64(s) for s in answer["images"]]), pixels(want))
    info = json.loads(answer["info"])
    assert (info["all_seeds"], info["all_subseeds"], info["subseed_strength"]) == ([4, 4], [30, 31], 0.3)
    assert (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (48, 80)
    assert "Variation seed: 31, Variation seed strength: 0.3, Seed resize from: 48x80" in info["infotexts"][1]


def test_hires_fix(server, oracle):
    body = {"prompt": "a cat", "steps": 3, "seed": 2, "width": 64, "height": 64, "enable_hr": True,
            "hr_scale": 1.5, "hr_upscaler": "Lanczos", "hr_second_pass_steps": 2, "denoising_strength": 0.6}
    status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", body)
    assert status == 200, answer
    want = oracle("a cat", steps=3, guidance=7.0, seed=2, sampler="euler", width=64, height=64, hires_scale=1.5,
                  hires_steps=2, hires_strength=0.6, hires_upscaler="Lanczos", prompt_weighting=True, progress=False)
    assert np.array_equal(pixels([unb64(answer["images"][0])]), pixels(want))
    status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", {**body, "hr_prompt": "a (black) cat",
                                                                       "hr_sampler_name": "Euler a"})
    assert status == 200, answer
    want = oracle("a cat", steps=3, guidance=7.0, seed=2, sampler="euler", width=64, height=64, hires_scale=1.5,
                  hires_steps=2, hires_strength=0.6, hires_upscaler="Lanczos", hires_prompt="a (black) cat",
                  hires_sampler="euler_a", prompt_weighting=True, progress=False)
    assert np.array_equal(pixels([unb64(answer["images"][0])]), pixels(want))
    info = json.loads(answer["info"])
    assert "Hires sampler: Euler a, Hires prompt: a (black) cat" in info["infotexts"][0]
    # its info's size is the first pass's (its p.width), as the PNG's Size
    assert (info["width"], info["height"]) == (64, 64) and "Size: 64x64" in info["infotexts"][0]
    assert unb64(answer["images"][0]).size == (96, 96)


def test_img2img_and_inpainting(server, oracle, photo):
    mask = Image.new("L", photo.size, 0)
    mask.paste(255, (20, 10, 60, 40))
    body = {"prompt": "a cat", "steps": 5, "seed": 3, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
            "init_images": [b64(photo)], "denoising_strength": 0.6}
    status, answer, _ = call(server.url + "/sdapi/v1/img2img", "POST", body)
    assert status == 200, answer
    want = oracle("a cat", steps=5, guidance=7.0, seed=3, sampler="dpmpp_2m_karras", init_image=photo, strength=0.6,
                  prompt_weighting=True, progress=False)
    assert np.array_equal(pixels([unb64(answer["images"][0])]), pixels(want))
    assert answer["parameters"]["init_images"] is None  # as AUTOMATIC1111, unless include_init_images
    info = json.loads(answer["info"])  # the sampler named as the PNG names it
    assert (info["sampler_name"], info["extra_generation_params"]) == ("DPM++ 2M Karras", {})

    # AUTOMATIC1111's API defaults: "Only masked" with no padding, mask blur 4, strength 0.75
    # masked content "fill": the hole painted with the colours around it first
    status, answer, _ = call(server.url + "/sdapi/v1/img2img", "POST", {**body, "mask": b64(mask),
                                                                       "denoising_strength": None})
    assert status == 200, answer
    want = oracle("a cat", steps=5, guidance=7.0, seed=3, sampler="dpmpp_2m_karras",
                  init_image=photo, mask=mask, masked_content="fill", strength=0.75, mask_blur=4, mask_crop=0,
                  prompt_weighting=True, progress=False)
    assert np.array_equal(pixels([unb64(answer["images"][0])]), pixels(want))

    status, answer, _ = call(server.url + "/sdapi/v1/img2img", "POST", {
        **body, "mask": b64(mask), "inpaint_full_res": False, "inpainting_mask_invert": 1, "mask_blur": 0,
        "inpainting_fill": 1})
    assert status == 200, answer
    want = oracle("a cat", steps=5, guidance=7.0, seed=3, sampler="dpmpp_2m_karras", init_image=photo,
                  mask=ImageOps.invert(mask), strength=0.6, mask_blur=0, prompt_weighting=True, progress=False)
    assert np.array_equal(pixels([unb64(answer["images"][0])]), pixels(want))

    # "Resize and fill" to a square: the picture and its mask (blurred first) fitted as the web UI fits them
    status, answer, _ = call(server.url + "/sdapi/v1/img2img", "POST", {
        **body, "mask": b64(mask), "inpaint_full_res": False, "resize_mode": 2, "width": 64, "height": 64})
    assert status == 200, answer
    blurred = resize_mode.fit(2, mask.filter(ImageFilter.GaussianBlur(4)), 64, 64)
    want = oracle("a cat", steps=5, guidance=7.0, seed=3, sampler="dpmpp_2m_karras", width=64, height=64,
                  init_image=resize_mode.fit(2, photo, 64, 64), mask=blurred, masked_content="fill", strength=0.6,
                  prompt_weighting=True, progress=False)
    assert unb64(answer["images"][0]).size == (64, 64)
    assert np.array_equal(pixels([unb64(answer["images"][0])]), pixels(want))


def test_openai_images(server, oracle):
    status, answer, _ = call(server.url + "/v1/images/generations", "POST",
                             {"prompt": "a cat", "n": 2, "size": "64x96", "seed": 5, "steps": 4})
    assert status == 200, answer
    want = oracle("a cat", steps=4, seed=5, num_images=2, width=64, height=96, prompt_weighting=True, progress=False)
    assert np.array_equal(pixels([unb64(d["b64_json"]) for d in answer["data"]]), pixels(want))
    status, answer, _ = call(server.url + "/v1/images/generations", "POST", {"prompt": "a cat", "colour": "red"})
    assert status == 400 and "colour" in answer["error"]["message"]
    status, answer, _ = call(server.url + "/v1/images/generations", "POST", {"prompt": "a", "size": "40x40"})
    assert status == 400 and "width 40" in answer["error"]["message"]  # the Pipeline's own check, OpenAI's body
    assert call(server.url + "/v1/models")[1]["data"][0]["id"]


def test_openai_image_edits(server, oracle, photo):
    """OpenAI's edit API: the mask's fully transparent pixels are redrawn (no mask: the image's own),
    drawn as the Pipeline inpaints with that mask (strength 1, the image's size)."""
    hole = Image.new("L", photo.size, 0)
    hole.paste(255, (20, 10, 60, 40))
    want = oracle("a cat", init_image=photo, mask=hole, steps=4, seed=5, num_images=2, prompt_weighting=True,
                  progress=False)
    see_through = photo.convert("RGBA")
    see_through.putalpha(ImageOps.invert(hole))  # alpha 0 in the hole
    url = server.url + "/v1/images/edits"
    for fields in ({"image": see_through}, {"image": photo, "mask": see_through}):
        raw, headers = form({**fields, "prompt": "a cat", "n": "2", "seed": "5", "steps": "4"})
        status, answer, _ = call(url, "POST", raw=raw, headers=headers)
        assert status == 200, answer
        assert np.array_equal(pixels([unb64(d["b64_json"]) for d in answer["data"]]), pixels(want))
    # the image's size, rounded down to the engine's grid as the Pipeline takes it; a PNG whose
    # transparency is a tRNS colour (no alpha channel); gpt-image-1's fields accepted
    odd = see_through.resize((100, 70))
    raw, headers = form({"image": odd, "prompt": "a cat", "seed": "5", "steps": "4", "background": "auto"})
    status, answer, _ = call(url, "POST", raw=raw, headers=headers)
    assert status == 200, answer
    hole_odd = odd.getchannel("A").point(lambda a: 255 if a == 0 else 0)
    want = oracle("a cat", init_image=odd, mask=hole_odd, steps=4, seed=5, prompt_weighting=True, progress=False)
    assert unb64(answer["data"][0]["b64_json"]).size == (96, 64)
    assert np.array_equal(pixels([unb64(answer["data"][0]["b64_json"])]), pixels(want))
    keyed = photo.copy()
    keyed.paste((0, 255, 0), (20, 10, 60, 40))
    keyed.info["transparency"] = (0, 255, 0)  # PNG's tRNS: this colour is transparent
    raw, headers = form({"image": keyed, "prompt": "a cat", "seed": "5", "steps": "4", "n": "2"})
    status, answer, _ = call(url, "POST", raw=raw, headers=headers)
    want = oracle("a cat", init_image=keyed.convert("RGB"), mask=hole, steps=4, seed=5, num_images=2,
                  prompt_weighting=True, progress=False)
    assert status == 200 and np.array_equal(pixels([unb64(d["b64_json"]) for d in answer["data"]]), pixels(want))
    for fields, match in (
            ({"image": photo}, "the image has no transparency"),
            ({"image": see_through, "n": photo}, "'n' is sent as a file"),
            ({"image": see_through, "output_format": "jpeg"}, "only \"png\""),
            ({"image": photo, "mask": see_through.resize((32, 32))}, "give them the same size"),
            ({"image": see_through, "steps": "many"}, "steps must be a whole number"),
            ({"image": see_through, "guidance": "nan"}, "guidance must be a finite number"),
            ({"image": see_through, "colour": "red"}, "unknown field 'colour'"),
            ({"image": "not a file"}, "image is not an image file PIL can read"),
            ({"mask": see_through}, "send the image to edit as a file")):
        raw, headers = form({"prompt": "a cat", **fields})
        status, answer, _ = call(url, "POST", raw=raw, headers=headers)
        assert status == 400 and match in answer["error"]["message"], answer
    status, answer, _ = call(url, "POST", {"prompt": "a cat"})  # JSON, not a form
    assert status == 400 and "multipart/form-data" in answer["error"]["message"]


@pytest.mark.parametrize("path,body,status,match", [
    ("/sdapi/v1/txt2img", {"sampler_name": "Restart"}, 422, "Restart"),
    ("/sdapi/v1/txt2img", {"restore_faces": True}, 422, "face restoration"),
    ("/sdapi/v1/txt2img", {"width": 100, "steps": 1}, 422, "multiple of 8"),
    ("/sdapi/v1/img2img", {"init_images": ["%%%"]}, 422, "base64"),
    ("/sdapi/v1/nothing", {}, 404, "no such endpoint"),
])


def test_a1111_errors(server, path, body, status, match):
    got, answer, _ = call(server.url + path, "POST", body)
    assert got == status
    assert set(answer) == {"error", "detail", "body", "errors"}
    assert re.search(match, answer["detail"]), answer


def test_http_errors(pipe, server):
    status, answer, headers = call(server.url + "/sdapi/v1/txt2img")  # GET
    assert status == 405 and headers["Allow"] == "POST"
    status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", raw=b"{not json")
    assert status == 400 and "not JSON" in answer["detail"]
    status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", raw=b"[1, 2]")
    assert status == 422
    with running(pipe, max_body=100) as small:
        status, answer, _ = call(small.url + "/sdapi/v1/txt2img", "POST", {"prompt": "x" * 200})
        assert status == 413 and "--max-body-mb" in answer["detail"]


def test_saved_styles(pipe, oracle):
    from ldm_deploy.engine.styles import Style

    saved = {"Noir": Style("Noir", "film noir still of {prompt}", "colour")}
    with running(pipe, styles=saved) as server:
        assert call(server.url + "/sdapi/v1/prompt-styles")[1] == [
            {"name": "Noir", "prompt": "film noir still of {prompt}", "negative_prompt": "colour"}]
        body = {"prompt": "a cat", "styles": ["Noir"], "steps": 2, "seed": 4, "width": 64, "height": 64}
        status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", body)
        assert status == 200, answer
        want = oracle("film noir still of a cat", negative_prompt="colour", steps=2, guidance=7.0, seed=4,
                      sampler="euler", width=64, height=64, prompt_weighting=True, progress=False)
        assert np.array_equal(pixels([unb64(answer["images"][0])]), pixels(want))
        info = json.loads(answer["info"])
        assert (info["prompt"], info["negative_prompt"], info["styles"]) == ("film noir still of a cat", "colour",
                                                                           ["Noir"])
        status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", {**body, "styles": ["Pop"]})
        assert status == 422 and "no style named 'Pop'" in answer["detail"]


def test_metrics_count_answers_images_and_calls(pipe):
    import urllib.request

    with running(pipe) as server:
        engine = server.worker.engines.default
        body = {"prompt": "a cat", "steps": 2, "seed": 4, "width": 64, "height": 64, "batch_size": 2}
        assert call(server.url + "/sdapi/v1/txt2img", "POST", body)[0] == 200
        assert call(server.url + "/sdapi/v1/txt2img", "POST", {**body, "steps": 0})[0] == 422
        assert call(server.url + "/no/such/path?x=1")[0] == 404
        with urllib.request.urlopen(server.url + "/metrics", timeout=60) as r:
            assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            text = r.read().decode()
    samples = {}
    for line in text.splitlines():  # "name{labels} value", comments apart
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    assert samples['ldm_serve_requests_total{method="POST",path="/sdapi/v1/txt2img",status="200"}'] == 1
    assert samples['ldm_serve_requests_total{method="POST",path="/sdapi/v1/txt2img",status="422"}'] == 1
    assert samples['ldm_serve_requests_total{method="GET",path="other",status="404"}'] == 1  # its path not kept
    assert samples['ldm_serve_request_seconds_count{path="/sdapi/v1/txt2img"}'] == 2
    assert samples['ldm_serve_request_seconds_bucket{path="/sdapi/v1/txt2img",le="+Inf"}'] == 2
    assert samples[f'ldm_serve_images_total{{engine="{engine}"}}'] == 2
    assert samples[f'ldm_serve_generation_seconds_count{{engine="{engine}"}}'] == 1
    # both requests reached the worker (steps 0 is the Pipeline's to refuse); one call drew
    assert samples["ldm_serve_pipeline_calls_total"] == 1 and samples["ldm_serve_jobs_total"] == 2
    assert samples["ldm_serve_queue_waiting"] == 0 and samples["ldm_serve_running"] == 0


def test_listings(server, pipe):
    m = pipe.manifest.model
    models = call(server.url + "/sdapi/v1/sd-models")[1]
    assert models[0]["hash"] == m.weights_sha256[:10] and models[0]["sha256"] == m.weights_sha256
    names = {s["name"] for s in call(server.url + "/sdapi/v1/samplers")[1]}
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DDIM", "UniPC"} <= names
    assert not any(n.endswith((" Karras", " Exponential", " Beta", " SGM Uniform", " Steps")) for n in names)  # schedules apart, as since its 1.9
    assert {s["name"] for s in call(server.url + "/sdapi/v1/schedulers")[1]} == {"automatic", "uniform", "karras",
                                                                                "exponential", "sgm_uniform", "beta",
                                                                                "align_your_steps"}
    assert [u["name"] for u in call(server.url + "/sdapi/v1/upscalers")[1]] == ["Lanczos"]
    assert "Latent (bicubic)" in [u["name"] for u in call(server.url + "/sdapi/v1/latent-upscale-modes")[1]]
    assert call(server.url + "/sdapi/v1/embeddings")[1] == {"loaded": {}, "skipped": {}}
    options = call(server.url + "/sdapi/v1/options")[1]
    assert call(server.url + "/sdapi/v1/options", "POST", {"sd_model_checkpoint": options["sd_model_checkpoint"]})[0] == 200
    assert (options["beta_dist_alpha"], options["beta_dist_beta"]) == (0.6, 0.6)  # the only Beta schedule served
    assert call(server.url + "/sdapi/v1/options", "POST", {"beta_dist_alpha": 0.6})[0] == 200
    assert call(server.url + "/sdapi/v1/options", "POST", {"beta_dist_alpha": 0.5})[0] == 422
    status, answer, _ = call(server.url + "/sdapi/v1/options", "POST", {"CLIP_stop_at_last_layers": 2})
    assert status == 422 and "override_settings" in answer["detail"]
    assert call(server.url + "/internal/ping")[:2] == (200, {})
    health = call(server.url + "/health")[1]
    assert health["status"] == "ok" and health["waiting"] == 0 and "engine" not in health
    assert call(server.url + "/controlnet/model_list")[1] == {"model_list": []}
    assert call(server.url + "/sdapi/v1/prompt-styles")[1] == []  # none saved: started without --styles-file
    assert "POST /sdapi/v1/txt2img" in call(server.url + "/docs")[1]["endpoints"]
    # what clients probe: what is not offered lists nothing; a rescan finds nothing new
    for path in ("face-restorers", "hypernetworks", "sd-modules", "script-info", "extensions"):
        assert call(server.url + "/sdapi/v1/" + path)[:2] == (200, []), path
    assert call(server.url + "/sdapi/v1/scripts")[:2] == (200, {"txt2img": [], "img2img": []})
    for path in ("refresh-checkpoints", "refresh-vae", "refresh-loras", "refresh-embeddings"):
        assert call(server.url + "/sdapi/v1/" + path, "POST", {})[:2] == (200, None), path
    assert call(server.url + "/sdapi/v1/sd-models")[1] == models


def test_png_info_reads_the_answer_back(server):
    answer = call(server.url + "/sdapi/v1/txt2img", "POST", {"prompt": "a cat", "negative_prompt": "dog",
                                                             "steps": 2, "seed": 9})[1]
    info = call(server.url + "/sdapi/v1/png-info", "POST", {"image": answer["images"][0]})[1]
    assert info["parameters"]["Prompt"] == "a cat" and info["parameters"]["Negative prompt"] == "dog"
    assert info["parameters"]["Seed"] == "9" and info["info"].startswith("a cat\n")
    # sizes split as its parse_generation_parameters splits them
    assert (info["parameters"]["Size-1"], info["parameters"]["Size-2"]) == ("128", "128")  # (the default size)
    assert "Size" not in info["parameters"]


def test_credentials(pipe):
    auth = Auth(users=(("ann", "s3cret"),), keys=("key-1",))
    with running(pipe, auth=auth) as s:
        url = s.url + "/sdapi/v1/sd-models"
        status, answer, headers = call(url)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        basic = "Basic " + base64.b64encode(b"ann:s3cret").decode()
        assert call(url, headers={"Authorization": basic})[0] == 200
        assert call(url, headers={"Authorization": "Bearer key-1"})[0] == 200
        assert call(url, headers={"Authorization": "Bearer key-2"})[0] == 401
        wrong = "Basic " + base64.b64encode(b"ann:guess").decode()
        assert call(url, headers={"Authorization": wrong})[0] == 401
        assert call(s.url + "/health")[0] == 200  # for load balancers' probes


def exchange(server, data: bytes) -> bytes:
    """Raw bytes to the server on one connection (the last request asks it to close); all it
    answers, until it closes."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=60) as conn:
        conn.sendall(data)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_body_never_passes_for_the_next_request(server, pipe):
    # a wrong path with a body, then a request on the same kept-alive connection: both answered
    body = b'{"prompt": "cat"}'
    answer = exchange(server, b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                              b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % (len(body), body))
    assert answer.count(b"HTTP/1.1 404") == 1 and answer.count(b"HTTP/1.1 200") == 1
    # credentials missing: the body (here a whole request of its own) is read and dropped, never run
    inner = b"GET /sdapi/v1/sd-models HTTP/1.1\r\nHost: x\r\n\r\n"
    with running(pipe, auth=Auth(keys=("k",))) as guarded:
        answer = exchange(guarded, b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                                   % (len(inner), inner))
    assert answer.count(b"HTTP/1.1 401") == 1 and b"HTTP/1.1 200" not in answer
    # a length that cannot be read safely: answered, and the connection closed
    for length in (b"-1", b"12, 13", b"x", "\u00b2".encode("latin-1")):
        answer = exchange(server, b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n"
                                  b"GET /health HTTP/1.1\r\n\r\n" % length)
        assert answer.startswith(b"HTTP/1.1 400") and b"Connection: close" in answer
        assert answer.count(b"HTTP/1.1") == 1


def test_limits(server):
    status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", {"steps": 501})
    assert status == 422 and "--max-steps" in answer["detail"]
    status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", {"batch_size": 8, "n_iter": 5})
    assert status == 422 and "--max-images" in answer["detail"]
    status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", raw=b"[" * 100000 + b"]" * 100000)
    assert status == 400


def test_connections_past_the_limit_are_503(pipe):
    with running(pipe, max_connections=1) as server:
        host, port = server.server_address[:2]
        with socket.create_connection((host, port), timeout=60) as idle:  # kept open, holds the one thread
            idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert idle.recv(65536).startswith(b"HTTP/1.1 200")
            status, answer, headers = call(server.url + "/health")
            assert status == 503 and "--max-connections" in answer["detail"] and headers["Retry-After"]
        pause = threading.Event()
        for _ in range(200):  # the idle connection's thread ends once it is closed: room again
            if call(server.url + "/health")[0] == 200:
                break
            pause.wait(0.05)
        else:
            pytest.fail("the closed connection's place was never freed")
        assert server.worker.metrics.refused >= 1  # ldm_serve_refused_total
        assert "ldm_serve_refused_total " in server.worker.metrics.render(0, 0)


def test_posts_past_the_connection_limit_read_their_503(pipe):
    with running(pipe, max_connections=1) as server:
        host, port = server.server_address[:2]
        with socket.create_connection((host, port), timeout=60) as idle:
            idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert idle.recv(65536).startswith(b"HTTP/1.1 200")
            for _ in range(5):
                status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", {"prompt": "x" * 5000})
                assert status == 503 and "--max-connections" in answer["detail"]
