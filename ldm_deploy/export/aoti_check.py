"""Run a freshly compiled AOTInductor package once, in a process of its own, before an engine
ships it.

The first torch engines built on a GPU (H200, torch 2.11) died with SIGSEGV when loaded or
first called, and nothing said which component or where. A segfault cannot be caught in the
process it happens in, so the exporter loads each package in a fresh interpreter (as the
backend will: the single-threaded runner on CUDA), calls it on the trace's example inputs and
on the smallest ones the engine takes (one image, no guidance: the usual call, and one that
AOTInductor's own input checks refuse, having compiled for sizes of 2 and more), and compares
with the exported program run eagerly. Whatever goes wrong (a signal, an exception, a wrong or
non-finite result) comes back as one sentence, and the exporter falls back to the uncompiled
program for that component, saying so.

    python -m ldm_deploy.export.aoti_check PACKAGE CASES.pt DEVICE SINGLE_THREADED TOLERANCE

(the child side; CASES.pt holds each case's name, inputs and expected outputs).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

PHASES = {"loading": "loading it", "calling": "running it", "checking": "comparing its outputs"}


def check_package(path: Path, cases: dict[str, tuple], device: str, tolerance: float,
                  timeout: float = 900, single_threaded: bool | None = None) -> str | None:
    """None if the package at `path` loads and reproduces, for each case (a name_in_one_word ->
    (inputs, expected outputs)), the expected outputs (to `tolerance`, relative to each output's largest
    magnitude) in a fresh process; otherwise what went wrong. single_threaded: the runner to load
    it with; None: the backend's (single-threaded on CUDA, which graph capture needs)."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "cases.pt"
        torch.save({name: {"inputs": [t.detach().cpu() for t in inputs],
                           "expected": [t.detach().float().cpu() for t in expected]}
                    for name, (inputs, expected) in cases.items()}, file)
        single = device == "cuda" if single_threaded is None else single_threaded
        cmd = [sys.executable, "-X", "faulthandler", "-m", __name__, str(path), str(file), device,
               "1" if single else "0", str(tolerance)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"did not finish its test run in {timeout:.0f} s"
    if p.returncode == -signal.SIGINT:  # Ctrl-C reached the child too: the user's, not the package's
        raise KeyboardInterrupt
    return describe(p.returncode, p.stdout, p.stderr)


def toy(device: str) -> tuple:
    """The probe's two-layer model (eval mode) and an input for it."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(device).eval()
    return model, torch.randn(4, 64, device=device)


def probe(device: str, inductor_configs: dict | None = None, single_threaded: bool | None = None) -> str | None:
    """Does AOTInductor work on this machine at all? A two-layer model compiled, packaged and
    test-run like a component (seconds): None if it ran and matched, else what went wrong. On
    the lent H100 and H200 (torch 2.11, CUDA 13) every package, a toy's too, died of SIGSEGV while
    loading, after minutes of compiling the real components: the exporter asks this first.
    inductor_configs and single_threaded try other settings (benchmarks/aoti_probe.py)."""
    import torch

    model, x = toy(device)
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.pt2"
        try:
            torch._inductor.aoti_compile_and_package(torch.export.export(model, (x,)), package_path=str(path),
                                                     inductor_configs=inductor_configs or {})
        except Exception as e:  # an Inductor failure: report it, as for a component
            return f"failed to compile ({type(e).__name__}: {str(e)[:300]})"
        return check_package(path, {"toy": ((x,), [model(x)])}, device, 1e-3, timeout=300,
                             single_threaded=single_threaded)


def describe(returncode: int, stdout: str, stderr: str) -> str | None:
    """The child's outcome as a sentence: None for success."""
    said = stdout.split()
    phase = next((PHASES[w] for w in reversed(said) if w in PHASES), "starting")
    case = next((w.split("=", 1)[1] for w in reversed(said) if w.startswith("case=")), None)
    if returncode == 0:
        return None
    if "ok" in said:
        phase = "exiting, after a correct run"
    elif case and phase != "loading it":
        phase += " " + case.replace("_", " ")
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"crashed ({name}) while {phase}"
    last = next((ln.strip() for ln in reversed(stderr.splitlines()) if ln.strip()), "")
    return f"failed while {phase}: {last[:300]}" if last else f"failed while {phase} (exit {returncode})"


def main(argv: list[str]) -> int:
    path, cases, device, single, tolerance = argv
    import torch

    print("loading", flush=True)
    runner = torch._inductor.aoti_load_package(path, run_single_threaded=single == "1")
    for name, case in torch.load(cases).items():
        print(f"case={name}", "calling", flush=True)
        with torch.inference_mode():
            outs = runner(*[t.to(device) for t in case["inputs"]])
        if device == "cuda":
            torch.cuda.synchronize()
        print("checking", flush=True)
        problem = compare(outs if isinstance(outs, (list, tuple)) else [outs], case["expected"], float(tolerance))
        if problem:
            print(problem, file=sys.stderr)
            return 3
    print("ok", flush=True)
    return 0


def compare(outs: list, expected: list, tolerance: float) -> str | None:
    import torch

    if len(outs) != len(expected):
        return f"{len(outs)} outputs, expected {len(expected)}"
    for i, (got, want) in enumerate(zip(outs, expected, strict=True)):
        got = got.float().cpu()
        if not torch.isfinite(want).all():
            return f"output {i}: the eager program itself gives non-finite values"
        if got.shape != want.shape or not torch.isfinite(got).all():
            return (f"output {i}: shape {tuple(got.shape)} (expected {tuple(want.shape)}), "
                    f"finite: {bool(torch.isfinite(got).all())}")
        error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
        if not error <= tolerance:
            return f"output {i} differs from the eager program by {error:.2e} (relative; allowed {tolerance})"
    return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
