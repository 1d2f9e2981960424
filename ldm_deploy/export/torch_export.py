"""torch.export + AOTInductor: a component wrapper -> one `.pt2` package, loadable without
diffusers (`torch._inductor.aoti_load_package`), with dynamic shapes from its I/O spec."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch.export import Dim

from ldm_deploy.engine.spec import ComponentSpec, DimRange

log = logging.getLogger(__name__)


def export_dims(ranges: dict[str, DimRange], m: int) -> dict[str, object]:
    """torch.export Dims for the spec's named dims. Latent sides are `m * Dim` (m: the latent
    multiple, image multiple / VAE factor), so that code which branches on divisibility
    (diffusers' U-Net asks whether the side divides by 2**upsamplers) sees a fact, not a guard
    on a free symbol."""
    out = {}
    for name, r in ranges.items():
        if r.min == r.max:
            out[name] = r.min  # static
        elif name.startswith("latent_") and m > 1:
            out[name] = m * Dim(f"{name}_blocks", min=max(r.min // m, 1), max=r.max // m)
        else:
            out[name] = Dim(name, min=r.min, max=r.max)
    return out


def dynamic_shapes(spec: ComponentSpec, dims: dict[str, object]) -> tuple:
    shapes = []
    for t in spec.inputs:
        axes = {}
        for i, d in enumerate(t.shape):
            if not isinstance(d, int) and not isinstance(dims[d.name], int):
                axes[i] = dims[d.name] * d.factor if d.factor != 1 else dims[d.name]
        shapes.append(axes or None)
    return tuple(shapes)


def export_aoti(module: torch.nn.Module, spec: ComponentSpec, example: tuple, path: Path,
                ranges: dict[str, DimRange], latent_multiple: int) -> str:
    """Export and AOT-compile `module` for the device its example inputs are on; returns the
    mode written to `path`: "aoti" (a compiled package), or "exported" (the exported program,
    run eagerly at load time) where AOTInductor fails, with a warning naming the cause."""
    dims = export_dims(ranges, latent_multiple)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, example, dynamic_shapes=dynamic_shapes(spec, dims), strict=False)
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
            return "aoti"
        except Exception as e:  # an Inductor failure is ours to report, not the user's to fix
            log.warning("%s: AOTInductor failed (%s: %s); saving the exported program, which runs uncompiled",
                        spec.name, type(e).__name__, str(e)[:300])
            Path(path).unlink(missing_ok=True)
            torch.export.save(program, str(path))
            return "exported"
