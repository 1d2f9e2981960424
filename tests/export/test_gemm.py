"""The U-Net's linear layers as 2-D Gemm (ldm_deploy/export/gemm.py): same outputs, and the
ONNX Runtime engines carry Gemm where diffusers' 3-D linears would export MatMul + Add."""

from __future__ import annotations

import onnx
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.activations import GEGLU

from ldm_deploy.engine.manifest import read_manifest
from ldm_deploy.export.gemm import FlatLinear, SplitGEGLU, use_gemm


def test_rewritten_unet_gives_the_same_output(model_dirs):
    unet = UNet2DConditionModel.from_pretrained(model_dirs["tiny-sd2"] / "unet").eval()
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 10, 14, generator=g), torch.randn(2, 77, 48, generator=g)
    t = torch.tensor([10, 900])
    geglus = sum(isinstance(m, GEGLU) for m in unet.modules())
    linears = sum(type(m) is torch.nn.Linear for m in unet.modules()) - geglus  # each GEGLU holds one
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=text).sample
        changed = use_gemm(unet)
        got = unet(x, t, encoder_hidden_states=text).sample
    assert changed == geglus + linears
    assert not any(type(m) is torch.nn.Linear or isinstance(m, GEGLU) for m in unet.modules())
    assert geglus > 0 and sum(isinstance(m, SplitGEGLU) for m in unet.modules()) == geglus
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_flat_linear_takes_any_leading_shape():
    lin = torch.nn.Linear(6, 5)
    x = torch.randn(2, 3, 4, 6)
    want = lin(x)
    lin.__class__ = FlatLinear
    assert torch.allclose(lin(x), want, atol=1e-6) and torch.allclose(lin(x[0, 0]), want[0, 0], atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sd2"])
def test_onnxruntime_engines_multiply_weights_only_in_gemm(engine_dirs, preset):
    # Without the rewrite, every 3-D linear layer with a bias (attention out, GEGLU, feed-forward,
    # SD 2's proj_in / proj_out) exports as MatMul with a weight initializer, then an Add.
    graph = onnx.load(str(engine_dirs[preset] / "unet_step.onnx"), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    weighted = {n.output[0]: n.name for n in graph.node if n.op_type == "MatMul" and set(n.input) & weights}
    assert not [weighted[i] for n in graph.node if n.op_type == "Add" for i in n.input if i in weighted]
    assert sum(n.op_type == "Gemm" for n in graph.node) >= 10
    assert read_manifest(engine_dirs[preset]).build["linear"] == "gemm"
