"""`ldm-run`: prompts (and an init image) -> PNG images, from an engine directory (or a
diffusers folder or checkpoint, exported to the cache on first use; with neither, our bundled
shapes model)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm_deploy.cli.common import (MODEL_OPTIONS, SIZE_OPTIONS, add_model_options, add_size_options, flag_names,
                                   model_options, run_main, setup_logging, size_options)
from ldm_deploy.cli.outputs import calls, output_paths
from ldm_deploy.errors import UserError
from ldm_deploy.writable import check_folder

log = logging.getLogger("ldm-run")


def pad_or_none(text: str) -> int | None:
    """--mask-crop's value: pixels, or "none" (the whole picture)."""
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give pixels (e.g. 32) or 'none', not {text!r}") from None


def parser() -> argparse.ArgumentParser:
    from ldm_deploy.engine.samplers import SAMPLERS

    p = argparse.ArgumentParser(prog="ldm-run", description=__doc__.split(": ", 1)[1])
    p.add_argument("prompt", nargs="?", default=None, help="what to draw (with --from-png: the image's)")
    p.add_argument("--from-png", metavar="FILE", default=None,
                   help="draw again from the generation parameters in a PNG made by ldm-run or AUTOMATIC1111 "
                        "(its prompt, negative prompt, steps, sampler, CFG scale, seed, variation seed, size, clip "
                        "skip, hires fix, mask blur); options given here override them")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--engine", help="engine directory made by ldm-export")
    which.add_argument("--model", help="diffusers folder or .safetensors checkpoint (SD 1.x / 2.x / XL): its ONNX "
                       "Runtime engine is exported into the cache "
                       "(~/.cache/ldm-deploy) on first use. With neither --engine nor --model: the bundled "
                       "64x64 shapes model (try \"a red circle on a blue background\")")
    m = p.add_argument_group("with --model (set into its cached engine, as ldm-export does)")
    add_model_options(m)
    add_size_options(m)
    p.add_argument("--negative-prompt", default=None,
                   help="what to steer away from (none given: SDXL base draws from zero embeddings, as diffusers "
                        "and AUTOMATIC1111 do; \"\" encodes the empty text, as ComfyUI does)")
    p.add_argument("--style", action="append", default=[], metavar="NAME",
                   help="merge a saved style of --styles-file into the prompts, as AUTOMATIC1111's Styles do (its "
                        "text in place of {prompt}, or after a comma); repeat for more, applied in order")
    p.add_argument("--styles-file", default="styles.csv", metavar="CSV",
                   help="AUTOMATIC1111's styles.csv (name,prompt,negative_prompt) that --style names come from "
                        "(default: styles.csv here)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default 30; img2img draws int(steps x "
                   "strength) of them, as diffusers does)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; <= 1 disables it")
    p.add_argument("--seed", type=int, default=None, help="image i gets seed + i (default, or -1: random; with "
                   "--variation-strength every image the seed)")
    p.add_argument("--variation-strength", type=float, default=None, metavar="F",
                   help="AUTOMATIC1111's variation seed: vary the seed's noise this far (0 to 1, e.g. 0.1) toward "
                        "--variation-seed's; with --num-images, each image a variation of the one seed")
    p.add_argument("--variation-seed", type=int, default=None, metavar="N",
                   help="the seed the noise varies toward (image i: N + i; default, or -1: random)")
    p.add_argument("--seed-resize-from", type=size, default=None, metavar="WxH",
                   help="AUTOMATIC1111's 'Resize seed from': draw each seed's noise at WxH and paste it into the "
                        "middle, so that an image drawn at WxH keeps its composition at --width x --height")
    p.add_argument("--width", type=int, default=None, help="default: the engine's native size (img2img: the init image's)")
    p.add_argument("--height", type=int, default=None, help="as --width")
    p.add_argument("--num-images", type=int, default=1, help="images to draw (default 1), in batches of the engine's "
                   "largest; image i gets seed + i")
    p.add_argument("--sampler", default="dpmpp_2m_karras", choices=SAMPLERS, metavar="SAMPLER",
                   help="default dpmpp_2m_karras (AUTOMATIC1111's DPM++ 2M Karras); one of: " + ", ".join(SAMPLERS))
    p.add_argument("--clip-skip", type=int, default=1, metavar="N",
                   help="take the text encoder's output N - 1 layers before its last, as AUTOMATIC1111's "
                        "\"Clip skip\" counts (default 1: the last layer, for SDXL the penultimate; 2, the "
                        "penultimate, for models trained so, e.g. NovelAI-based anime models)")
    p.add_argument("--prompt-weighting", action=argparse.BooleanOptionalAction, default=True,
                   help="read AUTOMATIC1111's prompt syntax: emphasis (word) x1.1, [word] /1.1, (word:1.3), BREAK, "
                        "and prompt editing [from:to:when], [a|b] (default on; off: brackets are plain text, as "
                        "diffusers reads them)")
    p.add_argument("--hires-scale", type=float, default=None, metavar="X",
                   help="AUTOMATIC1111's hires fix: draw at --width x --height, enlarge X times (--hires-upscaler) and "
                        "redraw (e.g. 2: 512 px -> 1024 px without the repeated subjects of drawing 1024 directly)")
    p.add_argument("--hires-steps", type=int, default=None,
                   help="steps the redraw runs, as AUTOMATIC1111 counts them (default, or 0: --steps)")
    p.add_argument("--hires-strength", type=float, default=None, help="denoising strength of the redraw (default 0.7)")
    p.add_argument("--hires-upscaler", default=None, metavar="NAME",
                   help="how the first pass is enlarged, as AUTOMATIC1111 names it: Lanczos (default: the image), "
                        "or Latent, 'Latent (antialiased)', 'Latent (bicubic)', 'Latent (bicubic antialiased)', "
                        "'Latent (nearest)', 'Latent (nearest-exact)' (the latents; use --hires-strength 0.5 or more), "
                        "or an upscale model exported into the engine (ldm-export --upscaler 4x-UltraSharp.pth: "
                        "4x-UltraSharp)")
    p.add_argument("--hires-prompt", default=None, metavar="TEXT",
                   help="the redraw's prompt (AUTOMATIC1111's 'Hires prompt'; default: the prompt)")
    p.add_argument("--hires-negative-prompt", default=None, metavar="TEXT",
                   help="the redraw's negative prompt (default: the negative prompt)")
    p.add_argument("--hires-sampler", default=None, choices=SAMPLERS, metavar="SAMPLER",
                   help="the redraw's sampler (AUTOMATIC1111's 'Hires sampler'; default: --sampler)")
    p.add_argument("--refiner", default=None, metavar="DIR|MODEL",
                   help="an SDXL refiner that finishes each image, as AUTOMATIC1111's Refiner (it draws the last "
                        "part of the steps): its engine directory, or its diffusers folder or .safetensors file, "
                        "exported into the cache as --model is")
    p.add_argument("--refiner-switch-at", type=float, default=None, metavar="F",
                   help="the fraction of the walk after which the refiner draws (default 0.8)")
    p.add_argument("--aesthetic-score", type=float, default=None, metavar="X",
                   help="an SDXL refiner's aesthetic conditioning of the prompt (default 6.0)")
    p.add_argument("--negative-aesthetic-score", type=float, default=None, metavar="X",
                   help="... and of the negative prompt (default 2.5)")
    p.add_argument("--init-image", default=None, help="start from this image (img2img)")
    p.add_argument("--mask", default=None, metavar="FILE",
                   help="inpaint the init image where this image is white (black: kept), as diffusers' "
                        "inpainting pipeline does; with an inpainting model, or any other")
    p.add_argument("--mask-crop", type=pad_or_none, default=None, metavar="PAD",
                   help="inpaint only the masked area (AUTOMATIC1111's 'Only masked', e.g. 32): the box around the "
                        "mask, PAD px wider, is drawn at --width x --height (default: the model's size) and pasted "
                        "back; 'none': the whole picture (over a --from-png image's 'Only masked')")
    p.add_argument("--mask-blur", type=float, default=None, metavar="PX",
                   help="blur the mask by PX px first (AUTOMATIC1111's 'Mask blur', e.g. 4): with --mask-crop, a "
                        "soft paste")
    p.add_argument("--masked-content", default="original", choices=("original", "fill", "latent noise",
                                                                     "latent nothing"),
                   help="with --mask, AUTOMATIC1111's 'Masked content': original (the image there, noised; default), "
                        "fill (first painted with the blurred colours around it: for removing things), 'latent "
                        "noise' or 'latent nothing' (its latents there replaced by the seed's noise or by zeros: "
                        "with --strength below 1)")
    p.add_argument("--resize-mode", default="just-resize", choices=("just-resize", "crop-and-resize", "resize-and-fill"),
                   help="how an --init-image (and its --mask) of another aspect than --width x --height is fitted, "
                        "AUTOMATIC1111's 'Resize mode': just-resize (stretched; default), crop-and-resize (its "
                        "middle), resize-and-fill (its edges stretched into the bands)")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img: how much to change the init image, (0, 1] (default 0.8; with --mask 1.0)")
    p.add_argument("--noise-multiplier", type=float, default=1.0, metavar="X",
                   help="img2img: scale the noise added to the init image (AUTOMATIC1111's 'Noise multiplier for "
                        "img2img', e.g. 1.05; default 1)")
    p.add_argument("--control-image", action="append", default=None, metavar="FILE",
                   help="engines with ControlNets (ldm-export --controlnet): the ControlNet's image (an edge map, "
                        "a pose, a depth map, ... as it was trained on); repeat in the ControlNets' order, 'none' "
                        "for one that is off. Without --init-image it sets the size drawn")
    p.add_argument("--control-scale", type=float, action="append", default=None, metavar="X",
                   help="how strongly each ControlNet steers (default 1.0, AUTOMATIC1111's weight; repeat for each)")
    p.add_argument("--control-start", type=float, action="append", default=None, metavar="F",
                   help="the fraction of the steps after which each ControlNet starts acting (default 0)")
    p.add_argument("--control-end", type=float, action="append", default=None, metavar="F",
                   help="the fraction of the steps after which it stops (default 1)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="run the VAE on overlapping tiles, as diffusers' enable_vae_tiling(): large images in a "
                        "tile's memory")
    p.add_argument("--vae-tile-size", type=int, default=None, metavar="PX",
                   help="with --vae-tiling (which it implies), the tiles' side: a multiple of 32 (default the "
                        "VAE's: 512 px for SD 1.x, 1024 for SDXL)")
    p.add_argument("--out", default=None,
                   help="PNG path, or a folder to write into; with several images, NAME-0.png, NAME-1.png, ... "
                        "(default: output.png, numbered output-2.png, output-3.png, ... so as not to overwrite)")
    p.add_argument("--backend", default="auto", help="default: the engine's own (a TensorRT engine runs "
                   "on ONNX Runtime where TensorRT or a GPU is missing); openvino runs ONNX engines on the CPU")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16"),
                   help="openvino: compute in bf16 on CPUs with bf16 units (Intel AMX: ~3.5x faster, "
                        "images differ slightly); default fp32")
    p.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch engines: compile the components held as exported programs (ldm-export --no-aoti, "
                        "or where AOTInductor failed) with torch.compile on their first call (a minute or so); "
                        "default: on for CUDA engines, off on the CPU")
    p.add_argument("--static-shapes", action="store_true",
                   help="openvino: compile each component for the exact sizes of the call (again when they "
                        "change): faster steps (0.9x at 512 px on a 2-core CPU), seconds of compiling per size, "
                        "about 1.5x ONNX Runtime's memory")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime, openvino: CPU threads (default: all)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the SHA-256 check of the engine files (about 1 s per GB; sizes are still checked)")
    p.add_argument("--rebuild-stale", action="store_true", help="tensorrt: rebuild plans made for another GPU "
                   "or TensorRT version from the engine's ONNX graphs (minutes)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def size(text: str) -> tuple[int, int] | None:
    """WxH (e.g. 512x768) -> (width, height), for argparse; 0x0 (a side 0): None."""
    w, x, h = text.lower().partition("x")
    if not (x and w.isdigit() and h.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT (e.g. 512x768; 0x0: none)")
    return (int(w), int(h)) if int(w) and int(h) else None


def engine_dir(args) -> str:
    given = [flag for flag, field in MODEL_OPTIONS.items() if getattr(args, field)]
    given += [flag for flag, field in SIZE_OPTIONS.items() if getattr(args, field) is not None]
    if given and not args.model:
        built = "has them built in: see its manifest" if args.engine else "is the bundled shapes model"
        raise UserError(f"{', '.join(given)} set what --model exports into its cached engine; the engine "
                        f"here {built}. Pass --model, or export with ldm-export {given[0]} ... --out DIR")
    if args.engine:
        return args.engine
    from ldm_deploy.cache import engine_for

    if args.model:
        return str(engine_for(args.model, model_options(args) | size_options(args)))
    from ldm_deploy import shapes

    return str(engine_for(shapes.MODEL_DIR, shapes.EXPORT_SETTINGS, "shapes"))


def refiner_dir(args, tiling: bool = False) -> tuple[str, bool]:
    """--refiner -> (its engine directory, whether it is a cached one): an engine directory, or a
    model (folder or checkpoint) whose ONNX Runtime engine is exported into the cache as --model's
    is (no LoRA or other network: refiners take none; tiling as the base engine's)."""
    path = Path(args.refiner).expanduser()
    if (path / "manifest.json").is_file():
        return str(path), False
    from ldm_deploy.cache import engine_for

    settings = ({"allow_pickle": True} if args.allow_pickle else {}) | size_options(args)  # (the sides --model's take)
    return str(engine_for(path, settings | ({"tiling": True} if tiling else {}))), True


# ldm-run options a PNG's parameters may set: dest -> the default when neither sets it.
FROM_PNG = {"negative_prompt": None, "steps": 30, "guidance": 7.5, "seed": None, "width": None, "height": None,
            "sampler": "dpmpp_2m_karras", "clip_skip": 1, "prompt_weighting": True, "hires_scale": None,
            "hires_steps": None, "hires_strength": None, "hires_upscaler": None, "hires_prompt": None,
            "hires_negative_prompt": None, "hires_sampler": None, "strength": None, "mask_blur": None,
            "mask_crop": None, "refiner_switch_at": None, "variation_seed": None, "variation_strength": 0.0, "seed_resize_from": None,
            "noise_multiplier": 1.0}
UNSET = object()


def from_png(args) -> dict:
    """Fill what the command line left UNSET from --from-png's parameters, then from defaults;
    returns the PNG's fields (none without --from-png)."""
    fields = {}
    if args.from_png is not None:
        from ldm_deploy.engine import infotext

        prompt, negative, fields, read_warnings = infotext.read(args.from_png)
        if args.prompt is None and prompt is None:  # (a ComfyUI graph whose prompt is not a CLIPTextEncode's)
            for warning in read_warnings:
                log.warning("%s", warning)
            raise UserError(f"--from-png {args.from_png}: it gives no prompt that can be read here; give one "
                            "on the command line")
        given = {k for k in FROM_PNG if getattr(args, k) is not UNSET}
        values, warnings = infotext.settings(fields, given)
        for warning in read_warnings + warnings:
            log.warning("%s", warning)
        if args.prompt is None:
            args.prompt = prompt
        if "negative_prompt" not in given:  # none written: none given (SDXL: zeros, as AUTOMATIC1111 draws
            # it), but where ours says the empty one was encoded
            values["negative_prompt"] = negative or ("" if fields.get(infotext.EMPTY_NEGATIVE) == "encoded" else None)
        for key, value in values.items():
            setattr(args, key, value)
        args.png_given = set(values)  # (a mistake in one of them is the PNG's: names() says so)
    for key, default in FROM_PNG.items():
        if getattr(args, key) is UNSET:
            setattr(args, key, default)
    return fields


def control_options(args, count: int) -> dict:
    """--control-* as Pipeline keywords: one value for one ControlNet, a list for several; those
    not given from a --from-png image's ControlNet units (ControlNet i: the engine's i-th), where
    its control images are given."""
    png = getattr(args, "png_controls", None)
    if png and args.control_image and max(png) >= count:
        log.warning("the image's ControlNet %s is not taken: this engine holds %d ControlNet%s (the PNG's units "
                    "are taken as the engine's ControlNets in order)", max(png), count, "" if count == 1 else "s")
    if png and args.control_image and count:
        for index, key in enumerate(("control_scale", "control_start", "control_end")):
            if getattr(args, key) is None:
                setattr(args, key, [png.get(i, (1.0, 0.0, 1.0))[index] for i in range(count)])
    out = {}
    for key, value in (("control_image", args.control_image), ("control_scale", args.control_scale),
                       ("control_start", args.control_start), ("control_end", args.control_end)):
        if value is not None:
            if key == "control_image":
                value = [None if v.lower() == "none" else v for v in value]
            out[key] = value[0] if len(value) == 1 else value
    if out.get("control_image") is not None:
        out.setdefault("control_scale", 1.0)  # AUTOMATIC1111's weight (the API takes diffusers' defaults)
    return out


def pasted_styles(args, saved: dict, fields: dict, given_here: set, typed_prompt: bool) -> tuple:
    """(prompt, negative prompt, hires prompt, hires negative prompt) with the --style styles that
    those read from the PNG already hold taken out of them (they are applied again after); those
    typed on the command line are left as they are."""
    from ldm_deploy.engine import styles

    def pasted(key, typed):
        value = getattr(args, key)
        return None if typed or value is None and key.startswith("hires") else (value or "")

    prompt, negative, found = styles.unapply(args.style, saved, pasted("prompt", typed_prompt),
                                             pasted("negative_prompt", "negative_prompt" in given_here))
    if found:
        log.info("the PNG's prompts hold the style%s %s already", "s" * (len(found) > 1), ", ".join(found))
    hires = [styles.unapply(found, saved, pasted("hires_prompt", "hires_prompt" in given_here), None)[0],
             styles.unapply(found, saved, None, pasted("hires_negative_prompt", "hires_negative_prompt" in given_here))[1]]
    out = []
    for key, bare in zip(("prompt", "negative_prompt", "hires_prompt", "hires_negative_prompt"), (prompt, negative, *hires)):
        value = getattr(args, key)
        out.append(value if bare is None or value is None else bare)
    return tuple(out)


def main(argv=None) -> int:
    # Options a PNG may set start UNSET (argparse keeps what a namespace holds), so that those
    # given on the command line can be told from defaults.
    options = parser()
    args = options.parse_args(argv, namespace=argparse.Namespace(**{k: UNSET for k in FROM_PNG}))
    setup_logging(args.verbose)

    def go():
        from ldm_deploy.engine import styles
        from ldm_deploy.engine.images import save_png
        from ldm_deploy.engine.pipeline import Pipeline

        if args.num_images < 1:
            raise UserError(f"--num-images must be at least 1, got {args.num_images}")
        if args.prompt is None and args.from_png is None:
            raise UserError("give a prompt, or --from-png FILE to draw a PNG's again")
        if args.mask is not None and args.init_image is None:
            raise UserError("--mask marks what to redraw of an image: give that image with --init-image")
        if args.mask_blur is not UNSET and args.mask_blur is not None and args.mask is None:
            raise UserError("--mask-blur blurs a mask: give --mask (and --init-image)")
        if args.masked_content != "original" and args.mask is None:
            raise UserError(f"--masked-content {args.masked_content} fills the masked part of an image: give --mask "
                            "(and --init-image)")
        if args.mask_crop is not UNSET and args.mask_crop is not None and args.mask is None:
            raise UserError("--mask-crop inpaints the area around a mask: give --mask (and --init-image)")
        given_here = {k for k in FROM_PNG if getattr(args, k) is not UNSET}  # on the command line
        typed_prompt = args.prompt is not None
        fields = from_png(args)  # before a --model export: its mistakes are found in seconds
        if getattr(args, "png_controls", None) and not args.control_image:
            units = ", ".join(str(i) for i in sorted(args.png_controls))
            log.warning("the image was drawn with ControlNet %s, whose control image is not in the PNG: give it with "
                        "--control-image (its weight and guidance are then the PNG's), or the image will differ", units)
        if fields.get("Tiling") == "True" and args.model and not args.tiling:
            log.info("the PNG was drawn to tile (Tiling: True): --model's engine is exported with --tiling")
            args.tiling = True
        if not args.variation_strength and "variation_seed" not in given_here:
            args.variation_seed = None  # a PNG's, its variation turned off here
        if args.variation_strength is not None and not 0 <= args.variation_strength <= 1:
            raise UserError(f"--variation-strength is from 0 to 1, got {args.variation_strength}")
        if args.variation_seed is not None and not args.variation_strength:
            raise UserError("--variation-seed is the seed the noise varies toward: give --variation-strength too "
                            "(e.g. 0.1)")
        if args.clip_skip < 1:
            raise UserError(f"--clip-skip counts from 1 (the last layer: no skip), got {args.clip_skip}")
        if args.style:  # before anything is loaded: a misspelt name is found at once
            saved = styles.read(args.styles_file)
            if fields:  # a PNG's prompts hold the styles it was drawn with: not applied twice
                args.prompt, args.negative_prompt, args.hires_prompt, args.hires_negative_prompt = pasted_styles(
                    args, saved, fields, given_here, typed_prompt)
            args.prompt, args.negative_prompt = styles.apply(args.style, saved, args.prompt, args.negative_prompt)
            # the hires pass's own prompts too (none given: it takes the styled ones)
            if args.hires_prompt is not None:
                args.hires_prompt = styles.apply(args.style, saved, args.hires_prompt, None)[0]
            if args.hires_negative_prompt is not None:
                args.hires_negative_prompt = styles.apply(args.style, saved, "", args.hires_negative_prompt)[1]
        paths = output_paths(args.out, args.num_images)
        check_folder(paths[0], "--out")
        options = {"threads": args.threads} if args.threads else {}
        if args.precision:
            if args.backend != "openvino":
                raise UserError("--precision is a choice of the openvino backend (--backend openvino); "
                                "other engines have their precision from ldm-export")
            options["precision"] = args.precision
        if args.static_shapes:
            if args.backend != "openvino":
                raise UserError("--static-shapes is a choice of the openvino backend (--backend openvino); "
                                "for TensorRT and torch engines it is an ldm-export option")
            options["static_shapes"] = True
        if args.threads is not None and args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        if args.refiner is None and args.refiner_switch_at is not None and "refiner_switch_at" in given_here:
            raise UserError("--refiner-switch-at is where a refiner takes over: give --refiner ENGINE too")
        if args.refiner is not None and not Path(args.refiner).expanduser().exists():
            raise UserError(f"--refiner {args.refiner} does not exist; pass the refiner's engine directory "
                            "(ldm-export), diffusers folder or .safetensors checkpoint")
        if args.refiner is not None and args.refiner_switch_at not in (0, 1):  # said before either model loads
            from ldm_deploy.engine.samplers import EVALUATIONS_PER_STEP

            if args.sampler in EVALUATIONS_PER_STEP:
                raise UserError(f"--sampler {args.sampler} takes two U-Net calls a step, which the refiner's switch "
                                "can split; choose another sampler for a refiner")
        directory = engine_dir(args)  # for --model: its ONNX Runtime engine, exported into the cache
        if args.torch_compile is not None:
            from ldm_deploy.engine import backends
            from ldm_deploy.engine.manifest import read_manifest

            name = args.backend if args.backend != "auto" else backends.auto(read_manifest(Path(directory)))
            if name != "torch":
                flag = "--torch-compile" if args.torch_compile else "--no-torch-compile"
                raise UserError(f"{flag} applies to torch engines (ldm-export --backend torch); "
                                f"this one runs on {name}")
            options["compile"] = args.torch_compile
        if args.vae_tiling or args.vae_tile_size is not None:  # (a bad size said before the engine loads)
            from ldm_deploy.engine.manifest import read_manifest
            from ldm_deploy.engine.vae_tiling import tile_of

            manifest = read_manifest(Path(directory))
            tile_of(args.vae_tile_size, manifest.model, manifest.size_multiple)
        pipe = Pipeline.load(directory, backend=args.backend, verify=not args.no_verify,
                             rebuild_stale=args.rebuild_stale, **options)
        refiner = None
        if args.refiner is not None:
            refiner_engine, cached = refiner_dir(args, pipe.manifest.model.tiling)
            # a refiner given as a model: its cached engine is ONNX Runtime's, whatever --backend says
            refiner = Pipeline.load(refiner_engine, backend="auto" if cached else args.backend,
                                    verify=not args.no_verify, rebuild_stale=args.rebuild_stale,
                                    **({} if cached and args.backend != "auto" else options))
        else:
            args.refiner_switch_at = None  # a PNG's, without a refiner to switch to
        if args.vae_tiling or args.vae_tile_size is not None:
            for each in (pipe, refiner) if refiner is not None else (pipe,):
                each.enable_vae_tiling(args.vae_tile_size)
        if fields:
            from ldm_deploy.engine.infotext import model_warning, refiner_warning, tiling_warning, upscaler_warning

            for warning in (model_warning(fields, pipe.manifest.model),
                            refiner_warning(fields, refiner and refiner.manifest.model.model_hash),
                            tiling_warning(fields, pipe.manifest.model.tiling)):
                if warning:
                    log.warning("%s", warning)
            if "hires_upscaler" not in given_here and args.hires_scale is not None:
                warning = upscaler_warning(fields, args.hires_upscaler, pipe.manifest.upscalers)
                if warning:
                    log.warning("%s", warning)
                    args.hires_upscaler = "Lanczos"
        if args.strength is not None and args.init_image is None:
            log.warning("%s applies to img2img only (with --init-image); ignored", "--strength" if
                        "strength" in given_here else "the PNG's Denoising strength")
        if args.noise_multiplier != 1 and args.init_image is None and "noise_multiplier" in given_here:
            log.warning("--noise-multiplier applies to img2img only (with --init-image); ignored")
        layers = pipe.manifest.model.text_layers
        if layers and args.clip_skip > layers:
            first = "the penultimate, as SDXL is trained" if pipe.manifest.model.pooled_width else "the last"
            raise UserError(f"--clip-skip {args.clip_skip}: this model's text encoder has {layers} layers; "
                            f"pass 1 ({first}) to {layers}")
        if "Clip skip" in fields and not fields.get("Version", "").startswith("ldm-deploy") \
                and pipe.manifest.model.pooled_width and args.clip_skip != 1 and "clip_skip" not in given_here:
            log.warning("the PNG's \"Clip skip: %s\" is left out: AUTOMATIC1111 does not apply it to SDXL models "
                        "(pass --clip-skip to choose one)", fields["Clip skip"])
            args.clip_skip = 1
        settings = dict(
            negative_prompt=args.negative_prompt,
            steps=args.steps,
            guidance=args.guidance,
            variation_strength=args.variation_strength,
            seed_resize_from=args.seed_resize_from,
            width=args.width,
            height=args.height,
            sampler=args.sampler,
            init_image=args.init_image,
            mask=args.mask,
            mask_crop=args.mask_crop if args.mask is not None else None,  # a PNG's Only masked: with a mask only
            mask_blur=args.mask_blur if args.mask is not None else None,  # a PNG's Mask blur: with a mask only
            masked_content=args.masked_content,
            resize_mode=args.resize_mode,
            **control_options(args, len(pipe.manifest.model.controlnets)),
            strength=args.strength,
            noise_multiplier=args.noise_multiplier,
            clip_skip=args.clip_skip - 1,
            prompt_weighting=args.prompt_weighting,
            hires_scale=args.hires_scale,
            hires_steps=args.hires_steps,
            hires_strength=args.hires_strength,
            hires_upscaler=args.hires_upscaler,
            hires_prompt=args.hires_prompt,
            hires_negative_prompt=args.hires_negative_prompt,
            hires_sampler=args.hires_sampler,
            refiner=refiner,
            refiner_switch_at=args.refiner_switch_at,
            aesthetic_score=args.aesthetic_score,
            negative_aesthetic_score=args.negative_aesthetic_score,
            progress=not args.quiet,
        )
        for first, count, seeds, variation_seeds in calls(args, pipe, refiner):
            images = pipe(args.prompt, seed=seeds, variation_seed=variation_seeds, num_images=count, **settings)
            for image, path in zip(images, paths[first:]):
                save_png(image, path)
                log.info("wrote %s", path)

    def names():
        import inspect

        from ldm_deploy.engine.pipeline import Pipeline

        flags = flag_names(options, inspect.signature(Pipeline.__call__).parameters)
        return {k: f"{v} (the PNG's)" if k in getattr(args, "png_given", ()) else v for k, v in flags.items()}

    return run_main(go, "ldm-run", names)


if __name__ == "__main__":
    sys.exit(main())
