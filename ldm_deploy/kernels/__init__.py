"""Triton kernels specialised for Stable Diffusion, and their registrations.

    attention    the fused-attention kernel (`attn_fwd`) and its launcher `flash_attention`
    ops          torch op `ldm_deploy::attention(q, k, v, scale)`, with a logged SDPA fallback
    processor    `FusedAttnProcessor` and `use_fused_attention(unet)` for diffusers U-Nets
    onnx_export  `onnx_attention(fused=...)`: plain ONNX ops or one `ldm_deploy::FusedAttention`
    aot          ahead-of-time compilation of the kernel for one fixed layout
    trt_plugin   the TensorRT plugin for that node (imports tensorrt; unverified)

Importing this package imports nothing; import the module you need. All but `trt_plugin` need
`triton` (Linux); set TRITON_INTERPRET=1 before importing them to run the kernel on the CPU.
"""
