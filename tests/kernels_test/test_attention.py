"""Fused attention: the Triton kernel in the CPU interpreter against a float64 reference, the
torch op and its fallback, the diffusers processor against the stock one, the ONNX paths, and an
sm_90 compile of the TensorRT plugin's kernel (no GPU needed to compile)."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
import torch.nn.functional as F

import ldm_deploy

from ldm_deploy.kernels import attention, ops
from ldm_deploy.kernels.onnx_export import DOMAIN, NODE_TYPE, onnx_attention
from ldm_deploy.kernels.processor import FusedAttnProcessor, use_fused_attention

needs_interpreter = pytest.mark.skipif(reason="runs the kernel on CPU tensors: needs TRITON_INTERPRET=1 "
                                       "(conftest.py sets it where there is no GPU)",
                                       condition=not attention.is_interpreter())

B, H = 2, 2  # batch 2 as with classifier-free guidance; fewer heads than SD's (interpreter)
TEXT = 77


def scaled_down(shape: attention.AttentionShape) -> tuple[int, int, int]:
    """(Lq, Lk, D) of an SD shape for the interpreter: queries / 16 (SD 1.x) or / 64 (SD 2.x),
    real head dims, real 77-token cross-attention."""
    Lq = max(shape.Lq // (16 if shape.name.startswith("sd1") else 64), 2)
    return Lq, (Lq if shape.Lk == shape.Lq else shape.Lk), shape.D


SHAPES = attention.sd_shapes(TEXT)
#: Every self-attention, and the 77-key cross-attention of the largest SD 1.x level.
PIPELINED_SHAPES = [s for s in SHAPES if " self " in s.name] + [SHAPES[1]]
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def projections(Lq: int, Lk: int, D: int, dtype: torch.dtype, gen: torch.Generator):
    """q, k, v as diffusers makes them: (B, H, L, D) views of (B, L, H * D) projections."""
    def view(L, scale):
        x = torch.randn(B, L, H * D, generator=gen) * scale
        return x.to(dtype).view(B, L, H, D).transpose(1, 2)
    # q scaled up so that softmax rows are peaked and the running max matters.
    return view(Lq, 2.0), view(Lk, 1.0), view(Lk, 1.0)


def reference(q, k, v, scale):
    """float64 softmax(q k^T * scale) v from the same (rounded) inputs."""
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def rel_error(out, ref) -> float:
    """Largest absolute error relative to the largest reference value."""
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def interpreter_dot_works(dtype: torch.dtype) -> bool:
    """Triton's interpreter (3.9 here) gets tl.dot on bf16 tiles wrong; probe, don't assume."""
    a = torch.eye(16, dtype=dtype)
    b = torch.arange(256, dtype=torch.float32).reshape(16, 16).div(64).to(dtype)
    out = attention.flash_attention(a[None, None], a[None, None], b[None, None], 1.0)
    return torch.isfinite(out).all().item() and rel_error(
        out[0, 0], reference(a, a, b, 1.0)) < TOLERANCE[dtype]


DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(reason="this Triton interpreter gets tl.dot on "
                                                                 "bf16 wrong; bf16 runs on the GPU",
              condition=attention.is_interpreter() and not interpreter_dot_works(torch.bfloat16)))]


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[s.name.replace(" ", "-") for s in SHAPES])
def test_kernel_matches_float64(shape, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{shape.name}-{dtype}".encode()))
    Lq, Lk, D = scaled_down(shape)
    q, k, v = projections(Lq, Lk, D, dtype, gen)
    scale = D ** -0.5
    out = attention.flash_attention(q, k, v, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_error(out, reference(q, k, v, scale)) < TOLERANCE[dtype]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", PIPELINED_SHAPES,
                         ids=[s.name.replace(" ", "-") for s in PIPELINED_SHAPES])
def test_pipelined_tile_matches_float64(shape, dtype):
    """The PIPELINE path (next block's q k^T before this block's softmax) on every self-attention
    and a 77-key cross-attention: several full key blocks, key lengths that are an exact
    multiple of the tile, and the masked tail after the pipelined blocks."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"pipelined-{shape.name}-{dtype}".encode()))
    Lq, Lk, D = scaled_down(shape)
    q, k, v = projections(Lq, Lk, D, dtype, gen)
    tile = attention.INTERPRETER_TILE._replace(pipeline=True)
    out = attention.flash_attention(q, k, v, D ** -0.5, tile=tile)
    assert rel_error(out, reference(q, k, v, D ** -0.5)) < TOLERANCE[dtype]


@needs_interpreter
@pytest.mark.parametrize("pipeline", [False, True], ids=["plain", "pipelined"])
def test_keys_shorter_than_one_tile(pipeline):
    """Fewer keys than BLOCK_N (no full block at all) and exactly one full block."""
    gen = torch.Generator().manual_seed(11)
    tile = attention.INTERPRETER_TILE._replace(pipeline=pipeline)
    for Lk in (5, tile.block_n):
        q, k, v = projections(9, Lk, 40, torch.float32, gen)
        out = attention.flash_attention(q, k, v, 40 ** -0.5, tile=tile)
        assert rel_error(out, reference(q, k, v, 40 ** -0.5)) < TOLERANCE[torch.float32], Lk


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_poisoned_output_fully_overwritten_and_nothing_else(dtype):
    """Output into a NaN-filled view of a wider buffer: every element of the view is written,
    no element outside it is touched (masked head-dim padding, query and key tails)."""
    gen = torch.Generator().manual_seed(7)
    Lq, D = 37, 40  # query tail 37 = 32 + 5, head dim padded to 64, key tail 77 = 64 + 13
    q, k, v = projections(Lq, TEXT, D, dtype, gen)
    buffer = torch.full((B, Lq, H, D + 8), float("nan"), dtype=dtype)
    out = buffer[..., :D].transpose(1, 2)  # (B, H, Lq, D), strides (Lq*H*48, 48, H*48, 1)
    attention.flash_attention(q, k, v, D ** -0.5, out=out)
    assert not out.isnan().any()
    assert buffer[..., D:].isnan().all()
    assert rel_error(out, reference(q, k, v, D ** -0.5)) < TOLERANCE[dtype]


@needs_interpreter
def test_any_strides():
    """Contiguous (B, H, L, D), a transposed-in-memory k, and a non-unit head-dim stride."""
    gen = torch.Generator().manual_seed(3)
    Lq, Lk, D = 40, 50, 80
    q = torch.randn(B, H, Lq, D, generator=gen)
    k = torch.randn(B, H, D, Lk, generator=gen).transpose(2, 3)  # stride along D is Lk
    v = torch.randn(B, H, Lk, 2 * D, generator=gen)[..., ::2]  # stride along D is 2
    assert attention.alignment(q, k, v) == 1
    out = attention.flash_attention(q, k, v, 0.1)
    assert rel_error(out, reference(q, k, v, 0.1)) < TOLERANCE[torch.float32]


@needs_interpreter
def test_op_runs_kernel_under_interpreter(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "flash_attention",
                        lambda *a: calls.append(a[0].shape) or attention.flash_attention(*a))
    gen = torch.Generator().manual_seed(5)
    q, k, v = projections(20, TEXT, 64, torch.float16, gen)
    with ops.kernel_on_cpu():
        out = torch.ops.ldm_deploy.attention(q, k, v, 0.125)
    assert calls == [q.shape]
    # (B, H, Lq, D) stored as (B, Lq, H, D): the processor's reshape after it is a view.
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    assert rel_error(out, reference(q, k, v, 0.125)) < TOLERANCE[torch.float16]


@needs_interpreter
def test_fallback_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(ops, "_logged_reasons", set())
    gen = torch.Generator().manual_seed(11)
    q, k, v = projections(16, TEXT, 40, torch.float32, gen)
    wide = [torch.randn(1, 1, 8, 272, generator=gen) for _ in range(3)]  # head dim > 256
    with caplog.at_level(logging.WARNING, logger=ops.logger.name):
        with ops.fallback_unlogged():  # an exporter's probe: not logged, and not counted as said
            torch.ops.ldm_deploy.attention(q, k, v, 0.2)
        for _ in range(3):
            out = torch.ops.ldm_deploy.attention(q, k, v, 0.2)  # CPU, no interpreter opt-in
        with ops.kernel_on_cpu():
            for _ in range(2):
                wide_out = torch.ops.ldm_deploy.attention(*wide, 0.2)  # head dim unsupported
    messages = [r.getMessage() for r in caplog.records if r.name == ops.logger.name]
    assert len(messages) == 2, messages
    assert "cpu tensors" in messages[0] and "head dims" in messages[1]
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, scale=0.2), atol=1e-6)
    assert torch.allclose(wide_out, F.scaled_dot_product_attention(*wide, scale=0.2), atol=1e-6)
    assert out.transpose(1, 2).is_contiguous()  # same layout as the kernel's output


@needs_interpreter
def test_fallback_reasons():
    q = torch.zeros(1, 1, 4, 64)
    assert "cpu tensors" in ops.fallback_reason(q, q, q)
    with ops.kernel_on_cpu():
        assert ops.fallback_reason(q, q, q) is None
        assert "dtype" in ops.fallback_reason(q.double(), q.double(), q.double())
        assert "head dims" in ops.fallback_reason(q, q[..., :32], q[..., :32])
        assert "empty" in ops.fallback_reason(q, q[:, :, :0], q[:, :, :0])


def test_torch_export_keeps_the_op():
    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.ldm_deploy.attention(q, k, v, 0.125)

    x = torch.randn(2, 8, 16, 40)
    program = torch.export.export(Attend(), (x, x, x))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.ldm_deploy.attention.default in targets
    # The fake implementation gives the kernel's output layout.
    out = [n for n in program.graph.nodes if n.target == torch.ops.ldm_deploy.attention.default]
    assert out[0].meta["val"].transpose(1, 2).is_contiguous()


@pytest.fixture(scope="module")
def tiny_unet():
    """A tiny SD-like U-Net, random weights; head dims 40 and 80 as in SD 1.x (2 heads)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(80, 160), norm_num_groups=16, cross_attention_dim=32,
        attention_head_dim=2,  # diffusers' name for the number of heads in SD 1.x configs
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def use_stock_attention(unet):
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())


def unet_inputs():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 500]),
            torch.randn(2, 7, 32, generator=gen))


@needs_interpreter
def test_unet_processor_matches_stock(tiny_unet, monkeypatch):
    latents, t, text = unet_inputs()
    use_stock_attention(tiny_unet)
    with torch.no_grad():
        expected = tiny_unet(latents, t, text).sample
    calls = []
    monkeypatch.setattr(ops, "flash_attention",
                        lambda *a: calls.append(a[0].shape[-1]) or attention.flash_attention(*a))
    use_fused_attention(tiny_unet)
    try:
        with torch.no_grad(), ops.kernel_on_cpu():
            actual = tiny_unet(latents, t, text).sample
    finally:
        use_stock_attention(tiny_unet)
    # Transformers: 1 down and 2 up at 80 channels (head dim 40), 1 in the middle at 160
    # (head dim 80); self- and cross-attention in each: 8 kernel calls.
    assert sorted(calls) == [40] * 6 + [80] * 2
    assert rel_error(actual, expected.double()) < 1e-5


def export_unet(unet, fused: bool) -> bytes:
    import onnx

    latents, t, text = unet_inputs()
    f = io.BytesIO()
    with onnx_attention(fused=fused):
        torch.onnx.export(unet, (latents, t, text), f, dynamo=False, opset_version=17,
                          input_names=["sample", "timestep", "encoder_hidden_states"],
                          custom_opsets={DOMAIN: 1} if fused else None)
    return onnx.load_from_string(f.getvalue())


def test_onnx_fused_nodes(tiny_unet):
    use_fused_attention(tiny_unet)
    try:
        model = export_unet(tiny_unet, fused=True)
    finally:
        use_stock_attention(tiny_unet)
    producers = {o: n for n in model.graph.node for o in n.output}
    fused = [n for n in model.graph.node if n.op_type == NODE_TYPE]
    assert len(fused) == 8 and all(n.domain == DOMAIN for n in fused)
    for node in fused:
        attrs = {a.name: a for a in node.attribute}
        assert attrs["scale"].f in (pytest.approx(40 ** -0.5), pytest.approx(80 ** -0.5))
        assert attrs["plugin_namespace"].s == DOMAIN.encode()
        # The exporter cancelled the layout transposes: the node reads the projections' reshape.
        assert all(producers[i].op_type == "Reshape" for i in node.input)
    assert not any(n.op_type == "Softmax" for n in model.graph.node)
    assert any(o.domain == DOMAIN for o in model.opset_import)


def test_onnx_plain_ops_run_in_onnxruntime(tiny_unet):
    import onnxruntime

    use_fused_attention(tiny_unet)
    try:
        model = export_unet(tiny_unet, fused=False)
        latents, t, text = unet_inputs()
        with torch.no_grad():
            expected = tiny_unet(latents, t, text).sample  # CPU: the op's SDPA fallback
    finally:
        use_stock_attention(tiny_unet)
    assert not any(n.domain == DOMAIN for n in model.graph.node)
    assert sum(n.op_type == "Softmax" for n in model.graph.node) == 8
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"sample": latents.numpy(), "timestep": t.numpy(),
                                   "encoder_hidden_states": text.numpy()})
    assert rel_error(torch.from_numpy(actual), expected.double()) < 1e-5


def test_processor_masks_go_to_stock(tiny_unet):
    attn = tiny_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    gen = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 64, 80, generator=gen), torch.randn(2, 7, 32, generator=gen)
    mask = torch.ones(2, 7)
    mask[:, 5:] = 0
    from diffusers.models.attention_processor import AttnProcessor2_0

    expected = AttnProcessor2_0()(attn, x, text, attention_mask=mask)
    assert torch.equal(FusedAttnProcessor()(attn, x, text, attention_mask=mask), expected)


def test_tiles_fit_shared_memory():
    from ldm_deploy.kernels import aot

    for head_dim in (40, 64, 80, 160):
        tiles = aot.tiles_for(head_dim)
        assert tiles and set(tiles) <= set(attention.AUTOTUNE_TILES)
    assert attention.Tile(128, 128, 8, 3) not in aot.tiles_for(160)
    assert attention.Tile(64, 64, 4, 3, True) in aot.tiles_for(40)
    assert attention.Tile(64, 64, 4, 3, True) not in aot.tiles_for(160)  # 2 * 256 * 512 bytes


def test_plugin_kernel_compiles_for_sm90():
    """What the TensorRT plugin compiles, compiled here for an H100 target (no GPU needed, but
    no interpreter either: a fresh process). 16-byte vector loads must survive head dim 40."""
    script = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from ldm_deploy.kernels import aot
        for dtype, heads, head_dim in (("fp16", 8, 40), ("bf16", 5, 64), ("fp16", 8, 160)):
            for tile in {aot.tiles_for(head_dim)[0], aot.tiles_for(head_dim)[-1]}:  # plain, last
                src, options = aot.source(dtype, heads, head_dim, head_dim ** -0.5, tile)
                ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
                assert "ld.global.v4" in ptx, (dtype, head_dim, tile)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(ldm_deploy.__file__))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def loop_schedule(sass: str) -> tuple[int, int]:
    """(exponentials issued between the first HGMMA of the main loop and the wait that follows
    it, exponentials in the whole loop) in cuobjdump SASS; the main loop is the longest range
    closed by a backward branch."""
    code = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    loops = [(int(t, 16), a) for a, op in code
             for t in re.findall(r"\bBRA (?:`\(.*?\) )?0x([0-9a-f]+)", op) if int(t, 16) < a]
    start, end = max(loops, key=lambda span: span[1] - span[0])
    body = [op for a, op in code if start <= a <= end]
    first = next(i for i, op in enumerate(body) if "HGMMA" in op)
    wait = next(i for i, op in enumerate(body) if i > first and "WARPGROUP.DEPBAR" in op)
    return (sum("MUFU.EX2" in op for op in body[first:wait]),
            sum("MUFU.EX2" in op for op in body))


def test_pipelined_tile_overlaps_softmax_with_next_product_on_sm90(tmp_path):
    """What PIPELINE is for, checked in the sm_90 machine code (compiled here, no GPU needed):
    in the main loop, most of a block's exponentials are issued while the next block's q k^T
    (an asynchronous HGMMA) is in flight, before the wait for it; in the plain kernel, none."""
    script = textwrap.dedent("""
        import sys
        import triton
        from triton.backends.compiler import GPUTarget
        from ldm_deploy.kernels import aot
        for pipeline in (False, True):
            tile = aot.Tile(64, 64, 4, 3, pipeline)
            src, options = aot.source("fp16", 8, 40, 40 ** -0.5, tile)
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
            assert compiled.metadata.shared == aot.shared_bytes(tile, 40), compiled.metadata.shared
            with open(f"{sys.argv[1]}/{int(pipeline)}.cubin", "wb") as f:
                f.write(compiled.asm["cubin"])
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(ldm_deploy.__file__))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    plain, pipelined = (loop_schedule(subprocess.run(
        [cuobjdump, "-sass", str(tmp_path / f"{p}.cubin")], capture_output=True, text=True,
        check=True).stdout) for p in (0, 1))
    # 64 x 64 scores over 128 threads: 32 exponentials per thread, plus the row rescales.
    assert plain[0] == 0 and plain[1] >= 32, plain
    assert pipelined[1] == plain[1] and pipelined[0] >= pipelined[1] // 2, pipelined
