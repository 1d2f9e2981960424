"""Why do AOTInductor packages crash on the lent GPU machines? The exporter's toy package
(`ldm_deploy.export.aoti_check.probe`) died of SIGSEGV while loading on the lent H100 and H200
(torch 2.11, CUDA 13). This compiles the same toy under several AOTInductor settings, each in a
process of its own, and reports for each one how far it got (compiled, loaded, ran, matched) or
how it died: the setting that works, if one does, is what the exporter should use there.

    python -m benchmarks.aoti_probe --json out.json [--device cuda] [--jobs 4] [--settings a,b]

The child side: python -m benchmarks.aoti_probe --child SETTING DEVICE DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ldm_deploy.export.aoti_check import describe

# name -> (torch._inductor.config.aot_inductor patches, load in a fresh process?, single-threaded runner?)
SETTINGS = {
    "as-exported": ({}, True, True),  # what the exporter's probe does
    "same-process": ({}, False, True),
    "multi-threaded-runner": ({}, True, False),
    "no-consts-asm": ({"use_consts_asm_build": False}, True, True),
    "kernels-in-so": ({"embed_kernel_binary": True}, True, True),
    "no-precompiled-headers": ({"precompile_headers": False}, True, True),
    "no-caching-allocator": ({"weight_use_caching_allocator": False}, True, True),
    # as-exported, loaded under gdb (where the machine has it): the native stack of the crash
    "gdb-backtrace": ({}, True, True),
}

CHILD_LOAD = """
import sys, torch
path, device, single = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
print("loading", flush=True)
runner = torch._inductor.aoti_load_package(path, run_single_threaded=single)
data = torch.load(sys.argv[4])
print("case=toy calling", flush=True)
with torch.inference_mode():
    out = runner(data["x"].to(device))
out = out[0] if isinstance(out, (list, tuple)) else out
print("checking", flush=True)
err = ((out.float().cpu() - data["y"]).abs().max() / data["y"].abs().max()).item()
if not err < 1e-3:
    print(f"differs by {err:.2e}", file=sys.stderr); sys.exit(3)
print("ok", flush=True)
"""


def child(setting: str, device: str, folder: Path) -> int:
    """Compile the toy under `setting`, then load and run it (here or in a fresh process)."""
    import torch

    patches, fresh, single = SETTINGS[setting]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(device).eval()
    x = torch.randn(4, 64, device=device)
    with torch.no_grad():
        y = model(x)
    path = folder / "toy.pt2"
    print("compiling", flush=True)
    options = {f"aot_inductor.{k}": v for k, v in patches.items()}
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(torch.export.export(model, (x,)), package_path=str(path),
                                                 inductor_configs=options)
    print("compiled", flush=True)
    data = folder / "data.pt"
    torch.save({"x": x.cpu(), "y": y.float().cpu()}, data)
    if fresh:
        cmd = [sys.executable, "-X", "faulthandler", "-c", CHILD_LOAD, str(path), device, "1" if single else "0",
               str(data)]
        if setting == "gdb-backtrace":
            if not shutil.which("gdb"):
                print("no gdb on this machine", file=sys.stderr)
                return 2
            cmd = ["gdb", "-q", "-batch", "-ex", "run", "-ex", "bt 40", "--args", *cmd]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            print("\n".join((p.stdout + p.stderr).splitlines()[-60:]), file=sys.stderr)
            return 1
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        sys.stdout.write(p.stdout)
        sys.stderr.write(p.stderr[-2000:])
        return 0 if p.returncode == 0 else (128 - p.returncode if p.returncode < 0 else p.returncode)
    print("loading", flush=True)
    runner = torch._inductor.aoti_load_package(str(path), run_single_threaded=single)
    print("case=toy calling", flush=True)
    with torch.inference_mode():
        out = runner(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    print("checking", flush=True)
    err = ((out.float() - y).abs().max() / y.abs().max()).item()
    if not err < 1e-3:
        print(f"differs by {err:.2e}", file=sys.stderr)
        return 3
    print("ok", flush=True)
    return 0


def run_setting(setting: str, device: str, timeout: float) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"aoti-{setting}-"))
    t = time.perf_counter()
    try:
        cmd = [sys.executable, "-X", "faulthandler", "-m", "benchmarks.aoti_probe", "--child", setting, device,
               str(folder)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"outcome": f"did not finish in {timeout:.0f} s", "seconds": round(time.perf_counter() - t, 1)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    code = p.returncode
    if code > 128:  # a grandchild's signal, passed on as 128 + its number (child()); describe() wants -signal
        code = 128 - code
    said = p.stdout.split()
    result = {"outcome": describe(code, p.stdout, p.stderr) or "ok", "seconds": round(time.perf_counter() - t, 1),
              "compiled": "compiled" in said, "exit": p.returncode}
    if result["outcome"] != "ok":
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
        return child(argv[1], argv[2], Path(argv[3]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--timeout", type=float, default=300, help="seconds per setting")
    args = p.parse_args(argv)
    names = [n for n in args.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        p.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    report = {"device": args.device, "environment": environment(), "settings": {}}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {n: pool.submit(run_setting, n, args.device, args.timeout) for n in names}
        for name in names:
            report["settings"][name] = {"patches": SETTINGS[name][0], "fresh_process": SETTINGS[name][1],
                                        "single_threaded": SETTINGS[name][2], **futures[name].result()}
            print(f"aoti_probe: {name}: {report['settings'][name]['outcome']}", file=sys.stderr, flush=True)
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
