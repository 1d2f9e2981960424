"""ONNX Runtime's optimised graphs, kept in the user's cache so that later loads skip optimising.

Creating a CPU session for the SD 1.5 U-Net takes 10-14 s, nearly all of it ONNX Runtime's
graph optimisation (its NCHWc layout pass alone costs ~10 s, and is worth 16% per step); loading
the graph it saved once takes about 1.5 s (benchmarks/RESULTS.md). The saved graph belongs to
one ONNX Runtime version and one CPU's instruction set, and is as big as the engine's own
(3.4 GB for an SD 1.5 U-Net), so it lives in the cache, not in the engine directory:

    <cache_dir()>/onnxruntime/<component>-<key>/model.onnx (+ model.onnx.data: the weights)

key: the component's engine files (their SHA-256 from the manifest), the ONNX Runtime version,
the CPU (model name and instruction-set flags) and the optimisation level. Entries appear whole
or not at all (written into a staging folder, then renamed); a load that finds one damaged
removes it and optimises afresh. The least recently used entries go once all of them together pass
MAX_BYTES. LDM_DEPLOY_ORT_CACHE=0 turns the cache off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

from ldm_deploy.cache import cache_dir

log = logging.getLogger(__name__)

ENV = "LDM_DEPLOY_ORT_CACHE"
MAX_BYTES = 12 * 2**30  # about three SD 1.5 engines' U-Net, text encoder and VAE graphs
MODEL = "model.onnx"
WEIGHTS = "model.onnx.data"


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def root() -> Path:
    return cache_dir() / "onnxruntime"


def cpu_identity() -> str:
    """The CPU's model name and instruction-set flags (Linux), else what `platform` knows."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    wanted = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags", "Features", "CPU part") and key not in wanted:
            wanted[key] = value.strip()
    return repr(sorted(wanted.items())) if wanted else f"{platform.machine()} {platform.processor()}"


def graph_key(file_records: dict[str, dict], ort_version: str, level: str, cpu: str) -> str:
    """16 hex digits over what the saved graph depends on. file_records: the manifest's
    {file name: {"sha256": ..., "bytes": ...}} for one component."""
    h = hashlib.sha256(f"{ort_version}\n{level}\n{cpu}\n".encode())
    for name in sorted(file_records):
        h.update(f"{name}\0{file_records[name].get('sha256', '')}\n".encode())
    return h.hexdigest()[:16]


def entry(component: str, key: str) -> Path:
    return root() / f"{component}-{key}"


def is_complete(folder: Path) -> bool:
    return (folder / MODEL).is_file()


def staging(folder: Path) -> Path:
    return folder.with_name(f".staging-{folder.name}-{os.getpid()}")


def commit(stage: Path, folder: Path) -> bool:
    """Move a written staging folder into place; False (and the staging folder removed) when it
    holds no graph or another process got there first."""
    if not is_complete(stage) or folder.exists():
        shutil.rmtree(stage, ignore_errors=True)
        return False
    try:
        os.rename(stage, folder)
    except OSError:  # another process renamed its own first
        shutil.rmtree(stage, ignore_errors=True)
        return False
    return True


def touch(folder: Path) -> None:
    """Mark an entry as used now (least-recently-used pruning reads the folder's mtime)."""
    try:
        os.utime(folder)
    except OSError:
        pass


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def prune(max_bytes: int = MAX_BYTES, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used entries until all of them fit in max_bytes (never `keep`,
    and never another process's staging folder); returns what was removed."""
    base = root()
    if not base.is_dir():
        return []
    entries = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
    sizes = {p: size(p) for p in entries}
    total = sum(sizes.values())
    removed = []
    for p in sorted(entries, key=lambda p: p.stat().st_mtime):
        if total <= max_bytes:
            break
        if keep is not None and p == keep:
            continue
        shutil.rmtree(p, ignore_errors=True)
        total -= sizes[p]
        removed.append(p)
    return removed
