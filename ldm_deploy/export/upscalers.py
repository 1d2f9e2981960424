"""Upscale models (ESRGAN, Real-ESRGAN, 4x-UltraSharp, ...) exported into an engine for the hires fix.

AUTOMATIC1111 keeps them in models/ESRGAN (and RealESRGAN, ...), names each by its file name
without the suffix ("4x-UltraSharp") and offers them as hires upscalers; ComfyUI loads the same
files with UpscaleModelLoader. Both read them with spandrel, which tells the architecture from the
weight names and shapes. spandrel needs torchvision, whose builds pin one torch each (installing it
can replace the torch in place), so the networks are rebuilt here instead (upscale_nets.py: RRDBNet
and SRVGGNetCompact, the ESRGAN family) and traced to ONNX: one graph per model, (1, 3, H, W) RGB
in [0, 1] -> (1, 3, s*H, s*W), any H and W (even ones for Real-ESRGAN's x2 layout, which
pixel-unshuffles first; the hires fix's tiles are 192 px). The runtime (engine/upscale.py) runs it
with ONNX Runtime whatever the engine's backend.

    ldm-export --model ... --upscaler 4x-UltraSharp.safetensors --upscaler RealESRGAN_x4plus.pth:"R-ESRGAN 4x+"

`FILE:NAME` names it otherwise (AUTOMATIC1111 calls RealESRGAN_x4plus.pth "R-ESRGAN 4x+").
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

from ldm_deploy.errors import ModelSourceError
from ldm_deploy.export import embeddings

log = logging.getLogger(__name__)

# A name goes into PNG parameters as "Hires upscaler: NAME", so no comma, colon or quote in it.
NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9 ._+()\[\]-]*[A-Za-z0-9+)\]])?")  # (PNG values lose end spaces)
OPSET = 17
COMPONENT = "upscaler:"  # the manifest's files key of upscaler NAME: "upscaler:NAME"


# "4x-UltraSharp.pth" -> (file, None); "RealESRGAN_x4plus.pth:R-ESRGAN 4x+" -> (file, name): as --embedding's FILE:WORD
parse_spec = embeddings.parse_spec


def file_name(name: str) -> str:
    """The ONNX file of upscaler `name` in the engine directory."""
    return "upscaler_" + re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".onnx"


def check_names(specs) -> list[tuple[Path, str]]:
    """(path, name) of each (file, name or None) spec; a ModelSourceError for a missing file, a name
    that would break PNG parameters, one of AUTOMATIC1111's own upscalers, or a name given twice."""
    from ldm_deploy.engine.hires import UPSCALERS

    out = []
    for spec, name in specs:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelSourceError(f"--upscaler {spec}: no such file")
        name = name or path.stem
        if not NAME.fullmatch(name):
            raise ModelSourceError(f"--upscaler {spec}: its name {name!r} would not survive PNG parameters (letters, "
                                   "digits, spaces and . _ + - ( ) [ ] only); give another as --upscaler FILE:NAME")
        if any(u.lower() == name.lower() for u in (*UPSCALERS, "None")):
            raise ModelSourceError(f"--upscaler {spec}: {name!r} is a built-in upscaler's name; give another as "
                                   "--upscaler FILE:NAME")
        if any(file_name(n).lower() == file_name(name).lower() for _, n in out):  # (files: case-blind disks too)
            raise ModelSourceError(f"--upscaler {spec}: another --upscaler is named {name!r} or alike; give another "
                                   "name as --upscaler FILE:NAME")
        out.append((path, name))
    return out


def load(path: Path, allow_pickle: bool):
    """(torch module, scale, architecture name) of the upscale model in `path` (upscale_nets.py), or a
    ModelSourceError saying what the file is instead."""
    from ldm_deploy.export import single_file, upscale_nets

    state = single_file.read(path, allow_pickle).state
    try:
        net, scale, arch = upscale_nets.build(state)
    except ModelSourceError as e:
        raise ModelSourceError(f"--upscaler {path}: {e}") from None
    if scale < 2:
        raise ModelSourceError(f"--upscaler {path} is a 1x {arch} network (a restorer: it keeps the size), not an "
                               "upscaler")
    return net, scale, arch


def prepare(specs, allow_pickle: bool) -> list[tuple[str, bytes, dict]]:
    """(name, ONNX graph, manifest record {"file", "scale", "architecture", "sha256" of the source
    file}) of each (file, name or None) spec: read, checked and traced before the minutes of
    exporting the model (a few seconds each; a 4x ESRGAN's graph is 67 MB)."""
    import io

    import torch

    from ldm_deploy.export.source import hash_files

    out = []
    for path, name in check_names(specs):
        net, scale, arch = load(path, allow_pickle)
        log.info("upscaler %s: %s %dx from %s", name, arch, scale, path.name)
        graph = io.BytesIO()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(net.float(), torch.rand(1, 3, 64, 64), graph, input_names=["image"],
                                  output_names=["upscaled"], dynamic_axes={"image": {2: "height", 3: "width"},
                                                                           "upscaled": {2: "out_height", 3: "out_width"}},
                                  opset_version=OPSET, do_constant_folding=True, dynamo=False)
        except Exception as e:  # an architecture whose ops the exporter cannot trace
            raise ModelSourceError(f"--upscaler {path}: its {arch} network could not be traced to ONNX "
                                   f"({type(e).__name__}: {str(e)[:200]})") from None
        out.append((name, graph.getvalue(), {"file": file_name(name), "scale": scale, "architecture": arch,
                                             "sha256": hash_files([path])}))
    return out


def export(prepared, out_dir: Path) -> dict[str, dict]:
    """Write each `prepare`d upscaler's graph into `out_dir`; name -> its manifest record."""
    for _, graph, record in prepared:
        (out_dir / record["file"]).write_bytes(graph)
    return {name: record for name, _, record in prepared}
