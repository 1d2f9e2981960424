"""Trace a component wrapper to ONNX, with dynamic axes from its I/O spec."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import torch

from ldm_deploy.engine.spec import ComponentSpec

log = logging.getLogger(__name__)

OPSET = 17
# Protobuf cannot serialise a message over 2 GiB: larger graphs keep their weights in one
# external-data file beside the graph.
PROTO_LIMIT = 2**31 - 1


def export_onnx(module: torch.nn.Module, spec: ComponentSpec, example: tuple, path: Path,
                custom_opsets: dict[str, int] | None = None) -> list[Path]:
    """Export `module` to `path`; returns the files written (the graph, and its data file if any)."""
    import onnx

    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns about every Python-int conversion in diffusers' code;
        # the shapes that matter are checked by the tests at several sizes.
        warnings.simplefilter("ignore")
        raw = Path(tmp) / path.name
        torch.onnx.export(
            module,
            example,
            str(raw),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=spec.dynamic_axes(),
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
            custom_opsets=custom_opsets,
        )
        # The graph alone: a U-Net's weights (3.4 GB for SD 1.5) are copied one tensor at a
        # time below, never held twice next to the torch model (export peak memory: RESULTS.md).
        model = onnx.load(str(raw), load_external_data=False)
        name_dims(model.graph, spec)
        if weight_bytes(model.graph, raw.parent) < PROTO_LIMIT:
            onnx.load_external_data_for_model(model, str(raw.parent))
            onnx.save_model(model, str(path))
            return [path]
        data = path.with_name(path.name + ".data")
        gather_weights(model.graph, raw.parent, data)
        onnx.save_model(model, str(path))
        return [path, data]


def all_tensors(graph):
    """The graph's initializers and the tensors in node attributes (Constant values), subgraphs
    included: the exporter may write any of them to files of their own."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from all_tensors(sub)


def external_span(tensor, base: Path) -> tuple[Path, int, int]:
    """(file, offset, length) of a tensor whose data lies outside the graph."""
    from onnx.external_data_helper import ExternalDataInfo

    info = ExternalDataInfo(tensor)
    file = base / info.location
    offset = info.offset or 0
    return file, offset, info.length if info.length is not None else file.stat().st_size - offset


def weight_bytes(graph, base: Path) -> int:
    """Bytes of tensor data, inline (raw_data: what the TorchScript exporter writes) or not."""
    from onnx.external_data_helper import uses_external_data

    return sum(external_span(t, base)[2] if uses_external_data(t) else len(t.raw_data) for t in all_tensors(graph))


def gather_weights(graph, base: Path, data: Path, min_bytes: int = 1024) -> None:
    """Write every tensor of `min_bytes` or more into the one file `data`, in turn, and point the
    graph at it. Tensors the exporter left in files of their own are copied file to file in
    1 MiB pieces: reading each into memory instead raised the SD 1.5 export's peak by 2.6 GB
    (freed buffers the allocator keeps)."""
    from onnx import TensorProto
    from onnx.external_data_helper import uses_external_data

    with open(data, "wb") as out:
        for t in all_tensors(graph):
            offset = out.tell()
            if uses_external_data(t):
                file, start, length = external_span(t, base)
                with open(file, "rb") as f:
                    f.seek(start)
                    copy_bytes(f, out, length)
            elif len(t.raw_data) >= min_bytes:
                length = len(t.raw_data)
                out.write(t.raw_data)
                t.ClearField("raw_data")
            else:
                continue
            del t.external_data[:]
            for key, value in (("location", data.name), ("offset", offset), ("length", length)):
                entry = t.external_data.add()
                entry.key, entry.value = key, str(value)
            t.data_location = TensorProto.EXTERNAL


def copy_bytes(src, dst, length: int, piece: int = 1 << 20) -> None:
    while length > 0:
        chunk = src.read(min(piece, length))
        if not chunk:
            raise OSError(f"{src.name} ended {length} bytes early")
        dst.write(chunk)
        length -= len(chunk)


def name_dims(graph, spec: ComponentSpec) -> None:
    """Write the spec's shapes onto the graph's inputs and outputs: fixed sizes as numbers, and
    dynamic ones under the spec's names (the exporter invents names like
    'LayerNormalizationtext_embeddings_dim_1' for what it could not infer)."""
    for value in list(graph.input) + list(graph.output):
        tensor = spec.tensor(value.name)
        names = tensor.dynamic_axes()
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis in names:
                dim.dim_param = names[axis]
            else:
                dim.dim_value = tensor.shape[axis]
