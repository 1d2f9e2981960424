"""Refuse, before minutes of loading or drawing, a place where a file cannot be written."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ldm_deploy.errors import UserError


def check_folder(path: str | Path, flag: str, create: bool = False) -> None:
    """Refuse a file or folder `path` (given as `flag`) whose folder cannot take it: a folder that
    is missing (create: its nearest existing one, which the writer makes the rest in), a file, or
    one that cannot be written. A trial file is made and removed: permissions alone miss
    read-only mounts, and every folder but an immutable one is writable to root."""
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
        raise UserError(f"cannot write {flag} {path}: {e.strerror} in the folder {folder}; choose another "
                        f"{flag}") from None
