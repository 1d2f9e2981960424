"""Fused attention on a CUDA GPU: every SD shape at full size against an fp32 reference (fp16
autotuned, bf16 on a fixed tile), every autotune tile on masked tails, the op in CUDA graphs,
torch.compile and an AOTInductor package, and a tiny U-Net with the processor.

Skipped where there is no GPU (there the interpreter tests in test_attention.py run instead).
Run after `python -m benchmarks.attention` on the same machine and the fp16 kernels come from
Triton's disk cache instead of being compiled again.
"""

from __future__ import annotations

import logging
import zipfile

import pytest
import torch
import torch.nn.functional as F

from ldm_deploy.kernels import attention, ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(reason="needs a CUDA GPU and TRITON_INTERPRET unset",
                       condition=not torch.cuda.is_available() or attention.is_interpreter()),
]

SHAPES = attention.sd_shapes()
TOLERANCE = 1e-2  # fp16 / bf16 output, error relative to the largest reference value
BF16_TILE = (64, 64, 4, 2)


def projections(B, H, Lq, Lk, D, dtype, seed=0):
    """q, k, v as diffusers makes them: (B, H, L, D) views of (B, L, H * D) projections."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def view(L):
        x = torch.randn(B, L, H * D, device="cuda", generator=g, dtype=dtype)
        return x.view(B, L, H, D).transpose(1, 2)

    return view(Lq), view(Lk), view(Lk)


def rel_error(out, q, k, v, scale) -> float:
    ref = torch.softmax(q.float() @ k.float().transpose(-1, -2) * scale, dim=-1) @ v.float()
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[s.name.replace(" ", "-") for s in SHAPES])
def test_sd_shapes_match_fp32(shape, dtype):
    q, k, v = projections(shape.B, shape.H, shape.Lq, shape.Lk, shape.D, dtype, seed=shape.Lq)
    out = attention.new_output(q).fill_(float("nan"))  # poisoned: must be fully overwritten
    tile = BF16_TILE if dtype == torch.bfloat16 else None  # fp16: the autotuned path
    attention.flash_attention(q, k, v, shape.D ** -0.5, out=out, tile=tile)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    assert rel_error(out, q, k, v, shape.D ** -0.5) < TOLERANCE


@pytest.mark.parametrize("head_dim,heads", [(40, 8), (64, 5), (80, 8), (160, 8)])
@pytest.mark.parametrize("keys", [77, 256, 333])
def test_every_tile_on_masked_tails(head_dim, heads, keys):
    """Whatever config the autotuner picks must be right: 144 queries (tail for BLOCK_M 128);
    77 keys (tail for every BLOCK_N), 256 (exact multiples: several full blocks, the pipelined
    loop, no tail) and 333 (several full blocks, then a tail)."""
    from triton.runtime.errors import OutOfResources

    q, k, v = projections(2, heads, 144, keys, head_dim, torch.float16)
    ran = []
    for tile in attention.AUTOTUNE_TILES:
        out = attention.new_output(q).fill_(float("nan"))
        try:
            attention.flash_attention(q, k, v, head_dim ** -0.5, out=out, tile=tile)
        except OutOfResources:
            continue  # the autotuner skips this tile for this head dim too
        assert rel_error(out, q, k, v, head_dim ** -0.5) < TOLERANCE, tile
        ran.append(tile)
    assert ran and (head_dim == 160 or any(t.pipeline for t in ran))


def test_op_uses_kernel_and_falls_back_for_fp32(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(ops, "flash_attention",
                        lambda *a: calls.append(1) or attention.flash_attention(*a))
    monkeypatch.setattr(ops, "_logged_reasons", set())
    q, k, v = projections(2, 8, 256, 77, 40, torch.float16)
    out = torch.ops.ldm_deploy.attention(q, k, v, 0.15)
    assert calls == [1] and rel_error(out, q, k, v, 0.15) < TOLERANCE
    with caplog.at_level(logging.WARNING, logger=ops.logger.name):
        out32 = torch.ops.ldm_deploy.attention(q.float(), k.float(), v.float(), 0.15)
    assert calls == [1] and "dtype torch.float32" in caplog.text
    assert torch.allclose(out32, F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                                scale=0.15), atol=1e-5)


def test_cuda_graph_replay():
    q, k, v = projections(2, 8, 1024, 1024, 80, torch.float16)
    torch.ops.ldm_deploy.attention(q, k, v, 80 ** -0.5)  # autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.ldm_deploy.attention(q, k, v, 80 ** -0.5)
    q2, k2, v2 = projections(2, 8, 1024, 1024, 80, torch.float16, seed=1)
    with torch.no_grad():
        for dst, src in ((q, q2), (k, k2), (v, v2)):
            dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_error(out, q2, k2, v2, 80 ** -0.5) < TOLERANCE


class Block(torch.nn.Module):
    """Projections, the op, an output projection: the shape of one diffusers attention."""

    def __init__(self, channels=320, heads=8):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(channels, 3 * channels)
        self.out = torch.nn.Linear(channels, channels)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = (t.view(B, L, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        o = torch.ops.ldm_deploy.attention(q, k, v, (C // self.heads) ** -0.5)
        return self.out(o.transpose(1, 2).reshape(B, L, C))


def test_torch_compile():
    block = Block().cuda().half()
    x = torch.randn(2, 1024, 320, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        expected = block(x)
        actual = torch.compile(block, fullgraph=True)(x)
    assert (actual - expected).abs().max().item() < 1e-2 * expected.abs().max().item()


def test_aoti_package_carries_the_kernel(tmp_path):
    block = Block().cuda().half()
    x = torch.randn(2, 1024, 320, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        expected = block(x)
        program = torch.export.export(block, (x,))
        assert any(n.target == torch.ops.ldm_deploy.attention.default
                   for n in program.graph.nodes)
        path = torch._inductor.aoti_compile_and_package(program,
                                                        package_path=str(tmp_path / "b.pt2"))
        actual = torch._inductor.aoti_load_package(path)(x)
    assert (actual - expected).abs().max().item() < 1e-2 * expected.abs().max().item()
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        text = b"".join(z.read(n) for n in names if n.endswith((".cpp", ".h", ".json")))
    assert b"attn_fwd" in text or any("attn_fwd" in n for n in names), (
        f"the Triton kernel is not in the package: {names}")


def test_tiny_unet_processor_matches_stock():
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from ldm_deploy.kernels.processor import use_fused_attention

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, layers_per_block=1, block_out_channels=(320, 640), norm_num_groups=32,
        cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).cuda().half().eval()
    latents = torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.float16)
    t = torch.tensor([10, 500], device="cuda")
    text = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        expected = unet(latents, t, text).sample.float()
        use_fused_attention(unet)
        actual = unet(latents, t, text).sample.float()
    assert (actual - expected).abs().max().item() < 1e-2 * expected.abs().max().item()
