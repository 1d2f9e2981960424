"""torch.export + AOTInductor: a component wrapper -> one `.pt2` file, an AOTInductor package
(`torch._inductor.aoti_load_package`) or the exported program (`torch.export.load`), loadable
without diffusers, with dynamic shapes from its I/O spec."""

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


def export_component(module: torch.nn.Module, spec: ComponentSpec, example: tuple, path: Path,
                     ranges: dict[str, DimRange], latent_multiple: int, tolerance: float = 1e-3,
                     aoti: bool = True) -> str:
    """Export `module` (and, with `aoti`, AOT-compile it) for the device its example inputs are
    on; returns the mode written to `path`: "aoti" (a compiled package, which has run once in a
    process of its own and matched the exported program to `tolerance`: aoti_check.py), or
    "exported" (the exported program, which the backend runs eagerly, or compiles with
    torch.compile on request) where `aoti` is False, or where compiling or that run failed, with
    a warning naming the cause."""
    from ldm_deploy.export.aoti_check import check_package
    from ldm_deploy.export.components import example_inputs

    dims = export_dims(ranges, latent_multiple)
    device = example[0].device.type
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, example, dynamic_shapes=dynamic_shapes(spec, dims), strict=False)
        if not aoti:
            torch.export.save(program, str(path))
            return "exported"
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        except Exception as e:  # an Inductor failure is ours to report, not the user's to fix
            problem = f"failed to compile ({type(e).__name__}: {str(e)[:300]})"
        else:
            smallest = tuple(t.to(example[0].device) for t in example_inputs(spec, {k: r.min for k, r in ranges.items()}))
            cases = {"at_the_trace_size": example, "at_the_smallest_size_one_image": smallest}
            problem = check_package(path, {name: (inputs, outputs(program, inputs)) for name, inputs in cases.items()},
                                    device, tolerance)
        if problem is None:
            return "aoti"
        log.warning("%s: the AOTInductor package %s; saving the exported program instead, which runs "
                    "eagerly, or compiled on its first call with ldm-run --torch-compile", spec.name, problem)
        Path(path).unlink(missing_ok=True)
        torch.export.save(program, str(path))
        return "exported"


def outputs(program, inputs: tuple) -> list:
    out = program.module()(*inputs)
    return list(out) if isinstance(out, (list, tuple)) else [out]
