"""What every command shares: logging to stderr, and user errors without tracebacks."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from ldm_deploy.errors import UserError


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr, force=True
    )
    # Libraries we call are chatty at INFO / WARNING about things users cannot act on.
    for name in ("diffusers", "transformers", "torch", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_main(fn: Callable[[], None], prog: str) -> int:
    """Run a command; a UserError prints `prog: error: message` and exits 2."""
    try:
        fn()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
