"""Export options, checked in one place."""

from __future__ import annotations

from dataclasses import dataclass

from ldm_deploy.engine.spec import VAE_SCALE, DimRange
from ldm_deploy.errors import UserError

BACKENDS = ("onnxruntime",)


@dataclass(frozen=True)
class ExportConfig:
    """What the engine will accept. Wider ranges cost nothing on ONNX Runtime; TensorRT builds
    kernels for the whole range and tunes them for `opt`.

    min_size / max_size: image side in pixels, a multiple of 8 (the VAE's factor).
    opt_size: the size tuned for; None means the model's native size (512 for SD 1.5).
    max_batch: the most images one call makes (the U-Net then runs 2 * max_batch with CFG).
    """

    backend: str = "onnxruntime"
    min_size: int = 256
    max_size: int = 1024
    opt_size: int | None = None
    max_batch: int = 4
    opt_batch: int = 1
    allow_pickle: bool = False
    force: bool = False

    def __post_init__(self):
        check_config(self)

    def dims(self, native_latent: int) -> dict[str, DimRange]:
        opt = self.opt_size or min(max(native_latent * VAE_SCALE, self.min_size), self.max_size)
        side = DimRange(self.min_size // VAE_SCALE, opt // VAE_SCALE, self.max_size // VAE_SCALE)
        return {
            "batch": DimRange(1, self.opt_batch, self.max_batch),
            "cfg": DimRange(1, 2, 2),
            "latent_height": side,
            "latent_width": side,
        }


def check_config(c: ExportConfig) -> None:
    if c.backend not in BACKENDS:
        raise UserError(f"unknown backend {c.backend!r}; choose one of {', '.join(BACKENDS)}")
    for name in ("min_size", "max_size") + (("opt_size",) if c.opt_size else ()):
        v = getattr(c, name)
        if v < VAE_SCALE or v % VAE_SCALE:
            raise UserError(f"--{name.replace('_', '-')} {v} must be a positive multiple of {VAE_SCALE}")
    if c.min_size > c.max_size:
        raise UserError(f"--min-size {c.min_size} is larger than --max-size {c.max_size}")
    if c.opt_size and not c.min_size <= c.opt_size <= c.max_size:
        raise UserError(f"--opt-size {c.opt_size} lies outside [{c.min_size}, {c.max_size}]")
    if not 1 <= c.opt_batch <= c.max_batch:
        raise UserError(f"need 1 <= opt batch <= max batch, got {c.opt_batch} and {c.max_batch}")
