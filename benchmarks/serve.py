"""ldm-serve under load: concurrent clients sending txt2img requests, with the waiting requests
batched into one call (the default) against each drawn alone (--max-batch 1), in the same
process on the same engine, rounds alternating so that a drifting machine hurts both alike.

    python -m benchmarks.serve                        # the bundled shapes model, 64 px
    python -m benchmarks.serve --engine DIR --size 512 --steps 20 --clients 4 --requests 4

Prints images/s and each request's latency (median, 95th percentile) per mode, and the ratio of
the batched throughput to the unbatched one."""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=3600) as r:
        return json.loads(r.read())


def load(server, clients: int, requests: int, steps: int, size: int) -> tuple[float, list[float]]:
    """(wall seconds, each request's latency) of `clients` threads sending `requests` each."""
    latencies, errors = [], []

    def client(c: int) -> None:
        for r in range(requests):
            body = {"prompt": f"a {['red', 'blue', 'green', 'white'][(c + r) % 4]} circle on a black background",
                    "steps": steps, "seed": 100 * c + r, "width": size, "height": size, "sampler_name": "DPM++ 2M",
                    "send_images": False}
            start = time.perf_counter()
            try:
                post(server.url + "/sdapi/v1/txt2img", body)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
            latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    return time.perf_counter() - start, latencies


def main(argv=None) -> None:
    from ldm_deploy import Pipeline, serve
    from ldm_deploy.cli.common import setup_logging

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", default=None, help="engine directory (default: the bundled shapes model's)")
    p.add_argument("--size", type=int, default=None, help="image side (default: the engine's)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=6, help="per client and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    setup_logging(False)
    import logging

    logging.getLogger("ldm-serve").setLevel(logging.WARNING)
    if args.engine is None:
        from ldm_deploy import shapes
        from ldm_deploy.cache import engine_for

        args.engine = str(engine_for(shapes.MODEL_DIR, shapes.EXPORT_SETTINGS, "shapes"))
    pipe = Pipeline.load(args.engine, **({"threads": args.threads} if args.threads else {}))
    size = args.size or pipe.default_size[0]
    for n in range(1, pipe.manifest.dims["batch"].max + 1):  # every batch a call may draw (torch: compiles)
        pipe(["warm-up"] * n, steps=2, width=size, height=size, progress=False)
    results = {"batched": [], "alone": []}
    for _ in range(args.rounds):
        for mode, max_batch in (("alone", 1), ("batched", None)):
            server = serve.build(pipe, ("127.0.0.1", 0), queue_size=args.clients * 2, max_batch=max_batch)
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            try:
                wall, latencies = load(server, args.clients, args.requests, args.steps, size)
                results[mode].append((wall, latencies, server.worker.calls))
            finally:
                server.shutdown()
                server.worker.stop()
                server.server_close()
    n = args.clients * args.requests
    print(f"engine {args.engine}, {size}x{size}, {args.steps} steps, {args.clients} clients x {args.requests} "
          f"requests, {args.rounds} rounds, batch up to {pipe.manifest.dims['batch'].max}")
    print("| mode | images/s (each round) | latency median s | latency p95 s | calls per round |")
    print("|---|---|---|---|---|")
    best = {}
    for mode, runs in results.items():
        rates = [n / wall for wall, _, _ in runs]
        lat = sorted(x for _, latencies, _ in runs for x in latencies)
        best[mode] = max(rates)
        print(f"| {mode} | {', '.join(f'{r:.2f}' for r in rates)} | {statistics.median(lat):.3f} | "
              f"{lat[int(0.95 * (len(lat) - 1))]:.3f} | {', '.join(str(c) for _, _, c in runs)} |")
    print(f"batched / alone throughput (best rounds): {best['batched'] / best['alone']:.2f}x")
    if args.json:
        record = {"engine": args.engine, "size": size, "steps": args.steps, "clients": args.clients,
                  "requests": args.requests, "ratio": best["batched"] / best["alone"],
                  "rounds": {mode: [{"wall_s": w, "latencies_s": lat, "calls": c} for w, lat, c in runs]
                             for mode, runs in results.items()}}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
