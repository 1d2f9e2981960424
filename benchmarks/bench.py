"""Run every contender in its own process, then put their numbers side by side.

    results = run(BenchConfig(engine="engines/sd15", model="models/sd15", threads=2))

`results` is what `--json` writes: the config, the machine, and per contender its stage
statistics, runtime overhead, images/s, load time, peak memory and utilisation; `ratios` holds
each contender's numbers over the baseline's, all measured in this run.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.config import OURS_VARIANTS, BenchConfig, check_config, parse_contender
from benchmarks.stats import COMPONENT_STAGES, STAGES, run_overheads, stage_ratios, summarize

log = logging.getLogger(__name__)

SCHEMA = "ldm-bench/1"
ROOT = Path(__file__).resolve().parent.parent  # put on the children's PYTHONPATH
REPORT_RESERVE_S = 10  # of the time budget, kept for the report after the last contender
MIN_CHILD_S = 30  # a contender that would get less is skipped
PENDING = "not run yet (the run was stopped before it)"  # in the results `on_progress` gets


def run(cfg: BenchConfig, on_progress: Callable[[dict], None] | None = None) -> dict:
    """Measure every contender of `cfg`, in order, each in a fresh process; assemble results.

    `on_progress` gets the results so far after each contender (with the ones still to come
    marked "not run yet"), so that a run killed from outside keeps what it measured."""
    check_config(cfg)
    load_before = os.getloadavg()
    # When and on what code the run started: others may commit while it runs.
    started = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **git_state()}
    deadline = None if cfg.time_budget_s is None else time.monotonic() + cfg.time_budget_s
    raw = {}

    def results(pending: str | None = None) -> dict:
        todo = {n: {"error": pending} for n in cfg.contenders if n not in raw} if pending else {}
        out = started | assemble(cfg, raw | todo)
        # Other work on the machine skews CPU numbers: keep the evidence with them.
        out["machine"]["load_average"] = {"before": load_before, "after": os.getloadavg()}
        return out

    with tempfile.TemporaryDirectory(prefix="ldm-bench-") as tmp:
        for turn in range(cfg.rounds):
            for name in cfg.contenders:
                if "error" in raw.get(name, {}):
                    continue  # failed or skipped in an earlier round: reported once
                timeout = None if deadline is None else deadline - time.monotonic() - REPORT_RESERVE_S
                if timeout is not None and timeout < MIN_CHILD_S:
                    raw[name] = {"error": f"skipped: {max(timeout, 0):.0f} s of the time budget left"}
                    log.warning("%s: %s", name, raw[name]["error"])
                    continue
                rounds = f" (round {turn + 1}/{cfg.rounds})" if cfg.rounds > 1 else ""
                log.info("== %s%s%s", name, rounds, "" if timeout is None else f" (at most {timeout:.0f} s)")
                result = run_child(contender_spec(name, cfg), Path(tmp), timeout)
                raw[name] = pool(raw[name], result) if name in raw else result
                if on_progress is not None:
                    on_progress(results(pending=PENDING))
    return results()


def pool(earlier: dict, later: dict) -> dict:
    """One contender's result over several rounds: timed samples joined, the highest peak
    memory kept; a failure in any round is the result."""
    if "error" in later:
        return later
    out = dict(earlier)
    out["runs"] = earlier["runs"] + later["runs"]
    out["unet_step"] = earlier["unet_step"] + later["unet_step"]
    for key in ("peak_rss_bytes", "device_peak_bytes", "wall_s"):
        if key in later:
            out[key] = max(earlier.get(key, 0), later[key])
    return out


def contender_spec(name: str, cfg: BenchConfig) -> dict:
    """What the child process for contender `name` needs (JSON-serialisable)."""
    kind, mode = parse_contender(name)
    spec = asdict(cfg) | {"name": name, "kind": kind, "compile": mode if kind == "diffusers" else None,
                          "warmup_steps": cfg.warmup_steps or cfg.steps}
    if kind == "ours" and mode:
        spec["backend"], spec["backend_options"] = OURS_VARIANTS[mode]
    return spec


def child_env(threads: int | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if threads:  # OpenMP / MKL pools of every library in the child
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_child(spec: dict, tmp: Path, timeout: float | None) -> dict:
    """Run one contender; its output streams to our stderr. Returns its result, or {"error"}."""
    spec_path, result_path = tmp / f"{spec['name']}.spec.json", tmp / f"{spec['name']}.result.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "benchmarks.child", str(spec_path), str(result_path)]
    # A new session: on timeout the whole group goes (torch.compile starts worker processes).
    proc = subprocess.Popen(cmd, env=child_env(spec["threads"]), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=30)
    reader = threading.Thread(target=forward, args=(proc.stdout, tail), daemon=True)
    reader.start()
    start = time.monotonic()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(5)
        return {"error": f"timed out after {time.monotonic() - start:.0f} s (time budget)"}
    except BaseException:  # Ctrl+C, SIGTERM: the contender's processes go too, not left on the GPU
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    reader.join(5)
    if code != 0 or not result_path.is_file():
        last = [line for line in tail if line.strip()][-6:]
        return {"error": f"exit code {code}: " + " | ".join(last)}
    return json.loads(result_path.read_text()) | {"wall_s": time.monotonic() - start}


def forward(stream, tail) -> None:
    for line in stream:
        sys.stderr.write(line)
        tail.append(line.rstrip())


def summarize_contender(raw: dict, cfg: BenchConfig) -> dict:
    """Raw samples -> stage statistics, overhead, images/s; keeps the samples for the record."""
    runs = raw["runs"]
    per_run = {s: summarize([r[s] for r in runs]) for s in COMPONENT_STAGES + ("end_to_end",)}
    per_run["unet_step"] = summarize(raw["unet_step"])
    seconds, fraction = run_overheads(runs)
    out = {k: v for k, v in raw.items() if k not in ("runs", "unet_step")}
    out.update(
        stages={s: per_run[s].to_dict() for s in STAGES},
        overhead={"seconds": seconds.to_dict(), "fraction": fraction.to_dict()},
        images_per_s=cfg.batch / per_run["end_to_end"].median,
        samples={"runs": runs, "unet_step": raw["unet_step"]},
    )
    return out


def utilisation(contender: dict, flops: float | None, ceiling: dict | None) -> dict | None:
    """Achieved U-Net FLOP/s per step and its fraction of the measured matmul ceiling
    (nanoGPT's estimate_mfu, with the ceiling measured rather than taken from a datasheet)."""
    if not flops or "stages" not in contender:
        return None
    rate = flops / contender["stages"]["unet_step"]["median"]
    return {"unet_flops_per_s": rate,
            "fraction_of_ceiling": rate / ceiling["flops_per_s"] if ceiling else None}


def assemble(cfg: BenchConfig, raw: dict) -> dict:
    contenders = {n: (r if "error" in r else summarize_contender(r, cfg)) for n, r in raw.items()}
    measured = [r for r in raw.values() if "error" not in r]
    # The FLOP count and ceiling come from a torch-based contender: same model, shapes, device.
    flops = next((r["unet_flops_per_step"] for r in measured if r.get("unet_flops_per_step")), None)
    ceiling = next((r["ceiling"] for r in measured if r.get("ceiling")), None)
    for c in contenders.values():
        if "error" not in c:
            c["utilisation"] = utilisation(c, flops, ceiling)
    base = contenders.get(cfg.baseline, {})
    ratios = {} if "error" in base else {
        n: stage_ratios(c, base) for n, c in contenders.items() if n != cfg.baseline and "error" not in c
    }
    return {
        "schema": SCHEMA,
        "machine": machine_info(measured),
        "config": asdict(cfg),
        "baseline": cfg.baseline,
        "unet_flops_per_step": flops,
        "ceiling": ceiling,
        "contenders": contenders,
        "ratios": ratios,
    }


def git_state() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(dirty) if commit else None}


def machine_info(measured: list[dict]) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": read_field("/proc/cpuinfo", "model name"),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": None,
        "gpu": next((r["device_name"] for r in measured if r.get("device_name")), None),
        "versions": {},
    }
    mem = read_field("/proc/meminfo", "MemTotal")
    if mem:
        info["memory_bytes"] = int(mem.split()[0]) * 1024
    for r in measured:
        info["versions"].update(r.get("versions", {}))
    return info


def read_field(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def write_json(results: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
