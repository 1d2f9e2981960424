"""Winograd convolutions (ldm_deploy/export/winograd.py): the same numbers as a direct
convolution, in torch and through ONNX Runtime at sizes the trace never saw, and engines written
with them give diffusers' images."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

from conftest import TEST_CONFIG, assert_not_saturated
from ldm_deploy import Pipeline
from ldm_deploy.engine.manifest import read_manifest
from ldm_deploy.export import winograd
from ldm_deploy.export.build import export_engine
from ldm_deploy.export.winograd import WinogradConv2d, applies, use_winograd

# Max abs error over max abs output, against a float64 convolution: float32 direct convolutions
# land near 1e-7 here; F(4, 3)'s transforms hold coefficients up to 8 and round ~20x more.
REL_TOL = {2: 2e-6, 4: 2e-5}
SHAPES = [  # n, c, k, h, w: square and not, odd sides (tiles hanging over the edge), a single pixel
    (1, 16, 24, 12, 12), (2, 32, 16, 9, 14), (3, 8, 8, 1, 1), (1, 12, 20, 33, 7),
]


def conv_and_input(n, c, k, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(c, k, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / (3 * c**0.5))
        conv.bias.copy_(torch.randn(k, generator=g))
    return conv, torch.randn(n, c, h, w, generator=g)


def rel_error(got, conv, x) -> float:
    with torch.no_grad():
        ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    return float((torch.as_tensor(got).double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_a_direct_convolution(m, shape):
    conv, x = conv_and_input(*shape)
    with torch.no_grad():
        got = WinogradConv2d(conv, m)(x)
    assert got.shape == (shape[0], shape[2], *shape[3:])
    assert rel_error(got, conv, x) < REL_TOL[m]


@pytest.mark.parametrize("m", [2, 4])
def test_onnx_graph_takes_sizes_the_trace_never_saw(m, tmp_path):
    conv, x = conv_and_input(2, 16, 8, 11, 11)
    path = tmp_path / "conv.onnx"
    with torch.no_grad():
        torch.onnx.export(WinogradConv2d(conv, m), (x,), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "h", 3: "w"}},
                          opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, h, w in [(1, 8, 8), (3, 5, 17), (2, 32, 24), (1, 1, 2)]:
        x = torch.randn(n, 16, h, w)
        got = session.run(None, {"x": x.numpy()})[0]
        assert got.shape == (n, 8, h, w)
        assert rel_error(got, conv, x) < REL_TOL[m], (n, h, w)


@pytest.mark.parametrize("m", [2, 4])
def test_circular_padding_wraps_round(m):
    """Tiling's convolutions (padding_mode "circular", tiling.py) keep their Winograd tiles."""
    conv, x = conv_and_input(*SHAPES[0])
    conv.padding_mode = "circular"
    with torch.no_grad():
        got, want = WinogradConv2d(conv, m)(x), conv(x)
    assert float((got - want).abs().max() / want.abs().max()) < REL_TOL[m]


def test_a_tiling_unet_with_winograd_matches_the_stock_one(small_tiles, model_dirs):
    from diffusers import UNet2DConditionModel

    from ldm_deploy.export.tiling import make_seamless

    unet = UNet2DConditionModel.from_pretrained(model_dirs["tiny-sd1"] / "unet").eval()
    make_seamless(unet)
    g = torch.Generator().manual_seed(1)
    x, t, text = torch.randn(1, 4, 12, 10, generator=g), torch.tensor([300]), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=text).sample
        counts = use_winograd(unet, lambda: unet(x[:, :, :8, :8], t, encoder_hidden_states=text))
        got = unet(x, t, encoder_hidden_states=text).sample
    assert counts["F(4,3)"] > 0 and counts["F(2,3)"] > 0
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_only_plain_3x3_convolutions_apply():
    assert applies(torch.nn.Conv2d(8, 8, 3, padding=1))
    assert not applies(torch.nn.Conv2d(8, 8, 1))
    assert not applies(torch.nn.Conv2d(8, 8, 3, padding=1, stride=2))  # the U-Net's downsamplers
    assert not applies(torch.nn.Conv2d(8, 8, 3, padding=1, groups=2))
    assert not applies(torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2))
    assert not applies(torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"))


def test_tiles_follow_size_and_width(monkeypatch):
    # The rule as measured: F(4, 3) from 32 px sides, nothing smaller or narrower.
    assert winograd.choose(320, 32) == 4 and winograd.choose(640, 16) is None
    assert winograd.choose(1280, 8) is None and winograd.choose(128, 256) is None
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 4)
    assert winograd.choose(4, 256) == 4


@pytest.fixture
def small_tiles(monkeypatch):
    """Thresholds the tiny models reach (32..64 channels, 8x8 latents at 64 px): F(4, 3) on
    the first level, F(2, 3) on the second; conv_in / conv_out (4 channels) stay direct."""
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 16)
    monkeypatch.setattr(winograd, "MIN_SIDE", {4: 8, 2: 4})


def test_unet_with_winograd_matches_the_stock_one(small_tiles, model_dirs):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dirs["tiny-sd1"] / "unet").eval()
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(2, 4, 12, 10, generator=g), torch.tensor([500, 500]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=text).sample
        counts = use_winograd(unet, lambda: unet(x[:1, :, :8, :8], t[:1], encoder_hidden_states=text[:1]))
        got = unet(x, t, encoder_hidden_states=text).sample
    assert counts["F(4,3)"] > 0 and counts["F(2,3)"] > 0 and counts["direct"] == 2  # conv_in, conv_out
    assert sum(isinstance(m, WinogradConv2d) for m in unet.modules()) == counts["F(4,3)"] + counts["F(2,3)"]
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_engine_with_winograd_gives_diffusers_images(small_tiles, model_dirs, tmp_path, torch_noise):
    engine = export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "e", replace(TEST_CONFIG, conv="winograd"))
    build = read_manifest(engine).build
    assert build["conv"] == "winograd" and build["convolutions"]["F(4,3)"] > 0 and build["convolutions"]["F(2,3)"] > 0
    ops = [n.op_type for n in onnx.load(str(engine / "unet_step.onnx"), load_external_data=False).graph.node]
    assert ops.count("Conv") == conv_count(model_dirs) - build["convolutions"]["F(4,3)"] - build["convolutions"]["F(2,3)"]
    ours = Pipeline.load(engine)
    ref = StableDiffusionPipeline.from_pretrained(model_dirs["tiny-sd1"], safety_checker=None,
                                                  requires_safety_checker=False)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    for w, h in [(128, 96), (136, 72)]:  # 17 x 9 latents: tiles hang over the edges
        latents = torch.randn((1, 4, h // 8, w // 8), generator=torch.Generator().manual_seed(3))
        want = ref("a lighthouse", num_inference_steps=4, guidance_scale=7.5, height=h, width=w,
                   latents=latents.clone(), output_type="np").images
        got = ours("a lighthouse", steps=4, guidance=7.5, sampler="euler", width=w, height=h,
                   latents=latents.numpy(), generator=torch_noise(0), output_type="np", progress=False)
        assert_not_saturated(want)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)


def test_direct_convolutions_stay_onnx_conv(engine_dirs, tmp_path, model_dirs):
    import onnx

    # The session engines take the default (winograd), but no tiny layer is wide enough for it.
    assert set(read_manifest(engine_dirs["tiny-sd1"]).build["convolutions"]) == {"direct"}
    direct = export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "e", replace(TEST_CONFIG, conv="direct", img2img=False))
    assert read_manifest(direct).build["conv"] == "direct"
    ops = [n.op_type for n in onnx.load(str(direct / "unet_step.onnx"), load_external_data=False).graph.node]
    assert ops.count("Conv") == conv_count(model_dirs)


def conv_count(model_dirs) -> int:
    """Every nn.Conv2d of the tiny SD 1 U-Net: each exports as one Conv node when left direct."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dirs["tiny-sd1"] / "unet")
    return sum(isinstance(m, torch.nn.Conv2d) for m in unet.modules())


def test_winograd_is_refused_where_it_was_not_measured():
    from ldm_deploy.errors import UserError
    from ldm_deploy.export.config import ExportConfig

    assert ExportConfig().conv_kind == "winograd" and ExportConfig(backend="torch").conv_kind == "direct"
    with pytest.raises(UserError, match="conv for --backend torch 'winograd'; choose one of direct"):
        ExportConfig(backend="torch", conv="winograd")


def test_winograd_refuses_convolutions_it_does_not_compute():
    with pytest.raises(ValueError, match="plain 3x3"):
        WinogradConv2d(torch.nn.Conv2d(8, 8, 3, padding=1, stride=2), 4)


def test_openvino_bf16_advises_a_direct_export(small_tiles, model_dirs, tmp_path, caplog, engine_dirs):
    openvino = pytest.importorskip("openvino", reason="the openvino backend's tests need OpenVINO (in the test extra)")
    if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16 arithmetic (Intel AMX or AVX512-BF16)")
    engine = export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "e", replace(TEST_CONFIG, img2img=False))
    Pipeline.load(engine, backend="openvino", precision="bf16")
    assert "export with --conv direct for this backend" in caplog.text
    caplog.clear()
    Pipeline.load(engine_dirs["tiny-sd1"], backend="openvino", precision="bf16")  # no Winograd layer in it
    assert "--conv direct" not in caplog.text
