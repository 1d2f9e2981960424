"""Write an engine directory atomically: build it beside the target, rename it at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from ldm_deploy.engine.manifest import MANIFEST
from ldm_deploy.errors import UserError
from ldm_deploy.writable import check_folder


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


@contextlib.contextmanager
def staging_dir(out: Path, force: bool):
    """Yield an empty directory next to `out`; on success it becomes `out`, on any error or
    interrupt (KeyboardInterrupt included) it is removed, so `out` appears whole or not at all."""
    out = Path(out)
    check_out(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
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
