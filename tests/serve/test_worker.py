"""ldm-serve's worker and engines on the tiny engines: waiting requests share a call and keep
their images, mistakes stay their own, a full queue and a stop answer 503, interrupts and progress
(the real pipeline held at a step, so the tests know a call is running), several engines."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from serve_http import call, pixels, running, unb64

from ldm_deploy import Pipeline
from ldm_deploy.errors import InvalidRequest
from ldm_deploy.serve.a1111 import run
from ldm_deploy.serve.server import HttpError
from ldm_deploy.serve.worker import Job, QueueFull, ShuttingDown, Worker


@pytest.fixture(scope="module")
def pipe(engine_dirs):
    return Pipeline.load(engine_dirs["tiny-sd1"])


@pytest.fixture(scope="module")
def oracle(pipelines):
    return pipelines["tiny-sd1"]


class Held:
    """The real pipeline, each call held after its first step until released: a test knows the
    call is running, whatever the machine's speed."""

    def __init__(self, pipe):
        self.pipe, self.at_step, self.release = pipe, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, *args, progress, **kwargs):
        def hold(done, total):
            progress(done, total)
            if done == 1:
                self.at_step.set()
                assert self.release.wait(60)

        return self.pipe(*args, progress=hold, **kwargs)


def test_progress_while_drawing(pipe):
    held = Held(pipe)
    with running(held) as server:
        answers = []
        thread = threading.Thread(target=lambda: answers.append(call(server.url + "/sdapi/v1/txt2img", "POST", {
            "prompt": "a", "steps": 8, "width": 64, "height": 64, "send_images": False})))
        thread.start()
        assert held.at_step.wait(60)
        state = call(server.url + "/sdapi/v1/progress")[1]
        held.release.set()
        thread.join()
        idle = call(server.url + "/sdapi/v1/progress")[1]
    assert answers[0][0] == 200
    assert state["state"]["sampling_step"] == 1 and state["state"]["sampling_steps"] == 8
    assert state["progress"] == 1 / 8 and state["state"]["job_count"] == 1 and state["state"]["job"]
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def interrupt_held(server, held, request: dict) -> tuple[dict, tuple]:
    """POST `request` to txt2img, interrupt the call where `held` holds it, release it: (what
    /sdapi/v1/progress said while held, the request's answer)."""
    answers = []
    thread = threading.Thread(target=lambda: answers.append(call(server.url + "/sdapi/v1/txt2img", "POST", request)))
    thread.start()
    assert held.at_step.wait(60)
    state = call(server.url + "/sdapi/v1/progress")[1]
    assert call(server.url + "/sdapi/v1/interrupt", "POST")[:2] == (200, {})
    held.release.set()
    thread.join()
    return state, answers[0]


def test_interrupt_stops_the_running_call(pipe):
    held = Held(pipe)
    with running(held) as server:
        _, (status, answer, _) = interrupt_held(server, held, {"prompt": "a", "steps": 8, "width": 64, "height": 64})
        assert status == 409 and answer["error"] == "Interrupted"
        assert call(server.url + "/sdapi/v1/txt2img", "POST", {"steps": 2, "width": 64, "height": 64})[0] == 200


class HeldAtTile(Held):
    """The pipeline held at the first tile of its tiled VAE decode: where the step counts are
    heard a second time."""

    def __call__(self, *args, progress, **kwargs):
        last = []

        def hold(done, total):
            progress(done, total)
            if last == [(done, total)]:
                self.at_step.set()
                assert self.release.wait(60)
            last[:] = [(done, total)]

        return self.pipe(*args, progress=hold, **kwargs)


def test_interrupt_stops_a_tiled_decode_between_tiles(engine_dirs):
    pipe = Pipeline.load(engine_dirs["tiny-sd1"])
    pipe.enable_vae_tiling(32)  # a 128 x 96 image: 6 x 4 tiles
    held = HeldAtTile(pipe)
    with running(held) as server:  # held where the steps are done and the tiles begun
        state, (status, answer, _) = interrupt_held(server, held, {"prompt": "a", "steps": 2, "width": 128,
                                                                   "height": 96})
    assert state["state"]["sampling_step"] == state["state"]["sampling_steps"] == 2
    assert status == 409 and answer["error"] == "Interrupted"


def options(prompt, seed, **extra):
    return {"prompt": prompt, "negative_prompt": "ugly", "steps": 4, "guidance": 7.0, "seed": seed,
            "num_images": 1, "sampler": "euler_a", "width": 64, "height": 64, "prompt_weighting": True, **extra}


def test_waiting_requests_share_a_call_and_keep_their_images(pipe, oracle):
    worker = Worker(pipe, max_batch=4)  # not started: the jobs wait, as behind a long one
    jobs = [worker.submit(Job(options(p, s))) for p, s in (("a cat", 3), ("a dog", 40), ("a (red) fox", 7))]
    jobs.append(worker.submit(Job(options("a bird", 8, steps=5))))  # another step count: its own call
    jobs.append(worker.submit(Job(options("a cow " * 40, 9))))  # two chunks of prompt: alone
    worker.start()
    for job in jobs:
        assert job.done.wait(120) and job.error is None, job.error
    worker.stop()
    assert worker.calls == 3
    for job in jobs:
        want = oracle(**{**job.options, "progress": False})
        got, want = pixels(job.images), pixels(want)
        # the batch runs other matrix shapes: at most a level apart, in a few pixels
        assert np.abs(got - want).max() <= 1 and np.mean(got != want) < 0.01
        assert job.images[0].info["parameters"] == oracle(**{**job.options, "progress": False})[0].info["parameters"]


def test_variations_run_alone(pipe, oracle):
    """A job of variations draws all its images from its one seed: it shares no call."""
    worker = Worker(pipe, max_batch=4)
    jobs = [worker.submit(Job({**options("a cat", 3), "num_images": 2, "variation_seed": 9,
                                "variation_strength": 0.2})) for _ in range(2)]
    worker.start()
    for job in jobs:
        assert job.done.wait(120) and job.error is None, job.error
    worker.stop()
    assert worker.calls == 2
    want = oracle(**{**jobs[0].options, "progress": False})
    assert np.array_equal(pixels(jobs[1].images), pixels(want))


def test_a_mistake_in_a_shared_call_is_only_its_own(pipe, oracle):
    worker = Worker(pipe)
    good, bad = worker.submit(Job(options("a cat", 3))), worker.submit(Job(options("a dog", -5)))
    worker.start()
    assert good.done.wait(120) and bad.done.wait(120)
    worker.stop()
    assert good.error is None and len(good.images) == 1
    assert isinstance(bad.error, InvalidRequest) and "seed" in str(bad.error)


def test_a_full_queue_is_503(pipe):
    worker = Worker(pipe, queue_size=1)  # not started: nothing leaves the queue
    worker.submit(Job(options("a cat", 1)))
    with pytest.raises(QueueFull):
        worker.submit(Job(options("a dog", 2)))
    with pytest.raises(HttpError) as e:
        run(worker, options("a dog", 2))
    assert e.value.status == 503 and e.value.headers["Retry-After"]


def test_stopping_answers_the_waiting_503(pipe):
    worker = Worker(pipe)  # not started: the jobs wait
    job = worker.submit(Job(options("a cat", 1)))
    worker.stop(drain=False)
    assert job.done.is_set() and isinstance(job.error, ShuttingDown)
    with pytest.raises(ShuttingDown):
        worker.submit(Job(options("a dog", 2)))


@pytest.fixture
def two(engine_dirs):
    """The tiny SD 1.x and 2.x engines, one loaded at a time."""
    from ldm_deploy.serve import Engines

    return Engines.read([engine_dirs["tiny-sd1"], engine_dirs["tiny-sd2"]],
                        lambda d, verify=True: Pipeline.load(d, verify=verify), keep=1)


def test_several_engines(two, pipelines):
    small = {"prompt": "a cat", "steps": 3, "seed": 4, "width": 64, "height": 64}
    with running(two) as server:
        models = call(server.url + "/sdapi/v1/sd-models")[1]
        assert [m["model_name"] for m in models] == ["tiny-sd1", "tiny-sd2"]
        status, first, _ = call(server.url + "/sdapi/v1/txt2img", "POST", small)
        assert status == 200, first
        status, second, _ = call(server.url + "/sdapi/v1/txt2img", "POST", {
            **small, "override_settings": {"sd_model_checkpoint": models[1]["title"]}})
        assert status == 200, second
        assert list(two.pipes) == ["tiny-sd2"]  # one kept loaded: the first let go
        for answer, name in ((first, "tiny-sd1"), (second, "tiny-sd2")):
            want = pipelines[name]("a cat", steps=3, seed=4, width=64, height=64, guidance=7.0, sampler="euler",
                                   prompt_weighting=True, progress=False)
            assert np.array_equal(pixels([unb64(answer["images"][0])]), pixels(want))
            assert json.loads(answer["info"])["sd_model_name"] == name
        # POST options chooses the default, as it switches AUTOMATIC1111's model
        assert call(server.url + "/sdapi/v1/options", "POST", {"sd_model_checkpoint": "tiny-sd2"})[0] == 200
        assert call(server.url + "/sdapi/v1/options")[1]["sd_model_checkpoint"] == models[1]["title"]
        third = call(server.url + "/sdapi/v1/txt2img", "POST", small)[1]
        assert third["images"] == second["images"]
        status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", {
            **small, "override_settings": {"sd_model_checkpoint": "sd15"}})
        assert status == 422 and models[0]["title"] in answer["detail"]
        openai = call(server.url + "/v1/images/generations", "POST", {"prompt": "a cat", "model": "tiny-sd1",
                                                                     "size": "64x64", "seed": 1, "steps": 2})[1]
        want = pipelines["tiny-sd1"]("a cat", steps=2, seed=1, width=64, height=64, prompt_weighting=True,
                                     progress=False)
        assert np.array_equal(pixels([unb64(openai["data"][0]["b64_json"])]), pixels(want))
        assert [m["id"] for m in call(server.url + "/v1/models")[1]["data"]] == ["tiny-sd1", "tiny-sd2"]


def test_engines_are_never_batched_together(two):
    worker = Worker(two)  # not started: the jobs wait together
    jobs = [worker.submit(Job(options(p, s), engine)) for p, s, engine in
            (("a cat", 1, "tiny-sd1"), ("a dog", 2, "tiny-sd2"), ("a fox", 3, "tiny-sd1"))]
    worker.start()
    for job in jobs:
        assert job.done.wait(120) and job.error is None, job.error
    worker.stop()
    assert worker.calls == 2


def test_an_engine_that_cannot_load_is_the_servers_fault(engine_dirs, pipelines, tmp_path):
    import shutil

    from ldm_deploy.serve import Engines

    broken = tmp_path / "broken"
    shutil.copytree(engine_dirs["tiny-sd2"], broken)
    victim = next(p for p in broken.iterdir() if p.suffix == ".onnx")
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")  # same size, other contents: caught by SHA-256
    loads = []

    def load(directory, verify=True):
        loads.append(directory)
        return Pipeline.load(directory, verify=verify)

    engines = Engines.read([engine_dirs["tiny-sd1"], broken], load, keep=1)
    engines.pipeline("tiny-sd1")
    small = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64}
    with running(engines) as server:
        for _ in range(2):
            status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", {
                **small, "override_settings": {"sd_model_checkpoint": "tiny-sd2"}})
            assert status == 503 and answer["error"] == "EngineUnavailable" and "tiny-sd2" in answer["detail"]
        assert list(engines.pipes) == ["tiny-sd1"] and len(loads) == 1  # kept; the broken one tried once
        assert call(server.url + "/sdapi/v1/txt2img", "POST", small)[0] == 200


def test_engines_of_one_checkpoint_are_found_by_their_own_titles(engine_dirs):
    """Two engines of one checkpoint (say one exported with --tiling) share its hash: a title or
    name finds its own engine before any hash matches the first."""
    from ldm_deploy.engine.manifest import read_manifest
    from ldm_deploy.serve.engines import Engines

    manifest = read_manifest(engine_dirs["tiny-sd1"])
    engines = Engines({"x": manifest, "x-2": manifest}, {"x": engine_dirs["tiny-sd1"], "x-2": engine_dirs["tiny-sd2"]})
    assert engines.find(engines.title("x-2")) == engines.find("x-2") == "x-2"
    assert engines.find(engines.title("x")) == engines.find(manifest.model.weights_sha256[:10]) == "x"


def test_an_engine_with_merges_is_titled_and_found_by_its_checkpoints_hash(engine_dirs):
    """AUTOMATIC1111 titles a checkpoint by its file's hash, which a LoRA-merged engine's PNGs give as
    their Model hash: titles and sd-models name that one; its weights' hash finds it too."""
    from dataclasses import replace

    from ldm_deploy.engine.manifest import read_manifest
    from ldm_deploy.serve.engines import Engines

    manifest = read_manifest(engine_dirs["tiny-sd1"])
    merged = replace(manifest, model=replace(manifest.model, checkpoint_sha256="abcdef1234" + "0" * 54))
    engines = Engines({"x": merged}, {"x": engine_dirs["tiny-sd1"]})
    assert engines.title("x") == "x [abcdef1234]"
    assert engines.find("abcdef1234") == engines.find("model.safetensors [abcdef1234]") == "x"
    assert engines.find(manifest.model.weights_sha256[:10]) == "x"


def test_checkpoint_names_and_options(two):
    sd2 = two.manifests["tiny-sd2"].model.weights_sha256
    assert two.find(f"tiny-sd2.safetensors [{sd2[:10]}]") == "tiny-sd2"  # as AUTOMATIC1111 titles a file
    assert two.find(sd2[:10]) == two.find("tiny-sd2") == "tiny-sd2" and two.find(None) == "tiny-sd1"
    with running(two) as server:
        current = call(server.url + "/sdapi/v1/options")[1]
        assert call(server.url + "/sdapi/v1/options", "POST", current)[0] == 200  # its own options back
        status, answer, _ = call(server.url + "/sdapi/v1/options", "POST", {"sd_vae": "other-vae.safetensors"})
        assert status == 422 and "sd_vae" in answer["detail"]
        assert call(server.url + "/sdapi/v1/options", "POST", {"sd_model_checkpoint": "tiny-sd2",
                                                                "sd_vae": "Automatic"})[0] == 200
        assert two.default == "tiny-sd2"
