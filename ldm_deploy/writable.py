"""Refuse, before minutes of loading or drawing, a place where a file cannot be written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ldm_deploy.errors import UserError


def check_folder(path: str | Path, flag: str, create: bool = False, fix: str | None = None,
                 in_place: bool = False) -> None:
    """Refuse a file or folder `path` (given as `flag`) whose folder cannot take it: a folder that
    is missing (create: its nearest existing one, which the writer makes the rest in), a file, or
    one that cannot be written. A trial file is made and removed: permissions alone miss
    read-only mounts, and every folder but an immutable one is writable to root. in_place: the
    writer opens `path` itself (no file beside it), so a writable existing file is enough
    (/dev/stdout). fix: what to do instead (default: choose another `flag`)."""
    if in_place and Path(path).exists() and not Path(path).is_dir() and os.access(path, os.W_OK):
        return
    folder = Path(path).parent
    if create:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
    if folder.exists() and not folder.is_dir():
        raise UserError(f"cannot write {flag} {path}: {folder} is a file, not a folder")
    if not folder.is_dir():
        raise UserError(f"cannot write {flag} {path}: the folder {folder} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write {flag} {path}: {e.strerror} in the folder {folder}; "
                        f"{fix or f'choose another {flag}'}") from None
