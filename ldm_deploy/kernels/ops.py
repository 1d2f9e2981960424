"""`ldm_deploy::attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor`: the torch op.

Registered with `torch.library.triton_op`, so the op is a real dispatcher op (TorchScript tracing
and the ONNX exporter see one `ldm_deploy::attention` node; torch.export keeps it by name) whose
fake implementation is its own Python body, and Inductor / AOTInductor trace through it to the
Triton kernel and compile that into the package (no Python needed to run it there). CUDA graphs
capture it like any other kernel launch.

q: (B, H, Lq, D), k, v: (B, H, Lk, D), any strides. Returns (B, H, Lq, D) laid out as
(B, Lq, H, D) in memory, on every path, so that the caller's `transpose(1, 2).reshape(...)` is
a view and the fake and real outputs agree on strides.

Where the kernel does not apply (CPU tensors, an unsupported dtype or head dim) the op runs
`torch.nn.functional.scaled_dot_product_attention` instead and logs the reason once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ldm_deploy.kernels import attention as kernel
from ldm_deploy.kernels.attention import flash_attention

logger = logging.getLogger(__name__)

GPU_DTYPES = (torch.float16, torch.bfloat16)
#: fp32 runs only in the interpreter (tests); on a GPU, SDPA's own fp32 paths are the better choice.
INTERPRETER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_state = threading.local()
_logged_reasons: set[str] = set()


@contextlib.contextmanager
def kernel_on_cpu() -> Iterator[None]:
    """Run the Triton kernel on CPU tensors through Triton's interpreter, for tests.

    Needs TRITON_INTERPRET=1 set before Triton was imported. Without this context, CPU tensors
    take the SDPA fallback (the interpreter is orders of magnitude slower than SDPA).
    """
    if not kernel.is_interpreter():
        raise RuntimeError("kernel_on_cpu() needs TRITON_INTERPRET=1 set before importing triton")
    with _flag("cpu"):
        yield


@contextlib.contextmanager
def _flag(name: str) -> Iterator[None]:
    """Set a thread-local flag of this module for the duration of the block."""
    previous = getattr(_state, name, False)
    setattr(_state, name, True)
    try:
        yield
    finally:
        setattr(_state, name, previous)


def fallback_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot run these inputs, or None when it can."""
    if q.device.type == "cuda":
        if kernel.is_interpreter():
            return "TRITON_INTERPRET=1 is set; the interpreter cannot run CUDA tensors"
        dtypes = GPU_DTYPES
    elif q.device.type == "cpu" and getattr(_state, "cpu", False):
        if torch._subclasses.fake_tensor.is_fake(q):
            # Tracing on the CPU: the interpreter cannot run on fake tensors.
            return "fake CPU tensors (tracing); the interpreter runs only real tensors"
        dtypes = INTERPRETER_DTYPES
    else:
        return f"{q.device.type} tensors; the Triton kernel needs a CUDA device"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in dtypes:
        return f"dtype {q.dtype} (supported: {', '.join(str(d) for d in dtypes)})"
    if not (q.dim() == k.dim() == v.dim() == 4):
        return "inputs that are not (B, heads, L, head_dim)"
    head_dim = q.shape[-1]
    if not (k.shape[-1] == v.shape[-1] == head_dim) or head_dim > kernel.MAX_HEAD_DIM:
        return (f"head dims q {q.shape[-1]} k {k.shape[-1]} v {v.shape[-1]} "
                f"(supported: equal, <= {kernel.MAX_HEAD_DIM})")
    if k.shape[-2] == 0:
        return "an empty key sequence"
    return None


@contextlib.contextmanager
def fallback_unlogged() -> Iterator[None]:
    """Run without the fallback's log line: for runs whose result is not what runs later (the
    exporter's probes of the U-Net, whose graph form is what the engine runs)."""
    with _flag("quiet"):
        yield


def _log_fallback_once(reason: str) -> None:
    # While the ONNX exporter traces, the op's value is only an example: its ONNX form is what runs.
    if torch.onnx.is_in_onnx_export() or getattr(_state, "quiet", False):
        return
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        logger.warning("ldm_deploy::attention falls back to torch SDPA for %s", reason)


@torch.library.triton_op("ldm_deploy::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q @ k^T * scale) @ v; q (B, H, Lq, D), k and v (B, H, Lk, D) -> (B, H, Lq, D)."""
    reason = fallback_reason(q, k, v)
    if reason is None:
        return flash_attention(q, k, v, scale)
    _log_fallback_once(reason)
    out = torch.empty((q.shape[0], q.shape[2], q.shape[1], v.shape[3]), dtype=q.dtype,
                      device=q.device).transpose(1, 2)
    out.copy_(F.scaled_dot_product_attention(q, k, v, scale=scale))
    return out
