"""ldm-serve: an engine behind HTTP, with AUTOMATIC1111's API and OpenAI's image API.

    server = serve.build(pipe, ("127.0.0.1", 7860))   # a Server; server.serve_forever()

server.py: the HTTP server; worker.py: the one thread that draws, batching requests;
a1111.py / a1111_request.py: AUTOMATIC1111's /sdapi/v1; openai_images.py: /v1/images/generations.
"""

from __future__ import annotations

from ldm_deploy.serve.server import App, Auth, Route, Server, plain_error
from ldm_deploy.serve.worker import Worker


def build(pipe, address: tuple[str, int], auth: Auth = Auth(), queue_size: int = 16, max_batch: int | None = None,
          max_body: int = 64 << 20) -> Server:
    """A server (not yet serving) of `pipe` at `address` (port 0: any free one), its worker
    started; server.worker.stop() after server.shutdown() finishes the jobs waiting."""
    from ldm_deploy.serve.a1111 import A1111
    from ldm_deploy.serve.openai_images import OpenAIImages

    worker = Worker(pipe, queue_size, max_batch).start()
    routes = {**A1111(worker).routes(), **OpenAIImages(worker).routes()}

    def health(_):
        progress, waiting = worker.snapshot()
        return 200, {"status": "ok", "engine": str(pipe.engine_dir), "waiting": waiting,
                     "running": progress.running, "served": worker.served}

    def docs(_):
        return 200, {"endpoints": sorted(f"{m} {p}" for m, p in routes)}

    routes[("GET", "/health")] = Route(health, plain_error)
    routes[("GET", "/docs")] = Route(docs, plain_error)
    server = Server(address, App(routes, auth, max_body))
    server.worker = worker
    return server
