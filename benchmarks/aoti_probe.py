"""Why do AOTInductor packages crash on the lent GPU machines? The exporter's toy package
(`ldm_deploy.export.aoti_check.probe`) died of SIGSEGV while loading on the lent H100 and H200
(torch 2.11, CUDA 13). This runs that probe under several AOTInductor settings, each in a process
of its own, and reports for each one how far it got (compiled, loaded, ran, matched) or how it
died: the setting that works, if one does, is what the exporter should use there.

    python -m benchmarks.aoti_probe --json out.json [--device cuda] [--jobs 4] [--settings a,b]

The child side: python -m benchmarks.aoti_probe --child SETTING DEVICE
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from ldm_deploy.export.aoti_check import describe, probe, toy

# name -> (torch._inductor.config.aot_inductor patches, single-threaded runner?); each package is
# loaded in a fresh process, as the exporter does, except "same-process"
SETTINGS = {
    "as-exported": ({}, True),  # what the exporter's probe does on CUDA
    "same-process": ({}, True),  # loaded by the process that compiled it
    "multi-threaded-runner": ({}, False),
    "no-consts-asm": ({"use_consts_asm_build": False}, True),
    "kernels-in-so": ({"embed_kernel_binary": True}, True),
    "no-precompiled-headers": ({"precompile_headers": False}, True),
    "no-caching-allocator": ({"weight_use_caching_allocator": False}, True),
}


def child(setting: str, device: str) -> int:
    """Compile the toy under `setting` and run it; prints the outcome's sentence, or "ok"."""
    import tempfile
    from pathlib import Path

    import torch

    patches, single = SETTINGS[setting]
    configs = {f"aot_inductor.{k}": v for k, v in patches.items()}
    if setting != "same-process":
        outcome = probe(device, configs, single)
        print("compiled" if not (outcome or "").startswith("failed to compile") else "", flush=True)
        print(f"outcome: {outcome or 'ok'}", flush=True)
        return 0
    # A crash here kills this process: the parent reads the phase it had reached (describe()).
    model, x = toy(device)
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "toy.pt2"
        torch._inductor.aoti_compile_and_package(torch.export.export(model, (x,)), package_path=str(path))
        print("compiled", flush=True)
        print("loading", flush=True)
        runner = torch._inductor.aoti_load_package(str(path), run_single_threaded=single)
        print("case=toy calling", flush=True)
        out = runner(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        if device == "cuda":
            torch.cuda.synchronize()
        print("checking", flush=True)
        want = model(x)
    err = ((out.float() - want).abs().max() / want.abs().max()).item()
    print(f"outcome: {'ok' if err < 1e-3 else f'output differs from eager by {err:.2e}'}", flush=True)
    return 0


def run_setting(setting: str, device: str, timeout: float) -> dict:
    t = time.perf_counter()
    cmd = [sys.executable, "-X", "faulthandler", "-m", "benchmarks.aoti_probe", "--child", setting, device]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"outcome": f"did not finish in {timeout:.0f} s", "seconds": round(time.perf_counter() - t, 1)}
    said = [ln[len("outcome: "):] for ln in p.stdout.splitlines() if ln.startswith("outcome: ")]
    outcome = said[-1] if said else describe(p.returncode, p.stdout, p.stderr) or "ok"
    result = {"outcome": outcome, "seconds": round(time.perf_counter() - t, 1),
              "compiled": "compiled" in p.stdout.split(), "exit": p.returncode}
    if outcome != "ok":
        result["stderr_tail"] = p.stderr.strip()[-1500:]
    return result


def environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "gdb": shutil.which("gdb"), "cxx": shutil.which("g++") or shutil.which("c++")}
    if info["cxx"]:
        info["cxx_version"] = subprocess.run([info["cxx"], "--version"], capture_output=True,
                                             text=True).stdout.splitlines()[0]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[2])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--timeout", type=float, default=240, help="seconds per setting")
    args = p.parse_args(argv)
    names = [n for n in args.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        p.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    report = {"device": args.device, "environment": environment(), "settings": {}}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {n: pool.submit(run_setting, n, args.device, args.timeout) for n in names}
        for name in names:
            patches, single = SETTINGS[name]
            report["settings"][name] = {"patches": patches, "single_threaded": single, **futures[name].result()}
            print(f"aoti_probe: {name}: {report['settings'][name]['outcome']}", file=sys.stderr, flush=True)
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
