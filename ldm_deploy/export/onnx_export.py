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
        model = onnx.load(str(raw), load_external_data=True)
        name_dims(model.graph, spec)
        weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
        if weight_bytes < PROTO_LIMIT:
            onnx.save_model(model, str(path))
            return [path]
        data = path.with_name(path.name + ".data")
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return [path, data]


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
