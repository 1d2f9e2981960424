"""ldm-serve's counters for Prometheus: GET /metrics, in its text format (version 0.0.4).

    ldm_serve_requests_total{method, path, status}   counter: answers given (path: an endpoint's, or
                                                     "other" for paths not served, so the labels stay few)
    ldm_serve_request_seconds{path}                  histogram: from the request read to its answer made
    ldm_serve_generation_seconds{engine}             histogram: one Pipeline call (a batch of jobs)
    ldm_serve_images_total{engine}                   counter: images drawn
    ldm_serve_jobs_total                             counter: requests the worker finished (ok or not)
    ldm_serve_pipeline_calls_total                   counter: Pipeline calls (fewer where requests were batched)
    ldm_serve_refused_total                          counter: connections turned away past --max-connections (503)
    ldm_serve_queue_waiting, ldm_serve_running       gauges: requests waiting, requests in the running call
"""

from __future__ import annotations

import bisect
import threading

# Seconds: a tiny engine's step to a 1024 px SDXL image with a hires pass on a CPU.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Text(str):
    """An answer that is not JSON: sent as it is, with its content type."""

    content_type = CONTENT_TYPE


class Histogram:
    def __init__(self):
        self.counts = [0] * (len(BUCKETS) + 1)  # the last: above every bucket
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip((*BUCKETS, "+Inf"), self.counts):
            total += count
            le = f'le="{bound}"'
            out.append(f"{name}_bucket{{{labels + ',' if labels else ''}{le}}} {total}")
        brace = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{brace} {self.sum:.6f}", f"{name}_count{brace} {total}"]


class Metrics:
    """Thread-safe counters; the HTTP threads and the worker write, /metrics reads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.request_seconds: dict[str, Histogram] = {}
        self.generation_seconds: dict[str, Histogram] = {}
        self.images: dict[str, int] = {}
        self.jobs = self.calls = self.refused = 0

    def request(self, method: str, path: str, status: int, seconds: float) -> None:
        with self.lock:
            key = (method, path, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.request_seconds.setdefault(path, Histogram()).observe(seconds)

    def generation(self, engine: str, images: int, seconds: float) -> None:
        with self.lock:
            self.calls += 1
            self.images[engine] = self.images.get(engine, 0) + images
            self.generation_seconds.setdefault(engine, Histogram()).observe(seconds)

    def turned_away(self) -> None:
        with self.lock:
            self.refused += 1

    def finished(self, jobs: int) -> None:
        with self.lock:
            self.jobs += jobs

    def render(self, waiting: int, running: int) -> Text:
        with self.lock:
            out = ["# HELP ldm_serve_requests_total HTTP answers given.", "# TYPE ldm_serve_requests_total counter"]
            for (method, path, status), n in sorted(self.requests.items()):
                out.append(f'ldm_serve_requests_total{{method="{method}",path="{quote(path)}",status="{status}"}} {n}')
            out += ["# HELP ldm_serve_request_seconds Time from a request read to its answer made.",
                    "# TYPE ldm_serve_request_seconds histogram"]
            for path, h in sorted(self.request_seconds.items()):
                out += h.lines("ldm_serve_request_seconds", f'path="{quote(path)}"')
            out += ["# HELP ldm_serve_generation_seconds One Pipeline call (a batch of requests).",
                    "# TYPE ldm_serve_generation_seconds histogram"]
            for engine, h in sorted(self.generation_seconds.items()):
                out += h.lines("ldm_serve_generation_seconds", f'engine="{quote(engine)}"')
            out += ["# HELP ldm_serve_images_total Images drawn.", "# TYPE ldm_serve_images_total counter"]
            out += [f'ldm_serve_images_total{{engine="{quote(e)}"}} {n}' for e, n in sorted(self.images.items())]
            out += ["# HELP ldm_serve_jobs_total Requests the worker finished, drawn or failed.",
                    "# TYPE ldm_serve_jobs_total counter", f"ldm_serve_jobs_total {self.jobs}",
                    "# HELP ldm_serve_pipeline_calls_total Pipeline calls (requests batched share one).",
                    "# TYPE ldm_serve_pipeline_calls_total counter", f"ldm_serve_pipeline_calls_total {self.calls}",
                    "# HELP ldm_serve_refused_total Connections turned away past --max-connections (503).",
                    "# TYPE ldm_serve_refused_total counter", f"ldm_serve_refused_total {self.refused}",
                    "# HELP ldm_serve_queue_waiting Requests waiting for the worker.",
                    "# TYPE ldm_serve_queue_waiting gauge", f"ldm_serve_queue_waiting {waiting}",
                    "# HELP ldm_serve_running Requests in the call being drawn (batched requests share one).",
                    "# TYPE ldm_serve_running gauge", f"ldm_serve_running {running}"]
        return Text("\n".join(out) + "\n")


def quote(value: str) -> str:
    """A label value escaped as the text format wants it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
