"""Write an engine directory atomically: build it beside the target, rename it at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from ldm_deploy.errors import UserError


@contextlib.contextmanager
def staging_dir(out: Path, force: bool):
    """Yield an empty directory next to `out`; on success it becomes `out`, on any error or
    interrupt (KeyboardInterrupt included) it is removed, so `out` appears whole or not at all."""
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it, or choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"cannot write the engine directory {out}: {e.strerror}") from None
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
