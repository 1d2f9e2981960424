"""`ldm-export`: a diffusers Stable Diffusion model -> an engine directory."""

from __future__ import annotations

import argparse
import sys

from ldm_deploy.cli.common import add_model_options, model_options, run_main, setup_logging
from ldm_deploy.export.tensorrt_build import DEFAULT_TIMING_CACHE


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-export", description=__doc__.split(": ", 1)[1])
    p.add_argument("--model", required=True,
                   help="diffusers folder, hub id such as org/name, or single-file checkpoint (.safetensors)")
    p.add_argument("--out", required=True, help="engine directory to create")
    p.add_argument("--backend", default="onnxruntime",
                   help="engine kind to build: onnxruntime (default), tensorrt (NVIDIA GPUs), torch")
    p.add_argument("--min-size", type=int, default=256, help="smallest image side the engine accepts (px; default 256)")
    p.add_argument("--max-size", type=int, default=None,
                   help="largest image side the engine accepts (px; default 1024, SDXL 1536)")
    p.add_argument("--opt-size", type=int, default=None, help="side to tune for (default: the model's native size)")
    p.add_argument("--max-batch", type=int, default=4, help="most images per call (default 4)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt taken whole, in tokens, rounded up to chunks of 75 encoded one by one "
                        "as AUTOMATIC1111 does; longer ones are cut with a warning (default 300; 75: "
                        "diffusers' one chunk)")
    p.add_argument("--static-shapes", action="store_true",
                   help="tensorrt, torch: build for exactly --opt-size, one image and one 75-token prompt chunk: "
                        "kernels for one shape, no other size (a much shorter torch compile)")
    t = p.add_argument_group("torch backend")
    t.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device to compile for")
    t.add_argument("--precision", default=None, choices=("fp32", "fp16"),
                   help="torch and tensorrt; default: fp16 on cuda and for tensorrt, fp32 on cpu")
    p.add_argument("--attention", default=None, choices=("sdpa", "ort", "triton"),
                   help="U-Net attention: sdpa (plain ops), ort (ONNX Runtime's fused MultiHeadAttention; "
                        "onnxruntime), triton (our fused kernel; torch). Default: the backend's measured best")
    p.add_argument("--conv", default=None, choices=("direct", "winograd"),
                   help="U-Net 3x3 convolutions: winograd (fewer multiplications; onnxruntime) or direct. "
                        "Default: the backend's measured best")
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC convolutions in the U-Net (default: on for --device cuda, where it measured "
                        "faster, off on cpu)")
    t.add_argument("--fuse-qkv", action="store_true", help="one GEMM for the q, k, v projections")
    t.add_argument("--jobs", type=int, default=0,
                   help="components compiled at once, each in its own process (default: one per 5 CPU cores)")
    t.add_argument("--no-aoti", action="store_true",
                   help="save exported programs without AOTInductor packages (seconds, not minutes); "
                        "the runtime compiles them with torch.compile on their first call on cuda, and "
                        "runs them eagerly on cpu (ldm-run --[no-]torch-compile)")
    r = p.add_argument_group("tensorrt backend")
    r.add_argument("--opt-level", type=int, default=3,
                   help="TensorRT builder optimization level 0..5: higher builds longer, may run faster (default 3)")
    r.add_argument("--refit", action="store_true", help="keep weights refittable (for LoRA); can run slower")
    r.add_argument("--timing-cache", default=DEFAULT_TIMING_CACHE,
                   metavar="DIR", help="folder that keeps kernel timings between builds (default: tensorrt/ in "
                   "the cache folder, $LDM_DEPLOY_CACHE, else $XDG_CACHE_HOME/ldm-deploy, else ~/.cache/ldm-deploy)")
    r.add_argument("--no-timing-cache", action="store_true", help="time every kernel afresh")
    p.add_argument("--no-img2img", action="store_true", help="skip the VAE encoder: txt2img only, a shorter export")
    add_model_options(p)
    p.add_argument("--force", action="store_true",
                   help="replace --out if it is an existing engine directory (nothing else is replaced)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)

    def go():
        from ldm_deploy.export.config import ExportConfig
        from ldm_deploy.export.tensorrt_build import TensorRTOptions

        tensorrt = TensorRTOptions(
            optimization_level=args.opt_level,
            static_shapes=args.static_shapes,
            refit=args.refit,
            timing_cache=None if args.no_timing_cache else args.timing_cache,
        )

        config = ExportConfig(
            backend=args.backend,
            device=args.device,
            precision=args.precision,
            attention=args.attention,
            conv=args.conv,
            channels_last=args.channels_last,
            fuse_qkv=args.fuse_qkv,
            jobs=args.jobs,
            aoti=not args.no_aoti,
            tensorrt=tensorrt,
            img2img=not args.no_img2img,
            min_size=args.min_size,
            max_size=args.max_size,
            opt_size=args.opt_size,
            max_batch=args.max_batch,
            max_prompt_tokens=args.max_prompt_tokens,
            force=args.force,
            **model_options(args),
        )
        from ldm_deploy.export.build import export_engine

        export_engine(args.model, args.out, config)

    return run_main(go, "ldm-export")


if __name__ == "__main__":
    sys.exit(main())
