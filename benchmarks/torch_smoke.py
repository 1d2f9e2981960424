"""Where a torch engine breaks on a GPU: each component loaded and run once, each case in its own
process, so that a crash (a segfault kills the process, with no Python error) is reported as a
result, and the cases after it still run.

    python -m benchmarks.torch_smoke --engine E [--json smoke.json] [--toy]

Cases, per component of the engine: load the `.pt2` with AOTInductor's single-threaded runner
(what the backend uses on CUDA, for graph capture) and with its default runner, then one call on
random inputs shaped by the component's spec at the engine's tuned sizes (CFG batch). `--toy` adds
a control: a two-layer model compiled, packaged and loaded in one process on this machine. Each
child runs with faulthandler on, so a crash leaves its Python stack in the log.

Written after the first GPU run of a torch engine (H200, torch 2.11): both `Pipeline.load` users
died with SIGSEGV before their first log line, and nothing said where.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time

CHILD = textwrap.dedent("""
    import sys, time, torch
    from ldm_deploy.engine.manifest import read_manifest
    from ldm_deploy.export.components import example_inputs
    engine, name, single = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    m = read_manifest(engine)
    spec = m.specs()[name]
    dims = {k: r.opt for k, r in m.dims.items()} | {"cfg": 2}
    device = m.build.get("device", "cpu")
    inputs = [t.to(device) for t in example_inputs(spec, dims)]
    print("inputs", [tuple(t.shape) for t in inputs], flush=True)
    t = time.perf_counter()
    runner = torch._inductor.aoti_load_package(f"{engine}/{name}.pt2", run_single_threaded=single)
    print(f"loaded in {time.perf_counter() - t:.1f} s", flush=True)
    with torch.inference_mode():
        out = runner(*inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    outs = out if isinstance(out, (list, tuple)) else [out]
    print("ran", [(tuple(o.shape), str(o.dtype), bool(torch.isfinite(o).all())) for o in outs], flush=True)
""")

TOY = textwrap.dedent("""
    import tempfile, torch
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda().half()
    x = torch.randn(4, 64, device="cuda", dtype=torch.half)
    program = torch.export.export(model, (x,))
    path = tempfile.mkdtemp() + "/toy.pt2"
    torch._inductor.aoti_compile_and_package(program, package_path=path)
    print("compiled", flush=True)
    for single in (True, False):
        runner = torch._inductor.aoti_load_package(path, run_single_threaded=single)
        err = (runner(x) - model(x)).abs().max().item()
        print(f"run_single_threaded={single}: max abs diff vs eager {err:.2e}", flush=True)
""")


def run_case(code: str, args: list[str], timeout: float) -> dict:
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code, *args], capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    status = "ok" if p.returncode == 0 else (
        f"killed by signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}")
    return {"status": status, "seconds": round(time.perf_counter() - t, 1), "log": lines[-25:]}


def save(args, manifest, cases: dict) -> None:
    """Rewritten after every case: a run cut short by its time limit keeps what it found."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"engine": args.engine, "build": manifest.build, "cases": cases}, f, indent=2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--json", default=None)
    p.add_argument("--toy", action="store_true", help="CUDA engines: also compile and load a toy model here")
    p.add_argument("--timeout", type=float, default=120, help="seconds per case")
    args = p.parse_args(argv)

    from ldm_deploy.engine.manifest import read_manifest

    manifest = read_manifest(args.engine)
    cases = {}
    if args.toy and manifest.build.get("device") == "cuda":
        cases["toy model"] = run_case(TOY, [], args.timeout)
        print(f"toy model: {cases['toy model']['status']}", flush=True)
        if cases["toy model"]["status"] != "ok":
            print("\n".join("    " + ln for ln in cases["toy model"]["log"]), flush=True)
        save(args, manifest, cases)
    modes = manifest.build.get("modes", {})
    for name in manifest.files:
        if modes.get(name, "aoti") != "aoti":
            print(f"{name}: no AOTInductor package in this engine ({modes[name]}); not loaded here", flush=True)
        elif not name.endswith("tokenizer") and f"{name}.pt2" in manifest.files[name]:
            for single in (True, False):
                case = f"{name} (run_single_threaded={single})"
                cases[case] = run_case(CHILD, [args.engine, name, "1" if single else "0"], args.timeout)
                print(f"{case}: {cases[case]['status']}", flush=True)
                if cases[case]["status"] != "ok":
                    print("\n".join("    " + ln for ln in cases[case]["log"]), flush=True)
                save(args, manifest, cases)
    save(args, manifest, cases)
    return 0 if all(c["status"] == "ok" for c in cases.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
