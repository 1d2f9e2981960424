"""`ldm-bench`: an engine's latency, throughput and memory against diffusers, side by side.

The benchmark code lives in `benchmarks/` beside the package (it needs torch and diffusers,
which the runtime does not). An editable install (`pip install -e .`) or a source checkout
finds it there; a wheel install says so.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm_deploy.cli.common import run_main, setup_logging
from ldm_deploy.errors import UserError

log = logging.getLogger("ldm-bench")


def benchmarks_root() -> Path:
    """The source checkout holding `benchmarks/`, put first on sys.path (children inherit it)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "bench.py").is_file():
        raise UserError(
            f"ldm-bench needs the benchmarks/ folder of a source checkout, and {root} has none; "
            "install ldm-deploy from a checkout with: pip install -e '.[bench]'"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-bench", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--engine", help="engine directory made by ldm-export (contender 'ours')")
    p.add_argument("--model", help="the diffusers folder the engine was made from (the peers' weights)")
    p.add_argument("--contenders", default=None,
                   help="comma-separated: ours, ours:VARIANT (openvino, openvino-bf16, openvino-static: an "
                        "ONNX engine on OpenVINO, fp32, bf16, or compiled for the call's exact sizes; eager, "
                        "compiled: a torch engine's exported programs without / with torch.compile), "
                        "diffusers, compile:MODE (default: ours,diffusers on the CPU; diffusers,compile:default "
                        "and ours if --engine on CUDA)")
    p.add_argument("--baseline", default=None,
                   help="the contender every ratio divides by (default: diffusers, or the first contender "
                        "where diffusers is not one)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5, help="> 1 runs classifier-free guidance (U-Net batch 2B)")
    p.add_argument("--sampler", default="dpmpp_2m_karras")
    p.add_argument("--batch", type=int, default=1, help="images per call; images/s is measured at this batch")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every contender (default: each library's own)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="steps per warm-up call (default: --steps; 2 is enough on the CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls; stages report the median (default 3)")
    p.add_argument("--rounds", type=int, default=1,
                   help="contenders take turns this many times (A B A B), samples pooled: spreads a "
                        "shared machine's drift over all of them (default 1)")
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    p.add_argument("--negative-prompt", default=None,
                   help="default 'blurry, low quality'; none at --guidance 1 or less, where it does nothing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run; contenders that would start with too little are skipped")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--chart", default=None, help="write a PNG chart here (needs matplotlib)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def default_contenders(args) -> tuple[str, ...]:
    if args.contenders:
        return tuple(n.strip() for n in args.contenders.split(",") if n.strip())
    peers = ("diffusers", "compile:default") if args.device == "cuda" else ("diffusers",)
    return (("ours",) if args.engine else ()) + peers


CHART_FORMATS = (".png", ".svg", ".pdf")  # what matplotlib writes without extra packages


def check_outputs(**paths: str | None) -> None:
    """--json and --chart's folders, before anything is measured."""
    from ldm_deploy.writable import check_folder

    for flag, path in paths.items():
        if path is None:
            continue
        if Path(path).is_dir():
            example = Path(path) / ("bench.json" if flag == "json" else "bench.png")
            raise UserError(f"--{flag} {path} is a folder; give a file name (e.g. {example})")
        if flag == "chart" and Path(path).suffix.lower() not in CHART_FORMATS:
            raise UserError(f"--chart {path}: charts are written as {', '.join(CHART_FORMATS)}; end the name in one")
        check_folder(path, f"--{flag}", in_place=True)  # (written where it is: /dev/stdout too)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    failed = []

    def go():
        benchmarks_root()
        from benchmarks import bench, report
        from benchmarks.config import BenchConfig

        contenders = default_contenders(args)
        baseline = args.baseline or ("diffusers" if "diffusers" in contenders or not contenders else contenders[0])
        cfg = BenchConfig(
            engine=args.engine, model=args.model, contenders=contenders, baseline=baseline,
            device=args.device, width=args.width, height=args.height, steps=args.steps, guidance=args.guidance,
            sampler=args.sampler, batch=args.batch, threads=args.threads, warmup=args.warmup,
            warmup_steps=args.warmup_steps, repeats=args.repeats, rounds=args.rounds, prompt=args.prompt,
            negative_prompt=args.negative_prompt if args.negative_prompt is not None else
            "" if args.guidance <= 1 else "blurry, low quality", seed=args.seed, time_budget_s=args.time_budget,
        )
        check_outputs(json=args.json, chart=args.chart)
        if args.warmup == 0:
            log.warning("--warmup 0 times each contender's first call, with its one-time costs (graph optimisation, "
                        "allocation, compilation): the ratios are not those of a warm server")
        writers = [(args.json, bench.write_json)] if args.json else []
        if args.chart:
            from benchmarks import chart

            try:
                chart.check_available()
            except ImportError as e:
                raise UserError(str(e)) from None
            writers.append((args.chart, chart.write_chart))
        done: set[str] = set()

        def save(results: dict, final: bool = False) -> None:
            for name, c in results["contenders"].items():
                if name not in done and (final or c.get("error") != bench.PENDING):
                    done.add(name)
                    log.info("%s", report.one_line(name, c))
            for path, write in writers:
                try:
                    write(results, path)
                except OSError as e:  # (checked before measuring; the disk may fill since)
                    raise UserError(f"cannot write {path}: {e.strerror or e}") from None

        results = bench.run(cfg, on_progress=save)
        save(results, final=True)
        print(report.render(results), flush=True)
        for path in filter(None, (args.json, args.chart)):
            log.info("wrote %s", path)
        failed.extend(n for n, c in results["contenders"].items() if "error" in c)

    code = run_main(go, "ldm-bench")
    if code == 0 and failed:
        print(f"ldm-bench: not measured: {', '.join(failed)}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
