"""Write an engine directory atomically: build it beside the target, rename it at the end."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import shutil
import socket
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
    try:
        check_folder(out, "--out", create=True)
    except UserError as e:
        raise UserError(f"{e}{cache_hint(out)}") from None
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


def cache_hint(out: Path) -> str:
    cache = os.environ.get("LDM_DEPLOY_CACHE")
    if cache and Path(cache) in Path(out).parents:
        return " (it lies in LDM_DEPLOY_CACHE; point that variable at a writable folder)"
    return ""


def partial_tag() -> str:
    """What a partial directory's name says of its writer: "<pid>@<this machine>" (a hash of the
    host's name: a cache on a shared disk is written from several machines)."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f"{os.getpid()}@{host}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # (signal 0: nothing is sent; only whether the process exists is checked)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: it exists
        return True
    return True


def sweep(out: Path) -> None:
    """Remove the partial directories of `out` whose export was killed outright (SIGKILL, the
    machine's power), which no handler could clean: those of this machine whose process is gone.
    Older names, without a process, and other machines' are left alone."""
    if os.name != "posix":  # (os.kill's signal 0 checks a process on POSIX alone)
        return
    host = partial_tag().split("@")[1]
    for path in out.parent.glob(f".{glob.escape(out.name)}.partial-*@{host}-*"):
        pid = path.name.rsplit(".partial-", 1)[1].split("@")[0]
        if pid.isdigit() and not alive(int(pid)):
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
        tmp = out.parent / f".{out.name}.partial-{partial_tag()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"cannot write the engine directory {out}: {e.strerror}{cache_hint(out)}") from None
    try:
        yield tmp
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
