"""One thread runs the pipeline; the HTTP threads hand it jobs through a bounded queue.

A GPU serves one call at a time best (ONNX Runtime on the CPU already uses every core), and the
backends are not made for calls from several threads, so a single worker runs every job, in
the order they came. When it is free it takes the first job waiting and, where that job is plain
txt2img, every other waiting job that differs from it only in prompt, negative prompt, seed and
image count, up to the engine's batch size, and draws them in one call: more images per U-Net
step, and each the image it would be alone (its noise comes from its own seed; only prompts of
one 77-token chunk are batched, since longer ones would be padded to a common length).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ldm_deploy.engine.prompt_schedule import schedule
from ldm_deploy.errors import InvalidRequest, UserError
from ldm_deploy.serve.metrics import Metrics
from ldm_deploy.serve.engines import Engines, EngineUnavailable

log = logging.getLogger("ldm-serve")

# Pipeline keywords that may differ between the jobs of one call: each image has its own.
PER_IMAGE = ("prompt", "negative_prompt", "seed", "num_images")
# Keywords whose values are images: such jobs run alone.
PICTURES = ("init_image", "mask", "control_image")


class QueueFull(Exception):
    """As many jobs wait as the server takes (ldm-serve --queue-size)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new jobs."""


class Interrupted(Exception):
    """The call was stopped by /sdapi/v1/interrupt."""


@dataclass
class Job:
    """One request's Pipeline call: `options` are Pipeline keywords, with "seed" an int (the
    first image's) and "num_images" set."""

    options: dict
    engine: str | None = None  # the engine's name (engines.py); None: the default, set by submit()
    images: list | None = None  # the result: PIL images with their parameters
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    group: tuple | None = None  # what jobs of one call share (None: it runs alone); set by submit()

    @property
    def count(self) -> int:
        return self.options["num_images"]

    def seeds(self) -> list[int]:
        return [self.options["seed"] + i for i in range(self.count)]


@dataclass
class Progress:
    """What /sdapi/v1/progress reports: the job running and its step."""

    job_count: int = 0  # running and waiting
    running: int = 0  # jobs in the call running now
    started: float | None = None  # when the running call began (time.time())
    step: int = 0  # of the running pass (a hires fix's second pass, a call's later chunks start again)
    steps: int = 0


class Worker:
    """Runs jobs on the engines (an Engines, or one Pipeline) in one thread. submit() queues a job
    (QueueFull when `queue_size` wait already); the job's `done` is set when its images or its
    error are in."""

    def __init__(self, engines, queue_size: int = 16, max_batch: int | None = None, max_steps: int = 500,
                 max_images: int = 32):
        self.engines = engines if isinstance(engines, Engines) else Engines.of(engines)
        self.queue_size = queue_size
        self.max_batch = max_batch  # images a call draws at most (None: each engine's largest batch)
        self.max_steps, self.max_images = max_steps, max_images  # a request's, at most
        self.interrupting = False  # stop the running call at its next step
        self.waiting: deque[Job] = deque()
        self.lock = threading.Condition()
        self.progress = Progress()
        self.stopping = False
        self.served = 0  # jobs finished, for /health
        self.calls = 0  # Pipeline calls made (fewer than jobs where jobs were batched)
        self.metrics = Metrics()  # GET /metrics
        self.thread = threading.Thread(target=self.loop, name="ldm-serve-worker", daemon=True)

    def start(self) -> "Worker":
        self.thread.start()
        return self

    def room(self) -> None:
        """QueueFull (or ShuttingDown) now, before a request's images are decoded, where submit()
        would refuse it."""
        with self.lock:
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.queue_size:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already (ldm-serve --queue-size); "
                                "try again shortly")

    def submit(self, job: Job) -> Job:
        """Queue a job (its size checked, its batch group worked out here, outside the lock)."""
        self.check(job.options)
        job.engine = job.engine or self.engines.default
        job.group = self.group(job.options, job.engine)
        with self.lock:  # (a reentrant lock: room() takes it too)
            self.room()
            self.waiting.append(job)
            self.progress.job_count += 1
            self.lock.notify()
        return job

    def stop(self, timeout: float | None = None, drain: bool = True) -> None:
        """Take no new jobs; finish those waiting (drain) or answer them ShuttingDown, finish the
        running call, then end the thread."""
        with self.lock:
            self.stopping = True
            if not drain:
                for job in self.waiting:
                    job.error = ShuttingDown("the server is shutting down; send the request again to another")
                    job.done.set()
                self.progress.job_count -= len(self.waiting)
                self.waiting.clear()
            self.lock.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def interrupt(self) -> None:
        """Stop the running call at its next step (a CUDA-graph backend: at the end of its pass)."""
        with self.lock:
            if self.progress.running:
                self.interrupting = True

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def snapshot(self) -> tuple[Progress, int]:
        """(a copy of the progress, jobs waiting), consistent with each other."""
        with self.lock:
            return Progress(**vars(self.progress)), len(self.waiting)

    def loop(self) -> None:
        while True:
            with self.lock:
                while not self.waiting and not self.stopping:
                    self.lock.wait()
                if not self.waiting:
                    return
                jobs = self.take()
                self.progress = Progress(job_count=self.progress.job_count, running=len(jobs), started=time.time())
            try:
                self.run(jobs)
            except BaseException as e:  # our bug: every job taken is answered, and the thread goes on
                log.exception("the worker failed")
                for job in jobs:
                    job.error = job.error or e
            finally:
                with self.lock:
                    self.progress = Progress(job_count=self.progress.job_count - len(jobs))
                    self.served += len(jobs)
                self.metrics.finished(len(jobs))
                for job in jobs:
                    job.done.set()

    def take(self) -> list[Job]:
        """The first job waiting and those that can share its call (called with the lock held)."""
        head = self.waiting.popleft()
        jobs, total = [head], head.count
        if head.group is None:
            return jobs
        most = self.max_batch or self.engines.manifests[head.engine].dims["batch"].max
        for job in list(self.waiting):
            if total + job.count > most:
                continue
            if job.group == head.group:
                self.waiting.remove(job)
                jobs.append(job)
                total += job.count
        return jobs

    def check(self, options: dict) -> None:
        """A request's size against the server's limits (ldm-serve --max-steps, --max-images)."""
        for key, most in (("steps", self.max_steps), ("hires_steps", self.max_steps),
                          ("num_images", self.max_images)):
            value = options.get(key)
            if isinstance(value, int) and value > most:
                flag = "--max-images" if key == "num_images" else "--max-steps"
                raise InvalidRequest(f"{key} {value} is more than this server draws for one request ({most}; "
                                     f"ldm-serve {flag})")

    def group(self, options: dict, engine: str) -> tuple | None:
        """What a job's call is made of but its prompts and seeds; None where it must run alone:
        images in it, a prompt of more than one chunk or with prompt editing (a call's prompts
        share a chunk count and a schedule), variation seeds (a job's images share its seed), a
        setting that is not a plain value."""
        try:
            if options.get("variation_strength") or not self.one_chunk(options, engine):
                return None
            shared = tuple(sorted((k, v) for k, v in options.items() if k not in PER_IMAGE))
            hash(shared)
            return shared + (("zero_negative", options.get("negative_prompt") is None), ("engine", engine))
        except Exception:  # unhashable values, texts the tokenizer refuses, ...: the job runs alone
            return None

    def one_chunk(self, options: dict, engine: str) -> bool:
        if any(options.get(k) is not None for k in PICTURES):
            return False
        weighting = bool(options.get("prompt_weighting"))
        steps = options.get("steps", 30)
        for text in (options.get("prompt"), options.get("negative_prompt") or ""):
            if not isinstance(text, str):
                return False
            if weighting and (len(schedule(text, steps)) != 1 or "<" in text):  # edited, or extra-network tags
                return False
            if len(self.engines.tokenizer(engine).chunks(text, weighting, 1 << 20)) != 1:
                return False
        return True

    def run(self, jobs: list[Job]) -> None:
        """One call for the jobs (several: their prompts and seeds side by side); a call of several
        that fails is run again job by job, so that one job's mistake is only its own."""
        if len(jobs) > 1:
            try:
                options = dict(jobs[0].options)
                options["prompt"] = [j.options["prompt"] for j in jobs for _ in range(j.count)]
                if options.get("negative_prompt") is not None:
                    options["negative_prompt"] = [j.options["negative_prompt"] for j in jobs for _ in range(j.count)]
                options["seed"] = [s for j in jobs for s in j.seeds()]
                options["num_images"] = 1
                images = self.call(options, jobs[0].engine)
                for job in jobs:
                    job.images, images = images[: job.count], images[job.count:]
                log.info("drew %d requests in one call (%d images)", len(jobs), sum(j.count for j in jobs))
                return
            except (Interrupted, EngineUnavailable) as e:
                for job in jobs:
                    job.error = e
                return
            except Exception as e:  # a mistake in one of them (or our bug): each alone says whose
                log.info("the shared call of %d requests failed (%s: %s); drawing each alone", len(jobs),
                         type(e).__name__, e)
        for job in jobs:
            try:
                job.images = self.call(job.options, job.engine)
            except (UserError, EngineUnavailable) as e:
                job.error = e
            except Interrupted as e:  # this job only: the next one runs
                job.error, self.interrupting = e, False
            except Exception as e:  # our bug: kept for the log, answered as a server error
                log.exception("the request failed")
                job.error = e

    def call(self, options: dict, engine: str) -> list:
        def on_step(done: int, total: int) -> None:
            with self.lock:
                self.progress.step, self.progress.steps = done, total
                if self.interrupting:
                    raise Interrupted("interrupted by /sdapi/v1/interrupt (or /skip)")

        if not isinstance(options.get("prompt"), (str, list)):
            raise InvalidRequest("prompt must be text")
        with self.lock:  # an interrupt is for the call running when it came, not this one
            self.interrupting = False
        pipe = self.engines.pipeline(engine)
        if options.get("refiner") is not None:  # another engine's name: loaded too (the first held here)
            options = {**options, "refiner": self.engines.pipeline(options["refiner"])}
        self.calls += 1
        start = time.perf_counter()
        images = pipe(**options, progress=on_step)
        self.metrics.generation(engine, len(images), time.perf_counter() - start)
        return images
