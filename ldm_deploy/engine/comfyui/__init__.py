"""ComfyUI's PNGs, read for `ldm-run --from-png`: ComfyUI writes no `parameters` text but the graph
it ran, in its API format, as the `prompt` text chunk:

    {"3": {"class_type": "KSampler", "inputs": {"seed": 7, "steps": 20, "cfg": 8.0,
           "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
           "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
     "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
     "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}}, ...}

(an input wired to another node is [node id, output index]). Its text-to-image generation, the
sampler node that starts from an EmptyLatentImage, becomes AUTOMATIC1111's fields (infotext.py),
read as AUTOMATIC1111's are; what this reads only in part is warned about. A graph without one is
read by its image-to-image pass, the sampler node that starts from a VAEEncode (of a LoadImage's
image, which --init-image must give again).

ComfyUI's img2img draws `steps` steps, the last of a walk of int(steps / denoise) (KSamplerAdvanced:
of `steps` from start_at_step); diffusers' (ours) draws int(steps x strength) of `steps`. So a
denoise below 1 reads as that whole walk's Steps and the Denoising strength that runs those last
`steps` steps: "steps 20, denoise 0.7" is Steps 28, Denoising strength 0.7143.

Its "hires fix", a second KSampler from the first's latents enlarged (LatentUpscale / LatentUpscaleBy,
or decoded, ImageScale / ImageScaleBy with lanczos and encoded again; or decoded, enlarged by an upscale
model, ImageUpscaleWithModel of an UpscaleModelLoader's file, maybe resized, and encoded: the model then
named as AUTOMATIC1111 names it, by its file, its scale read from that name), reads as AUTOMATIC1111's: Hires upscale,
its upscaler, Hires steps and Denoising strength from the second pass's steps and denoise (both draw
`steps` steps, the last of int(steps / denoise)), and the second pass's sampler and prompts where
they are not the first's.

Its inpainting, a sampler node that starts from a LoadImage's picture encoded with its mask
(VAEEncodeForInpaint, a VAEEncode's latents given a SetLatentNoiseMask, or InpaintModelConditioning's
latent, whose conditioning is then its CLIPTextEncodes'), reads as its image-to-image does, with
warnings that say which picture --init-image and which mask --mask must give again (ComfyUI keeps a
mask painted in its editor in the picture's alpha channel) and how its inpainting differs from
diffusers' (ours).

Its tiled VAE nodes (VAEDecodeTiled, VAEEncodeTiled) read as the plain ones, with a warning that
advises --vae-tiling (ours are diffusers' tiles, near its own).
"""

from __future__ import annotations

import json
import math
import re

from ldm_deploy.engine.comfyui.graph import (
    SAMPLER_NODES,
    TILED,
    describe,
    encoded_text,
    inputs_of,
    kind,
    linked,
    model_chain,
    model_name,
    source_image,
)
from ldm_deploy.engine.comfyui.hires import name_scale, second_pass
from ldm_deploy.engine.comfyui.inpaint import inpaint_differences, inpaint_start, mask_source, start_kind
from ldm_deploy.engine.comfyui.walk import advanced_start, sampler_name, walk_cut
from ldm_deploy.engine.infotext import EMPTY_NEGATIVE
from ldm_deploy.errors import UserError

__all__ = ["NEAR", "describe", "name_scale", "read"]

TEXT_NODES = ("CLIPTextEncode", "CLIPTextEncodeSDXL")
# Nodes that change nothing of what is read here (loaders, encoding, decoding, saving, previews).
PLAIN_NODES = {"CheckpointLoaderSimple", "EmptyLatentImage", "VAEDecode", "SaveImage", "PreviewImage", "LoadImage",
               "VAEEncode", *TEXT_NODES, *SAMPLER_NODES}
# ComfyUI's samplers are k-diffusion's, walking noise levels as it does; ours are diffusers' schedulers.
NEAR = ("the image was drawn by ComfyUI, whose samplers walk k-diffusion's noise levels where ours are diffusers' "
        "schedulers': near, so the image will differ a little")
WEIGHTED = re.compile(r"(?<!\\)\(|embedding:")  # its emphasis, (word) and (word:1.2), and its embeddings


def read(chunk: str) -> tuple[str | None, str | None, dict[str, str], list[str]]:
    """ComfyUI's `prompt` chunk -> (prompt, negative prompt, AUTOMATIC1111's fields, warnings).
    What cannot be read is left out (None for a prompt) with a warning saying why, so that the
    command line may give it; a graph with nothing to draw is a UserError."""
    try:
        graph = json.loads(chunk)
    except json.JSONDecodeError as e:
        raise UserError(f"its 'prompt' text chunk is not ComfyUI's graph (not JSON: {e})") from None
    if not isinstance(graph, dict):
        raise UserError("its 'prompt' text chunk is not ComfyUI's graph (not a JSON object of nodes)")
    graph = {str(k): n for k, n in graph.items() if isinstance(n, dict)}
    samplers = [(key, node) for key, node in graph.items() if kind(node) in SAMPLER_NODES]
    # (an img2img pass is one from a VAEEncode of a LoadImage's picture, which --init-image gives again)
    starts = {start_kind(graph, inputs_of(node)): (key, node) for key, node in reversed(samplers)}
    found = [k for k in ("EmptyLatentImage", "VAEEncode", "Inpaint") if k in starts]
    if not found:
        raise UserError("its ComfyUI graph has no KSampler starting from an EmptyLatentImage or a VAEEncode of a "
                        "LoadImage (plain, or for inpainting: VAEEncodeForInpaint, SetLatentNoiseMask, "
                        "InpaintModelConditioning): give the settings on the command line instead")
    img2img, inpaint = found[0] != "EmptyLatentImage", found[0] == "Inpaint"
    key, node = starts[found[0]]  # (the first such node of the graph)
    inputs = inputs_of(node)
    advanced = kind(node) == "KSamplerAdvanced"
    latent = inputs_of(linked(graph, inputs, "latent_image"))
    inpaint_ids = set()
    if inpaint:  # the encoding node (with its pixels), past a SetLatentNoiseMask
        latent, masked, inpaint_ids = inpaint_start(graph, inputs)
    warnings = [NEAR]

    def number(source: dict, name: str, integer: bool = True):
        value = source.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (integer and value != int(value)):
            warnings.append(f"its {name} is {describe(value)}, not read: ldm-run's default (or the option given) "
                            "is used")
            return None
        return int(value) if integer else float(value)

    fields = {"Version": "ComfyUI", "Steps": number(inputs, "steps"), "CFG scale": number(inputs, "cfg", False),
              "Seed": number(inputs, "noise_seed" if advanced else "seed")}
    if img2img:
        fields["Steps"], fields["Denoising strength"] = walk_cut(inputs, advanced, fields["Steps"], warnings)
        if inpaint:
            starts_from = {kind(graph[k]) for k in inpaint_ids}  # (a SetLatentNoiseMask's encoder among them)
            mask, mask_ids = mask_source(graph, masked)
            inpaint_ids |= mask_ids
            warnings.append(f"its inpainting pass starts from {source_image(graph, latent)} and a mask: give them with "
                            "--init-image and --mask (without the picture, a text-to-image is drawn; without the "
                            f"mask, the whole picture is redrawn); its mask is {mask}")
            warnings.extend(inpaint_differences(starts_from, masked, latent))
        else:
            warnings.append(f"its image-to-image pass starts from {source_image(graph, latent)}: give that image "
                            "with --init-image (without it, a text-to-image is drawn)")
        warnings.append("its image-to-image start is ComfyUI's own: it encodes the picture to the VAE's mean and "
                        "draws the seed's noise first, where diffusers (and ours) draws a sample of the VAE's "
                        "distribution first, so the noise and the image differ more than a little")
    size = None  # (width, height) of the text-to-image pass; img2img: the init image's, not known here
    if not img2img:
        width, height = number(latent, "width"), number(latent, "height")
        if width is not None and height is not None:
            size = width, height
            fields["Size"] = f"{width}x{height}"
    fields["Sampler"] = sampler_name(inputs.get("sampler_name"), inputs.get("scheduler"))
    checkpoint, tags, read_ids = model_chain(graph, inputs, warnings)
    ckpt = model_name(checkpoint)
    if ckpt:
        fields["Model"] = ckpt
    texts = [encoded_text(graph, inputs, name, warnings, size) for name in ("positive", "negative")]
    prompt, negative = texts
    if prompt is not None and tags:  # AUTOMATIC1111's tags, checked against the engine's LoRAs (extra_networks.py)
        prompt = " ".join([prompt, *tags]) if prompt else " ".join(tags)
    if negative == "":  # ComfyUI encodes the empty text (SDXL base here draws none as zeros)
        fields[EMPTY_NEGATIVE] = "encoded"
    name = inputs.get("sampler_name")
    if isinstance(name, str) and name.endswith("_gpu"):
        warnings.append(f"its {name} drew its Brownian noise on the GPU; here it comes from the CPU")
    if any(WEIGHTED.search(t or "") for t in (prompt, negative)):
        warnings.append("its prompt weighs words or names embeddings, which ComfyUI applies otherwise than "
                        "AUTOMATIC1111 (and ours): toward the empty prompt's embedding, so the image will differ")
    batch = latent.get("batch_size", 1)
    if batch != 1:
        warnings.append(f"its batch of {describe(batch)} drew one noise for all; here one image is drawn, the "
                        "batch's first (--num-images draws seed + i each)")
    if img2img:
        pass  # (its walk's cut read above)
    elif advanced:
        if advanced_start(inputs, fields["Steps"]) != 0:
            warnings.append("its KSamplerAdvanced draws part of a walk (start_at_step / end_at_step / add_noise), "
                            "which is not read: the whole walk is drawn")
    elif inputs.get("denoise", 1.0) != 1.0:
        warnings.append(f"its denoise is {describe(inputs.get('denoise'))} (1: the whole walk; less, a walk of "
                        "steps / denoise cut short), not read: the whole walk is drawn")
    hires_ids = set() if img2img else second_pass(graph, key, size, fields, *texts, tags, warnings)
    if len(samplers) > 1 + bool(hires_ids):
        warnings.append(f"its graph samples {len(samplers)} times; only node {key}'s "
                        f"{'inpainting' if inpaint else 'image-to-image' if img2img else 'text-to-image'} pass "
                        f"{'and its hires fix are' if hires_ids else 'is'} drawn")
    read_ids |= hires_ids | inpaint_ids
    tiled_nodes = [n for n in graph.values() if isinstance(n.get("class_type"), str) and n["class_type"] in TILED]
    if tiled_nodes:
        tiled = sorted({n["class_type"] for n in tiled_nodes})
        sizes = sorted({describe(inputs_of(n).get("tile_size")) for n in tiled_nodes})
        warnings.append(f"its {' and '.join(tiled)} {'runs' if len(tiled) == 1 else 'run'} the VAE in ComfyUI's "
                        f"tiles (tile_size {', '.join(sizes)}); here it runs whole, or with --vae-tiling in diffusers' "
                        "tiles (of the model's size, or --vae-tile-size), near ComfyUI's")
    others = sorted({kind(n) for k, n in graph.items() if k not in read_ids} - PLAIN_NODES)
    if others:
        warnings.append(f"its graph's {', '.join(others)} {'is' if len(others) == 1 else 'are'} not drawn here, so "
                        "the image may differ")
    return prompt, negative, {k: str(v) for k, v in fields.items() if v is not None}, warnings
