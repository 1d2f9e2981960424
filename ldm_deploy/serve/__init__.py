"""ldm-serve: an engine behind HTTP, with AUTOMATIC1111's API and OpenAI's image API.

    server = serve.build(pipe, ("127.0.0.1", 7860))   # a Server; server.serve_forever()
    server = serve.build(Engines.read(dirs, load), ...)  # several engines, loaded on first use

server.py: the HTTP server; worker.py: the one thread that draws, batching requests; engines.py:
the engines served, by name;
a1111.py / a1111_request.py: AUTOMATIC1111's /sdapi/v1; openai_images.py: /v1/images/generations.
"""

from __future__ import annotations

from ldm_deploy.serve.server import App, Auth, Route, Server, plain_error
from ldm_deploy.serve.engines import Engines
from ldm_deploy.serve.worker import Worker

__all__ = ["App", "Auth", "Engines", "Route", "Server", "Worker", "build", "plain_error"]


def build(engines, address: tuple[str, int], auth: Auth = Auth(), queue_size: int = 16, max_batch: int | None = None,
          max_body: int = 64 << 20, max_steps: int = 500, max_images: int = 32, max_connections: int = 64,
          styles: dict | None = None) -> Server:
    """A server (not yet serving) of `engines` (an Engines, or one Pipeline) at `address` (port 0:
    any free one), its worker started; server.worker.stop() after server.shutdown() finishes the
    jobs waiting. styles: AUTOMATIC1111's saved styles requests may name (engine.styles.read)."""
    from ldm_deploy.serve.a1111 import A1111
    from ldm_deploy.serve.openai_images import OpenAIImages

    worker = Worker(engines, queue_size, max_batch, max_steps, max_images).start()
    routes = {**A1111(worker, styles).routes(), **OpenAIImages(worker).routes()}

    def health(_):  # open without credentials: says nothing of the machine
        progress, waiting = worker.snapshot()
        status = 200 if worker.alive and not worker.stopping else 503
        return status, {"status": "ok" if status == 200 else "stopping" if worker.stopping else "failed",
                        "waiting": waiting, "running": progress.running, "served": worker.served}

    def docs(_):
        return 200, {"endpoints": sorted(f"{m} {p}" for m, p in routes)}

    def metrics(_):  # Prometheus' text format (metrics.py)
        progress, waiting = worker.snapshot()
        return 200, worker.metrics.render(waiting, progress.running)

    routes[("GET", "/health")] = Route(health, plain_error)
    routes[("GET", "/docs")] = Route(docs, plain_error)
    routes[("GET", "/metrics")] = Route(metrics, plain_error)
    server = Server(address, App(routes, auth, max_body, metrics=worker.metrics), max_connections)
    server.worker = worker
    return server
