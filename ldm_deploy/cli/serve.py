"""`ldm-serve`: an engine behind HTTP: AUTOMATIC1111's API (/sdapi/v1/txt2img, img2img, ...) and
OpenAI's image API (/v1/images/generations, /v1/images/edits), requests drawn one call at a time by one worker,
waiting txt2img requests batched together."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time

from ldm_deploy.cli.common import add_model_options, add_size_options, run_main, setup_logging
from ldm_deploy.errors import UserError
from ldm_deploy.serve.engines import Engines, EngineUnavailable
from ldm_deploy.serve.server import Auth

log = logging.getLogger("ldm-serve")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-serve", description=__doc__.split(": ", 1)[1])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--engine", action="append", default=None,
                       help="engine directory made by ldm-export; repeat to serve several (the first is the default; "
                            "requests choose by override_settings.sd_model_checkpoint, or OpenAI's model)")
    which.add_argument("--model", help="diffusers folder or .safetensors checkpoint, exported into the cache on "
                       "first use as ldm-run --model does (neither: the bundled shapes model)")
    m = p.add_argument_group("with --model (set into its cached engine, as ldm-export does)")
    add_model_options(m)
    add_size_options(m)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 for every interface, with --api-auth or --api-key)")
    p.add_argument("--port", type=int, default=7860, help="default 7860, AUTOMATIC1111's")
    p.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER:PASS...]",
                   help="HTTP Basic credentials, as AUTOMATIC1111's --api-auth (or $LDM_SERVE_API_AUTH)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="a Bearer key, as OpenAI clients send it (or $LDM_SERVE_API_KEY, kept out of `ps`)")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait; more get 503 (default 16)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="images one call draws at most when batching waiting requests (default: the engine's "
                        "largest batch, ldm-export --max-batch; 1: no batching)")
    p.add_argument("--max-body-mb", type=float, default=64, help="largest request body (default 64 MB)")
    p.add_argument("--max-steps", type=int, default=500, help="most steps a request may ask for (default 500)")
    p.add_argument("--max-images", type=int, default=32, help="most images a request may ask for (default 32)")
    p.add_argument("--max-connections", type=int, default=64,
                   help="connections open at once (each holds a thread); more are answered 503 (default 64)")
    p.add_argument("--keep-loaded", type=int, default=1, metavar="N",
                   help="with several engines: how many stay loaded at once (default 1, as AUTOMATIC1111 keeps "
                        "its checkpoints); the one used longest ago is let go first")
    p.add_argument("--warmup", action="store_true",
                   help="draw one image with the default engine before serving (torch engines compile on their "
                        "first call; other engines on their first request)")
    p.add_argument("--styles-file", default=None, metavar="CSV",
                   help="AUTOMATIC1111's styles.csv (name,prompt,negative_prompt): the saved styles requests may "
                        "name in 'styles' (listed at /sdapi/v1/prompt-styles)")
    p.add_argument("--backend", default="auto", help="as ldm-run's")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime, openvino: CPU threads (default: all)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="as ldm-run's: every engine runs its VAE on tiles (large images in a tile's memory)")
    p.add_argument("--vae-tile-size", type=int, default=None, metavar="PX", help="as ldm-run's")
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of the engine files")
    p.add_argument("--rebuild-stale", action="store_true", help="tensorrt: rebuild plans made for another GPU")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def credentials(args) -> Auth:
    users = []
    text = args.api_auth or os.environ.get("LDM_SERVE_API_AUTH")
    for pair in (text.split(",") if text else []):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user or not password:
            raise UserError(f"--api-auth takes USER:PASS pairs separated by commas, got {pair.strip()!r}")
        users.append((user, password))
    key = args.api_key or os.environ.get("LDM_SERVE_API_KEY")
    return Auth(tuple(users), (key,) if key else ())


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)

    def go():
        from ldm_deploy import serve
        from ldm_deploy.cli.run import engine_dir
        from ldm_deploy.engine import styles
        from ldm_deploy.engine.pipeline import Pipeline

        if not 0 < args.max_body_mb < 1 << 20:  # not inf or nan either
            raise UserError(f"--max-body-mb must be a positive number of megabytes, got {args.max_body_mb}")
        for name in ("queue_size", "max_batch", "threads", "max_steps", "max_images", "max_connections", "keep_loaded"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not 0 <= args.port <= 65535:
            raise UserError(f"--port must be from 0 to 65535, got {args.port}")
        auth = credentials(args)
        check_port(args.host, args.port)  # before minutes of loading a large engine
        saved = styles.read(args.styles_file) if args.styles_file else {}
        if args.engine and len(args.engine) > 1:
            directories = args.engine
            args.engine = args.engine[0]
            engine_dir(args)  # the same refusals as for one (--lora and such with --engine)
        else:
            if args.engine:
                args.engine = args.engine[0]
            directories = [engine_dir(args)]
        options = {"threads": args.threads} if args.threads else {}
        tiling = args.vae_tiling or args.vae_tile_size is not None

        def load(directory, verify=True):
            pipe = Pipeline.load(directory, backend=args.backend, verify=verify and not args.no_verify,
                                 rebuild_stale=args.rebuild_stale, **options)
            if tiling:
                pipe.enable_vae_tiling(args.vae_tile_size)
            return pipe

        engines = Engines.read(directories, load, args.keep_loaded, args.backend)
        if tiling:  # (a bad size said now, not as an engine that cannot load)
            from ldm_deploy.engine.vae_tiling import tile_of

            for manifest in engines.manifests.values():
                tile_of(args.vae_tile_size, manifest.model, manifest.size_multiple)
        # the default loaded now (its mistakes found at once), held by `engines` alone: it is let go
        # of when another takes its place
        try:
            engines.pipeline(engines.default, log_failure=False)
        except EngineUnavailable as e:  # (its message names the re-export)
            raise UserError(f"{e}; ldm-serve loads its default engine (the first --engine) as it starts") from None
        if args.warmup:
            start = time.perf_counter()
            engines.pipeline(engines.default)("warm-up", steps=2, seed=0, progress=False)
            log.info("warmed up %s in %.1f s", engines.default, time.perf_counter() - start)
        try:
            server = serve.build(engines, (args.host, args.port), auth, args.queue_size, args.max_batch,
                                 int(args.max_body_mb * (1 << 20)), args.max_steps, args.max_images,
                                 args.max_connections, saved)
        except OSError as e:
            raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror}; pass another --port "
                            "(or --host)") from None
        if args.host not in ("127.0.0.1", "localhost", "::1") and not (auth.users or auth.keys):
            log.warning("listening on %s without --api-auth or --api-key: anyone who reaches this machine can "
                        "draw on it", args.host)
        serve_until_stopped(server, ", ".join(engines.titles()) if len(engines.names) > 1 else directories[0])

    return run_main(go, "ldm-serve")


def check_port(host: str, port: int) -> None:
    """Refuse an address already taken (another server on --port): bound once and let go, as
    the server binds it (port 0: any free one, never taken)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's allow_reuse_address
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; pass another --port (or --host)") from None


def serve_until_stopped(server, directory) -> None:
    """Serve until SIGTERM or Ctrl+C; then stop listening, finish the call running (the requests
    still waiting are answered 503, to be sent again elsewhere), answer, and return."""
    stopping = []

    def stop(signum, frame):
        if stopping:  # once is enough (a supervisor may pass the signal on as well)
            return
        stopping.append(signum)
        log.info("stopping: finishing the call running; the requests waiting are answered 503")
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    log.info("serving %s on %s: AUTOMATIC1111's API at /sdapi/v1 (txt2img, img2img, ...), OpenAI's at "
             "/v1/images/generations and /edits; GET /docs lists the endpoints. Ctrl+C stops", directory, server.url)
    try:
        server.serve_forever()
    finally:
        server.socket.close()  # new connections are refused at once, not left in the backlog
        server.worker.stop(drain=False)
        deadline = time.monotonic() + 30
        while server.app.active and time.monotonic() < deadline:  # answers being written
            time.sleep(0.05)
        server.server_close()
        for s, handler in previous.items():  # (after the drain: a repeated signal does not cut it short)
            signal.signal(s, handler)
        log.info("stopped after %d requests", server.worker.served)


if __name__ == "__main__":
    sys.exit(main())
