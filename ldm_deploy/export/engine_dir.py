"""Write an engine directory atomically: build it beside the target, rename it at the end."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import uuid
from pathlib import Path

from ldm_deploy.engine.manifest import MANIFEST
from ldm_deploy.errors import UserError
from ldm_deploy.writable import check_folder

log = logging.getLogger(__name__)


def check_out(out: Path, force: bool, model: str | Path | None = None) -> None:
    """Refuse an `out` that exists without --force, and anything --force must not delete: a file,
    a folder that is neither an engine directory (no manifest.json) nor empty, and a folder that
    is, or holds, the model being exported. Cheap: called before the model is loaded."""
    out = Path(out)
    if model is not None and Path(model).expanduser().exists():
        model_path, target = Path(model).expanduser().resolve(), out.resolve()
        if target == model_path or target in model_path.parents:
            raise UserError(f"--out {out} is the model's folder or holds it; the export would "
                            "replace the model. Choose another --out")
    if in_cache(out):  # ldm-run --model's export
        check_folder(out, "the engine", create=True, fix=CACHE_FIX)
    else:
        check_folder(out, "--out", create=True)
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise UserError(f"{out} already exists; pass --force to replace it, or choose another --out")
    if out.is_symlink():
        raise UserError(f"--out {out} is a symbolic link; pass the folder it points to "
                        f"({os.path.realpath(out)}), or another --out")
    if not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; --force replaces only engine "
                        "directories. Choose another --out")
    if not (out / MANIFEST).is_file() and any(out.iterdir()):
        kind = "a diffusers model" if (out / "model_index.json").is_file() else "not an engine directory"
        raise UserError(f"--out {out} is {kind} (it has no {MANIFEST}); --force replaces only "
                        "engine directories, and would delete everything in it. Choose another --out")


CACHE_FIX = "it lies in the engine cache: point LDM_DEPLOY_CACHE at a writable folder"


def in_cache(out: Path) -> bool:
    from ldm_deploy.cache import cache_dir

    return cache_dir().resolve() in Path(out).resolve().parents


def cache_hint(out: Path) -> str:
    return f" ({CACHE_FIX})" if in_cache(out) else ""


# In a partial directory, locked (flock) by its export while it writes: one whose lock can be taken
# was left by an export killed outright, whose process held it to the end.
LOCK = ".writing"


def hold(tmp: Path):
    """The open, locked lock file of a new partial directory (None where there is no flock)."""
    try:
        import fcntl
    except ImportError:  # (Windows)
        return None
    f = open(tmp / LOCK, "w")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def sweep(out: Path) -> None:
    """Remove the partial directories of `out` that exports killed outright (SIGKILL, the
    machine's power) left, which no handler could clean: those whose lock no process holds. A
    running export's (on any machine or container sharing the disk) holds it; one without a
    lock file (older, or just made) is left alone."""
    try:
        import fcntl
    except ImportError:
        return
    for path in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        try:
            with open(path / LOCK, "r+") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (held: BlockingIOError)
        except OSError:
            continue
        log.info("removing %s, left by an export that was killed", path)
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staging_dir(out: Path, force: bool):
    """Yield an empty directory next to `out`; on success it becomes `out`, on any error or
    interrupt (KeyboardInterrupt, SIGTERM) it is removed, so `out` appears whole or not at all.
    What a killed export left is removed first (sweep)."""
    out = Path(out)
    check_out(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep(out)
        tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        lock = hold(tmp)
    except OSError as e:
        raise UserError(f"cannot write the engine directory {out}: {e.strerror}{cache_hint(out)}") from None
    try:
        yield tmp
        if lock is not None:  # gone before the rename, still held: no sweep takes the directory meanwhile
            (tmp / LOCK).unlink()
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.close()
