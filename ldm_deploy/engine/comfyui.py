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

from ldm_deploy.engine.infotext import EMPTY_NEGATIVE
from ldm_deploy.errors import UserError

# ComfyUI's sampler names -> AUTOMATIC1111's (ours: infotext.sampler maps them on); "_gpu": the
# same sampler with its Brownian noise drawn on the GPU; its "ddim" is its Euler (with inpainting's
# random noise), so Euler here.
SAMPLERS = {"euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2",
            "dpm_2_ancestral": "DPM2 a", "dpmpp_2m": "DPM++ 2M", "dpmpp_sde": "DPM++ SDE",
            "dpmpp_sde_gpu": "DPM++ SDE", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2m_sde_gpu": "DPM++ 2M SDE",
            "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun_gpu": "DPM++ 2M SDE Heun",
            "dpmpp_3m_sde": "DPM++ 3M SDE", "dpmpp_3m_sde_gpu": "DPM++ 3M SDE", "ddim": "Euler", "ddpm": "DDPM",
            "uni_pc": "UniPC", "lcm": "LCM", "dpmpp_2s_ancestral": "DPM++ 2S a"}
# Its schedulers -> AUTOMATIC1111's schedule types. "normal": timesteps evenly spaced (ours' uniform);
# "simple": every (1000 / steps)-th timestep from the last, what our SGM Uniform (diffusers' trailing)
# takes; its "sgm_uniform" spaces them at fractions, near that.
SCHEDULES = {"normal": "Uniform", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
             "simple": "SGM Uniform", "beta": "Beta"}
# Samplers of one walk of their own here (diffusers' DDPM and LCM schedulers), whichever scheduler.
OWN_WALK = ("DDPM", "LCM")
SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
TEXT_NODES = ("CLIPTextEncode", "CLIPTextEncodeSDXL")
# Nodes that change nothing of what is read here (loaders, encoding, decoding, saving, previews).
LORA_NODES = ("LoraLoader", "LoraLoaderModelOnly")
PLAIN_NODES = {"CheckpointLoaderSimple", "EmptyLatentImage", "VAEDecode", "SaveImage", "PreviewImage", "LoadImage",
               "VAEEncode", *TEXT_NODES, *SAMPLER_NODES}
# Its tiled VAE nodes read as the plain ones (kind), with --vae-tiling advised: its tiles are its own
# (tile_size and overlap in px; its decoder averages three tilings), ours diffusers'.
TILED = {"VAEDecodeTiled": "VAEDecode", "VAEEncodeTiled": "VAEEncode"}
# Its nodes that start an inpainting pass: the latent a sampler starts from (module docstring).
INPAINT_NODES = ("SetLatentNoiseMask", "VAEEncodeForInpaint", "InpaintModelConditioning")
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


# ComfyUI's latent upscale methods -> ours (AUTOMATIC1111's names); its "area" and "bislerp" are not offered.
LATENT_METHODS = {"bilinear": "Latent", "bicubic": "Latent (bicubic)", "nearest-exact": "Latent (nearest-exact)"}


def second_pass(graph: dict, first: str, size: tuple | None, fields: dict, prompt, negative, tags: list,
                warnings: list) -> set[str]:
    """Read the hires fix of the text-to-image pass at node `first`, of `size`, into `fields` (the module's
    docstring): the first second pass that can be read, else a warning naming why the first
    found cannot. -> the ids of the nodes read (none where none is read). prompt, negative: the
    first pass's texts; tags: its LoRAs' (model_chain), which a hires prompt carries too."""
    why = None
    for key, node in graph.items():
        found = upscaling(graph, first, inputs_of(node), size) if kind(node) in SAMPLER_NODES else None
        if found is None:
            continue
        ids, upscaler, method, target = found
        reason = ("is a KSamplerAdvanced" if kind(node) != "KSampler" else
                  "enlarges with an upscale model not read here (not an UpscaleModelLoader's file)"
                  if upscaler is None and method is None and target is None else
                  f"has upscale_method {describe(method)}, not offered here" if upscaler is None else
                  f"enlarges to a size not read here ({target})" if isinstance(target, str) else None)
        steps, denoise = inputs_of(node).get("steps"), inputs_of(node).get("denoise", 1.0)
        if reason is None and not (all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (steps, denoise))
                                   and steps == int(steps) and steps >= 1 and 0 < denoise <= 1):
            reason = f"has steps {describe(steps)} and denoise {describe(denoise)}, not read"
        if reason is None and upscaler not in ("Lanczos", *LATENT_METHODS.values()):  # an upscale model
            warnings.append(f"its hires fix (node {key}) enlarges with the upscale model {upscaler!r} in ComfyUI's "
                            f"tiles{'' if method in (None, 'lanczos') else f', then resizes with {method}'}; here "
                            "with AUTOMATIC1111's tiles, then Lanczos, so the image is near, not the same")
        if reason is None:
            return {key, *ids} | read_hires(graph, key, node, size, target, upscaler, fields, prompt, negative,
                                            tags, warnings)
        why = why or f"its hires fix (node {key}) is not drawn: it {reason} (--hires-scale and its options give one)"
    if why:
        warnings.append(why)
    return set()


def read_hires(graph, key, node, size, target, upscaler, fields, prompt, negative, tags, warnings) -> set[str]:
    """The fields of a second pass that can be read (second_pass); -> the ids of its LoRA loaders."""
    from ldm_deploy.engine.hires import MAX_SCALE, target_size

    name = f"its hires fix (node {key})"
    inputs = inputs_of(node)
    width, height = size
    scale = max(target[0] / width, target[1] / height)
    while int(width * scale) < target[0] or int(height * scale) < target[1]:  # (a float hair under)
        scale = math.nextafter(scale, math.inf)
    ours = target_size(width, height, scale, 8)
    if ours != target:
        warnings.append(f"{name} enlarges to {target[0]}x{target[1]}, which one scale of both sides does not give "
                        f"here: {ours[0]}x{ours[1]} instead")
    if not 1 < scale <= MAX_SCALE:
        warnings.append(f"{name} enlarges by {scale:g}, outside (1, {MAX_SCALE}] here: not drawn")
        return set()
    fields.update({"Hires upscale": scale, "Hires upscaler": upscaler, "Hires steps": int(inputs["steps"]),
                   "Denoising strength": inputs.get("denoise", 1.0)})
    hires_sampler = sampler_name(inputs.get("sampler_name"), inputs.get("scheduler"))
    if hires_sampler.startswith("ComfyUI's"):  # (not offered: the first pass's, or --hires-sampler)
        warnings.append(f"{name} draws with {hires_sampler}, not offered here: the first pass's sampler redraws "
                        "(or --hires-sampler)")
    elif hires_sampler != fields["Sampler"]:
        fields["Hires sampler"] = hires_sampler
    for label, ours, theirs in (("prompt", prompt, "positive"), ("negative prompt", negative, "negative")):
        text = encoded_text(graph, inputs, theirs, warnings)
        if text is not None and text != ours:
            fields[f"Hires {label}"] = " ".join([text, *tags]) if label == "prompt" and tags else text
    for what, value, first_value in (("seed", inputs.get("seed"), fields.get("Seed")),
                                     ("cfg", inputs.get("cfg"), fields.get("CFG scale"))):
        if first_value is not None and value != first_value:
            warnings.append(f"{name} has {what} {describe(value)}, here the first pass's ({first_value})")
    checkpoint, own_tags, loaders = model_chain(graph, inputs, [])
    if own_tags != tags or model_name(checkpoint) != fields.get("Model"):
        warnings.append(f"{name} draws with another checkpoint or LoRAs than the first pass; here with the first's")
    return loaders


def upscaling(graph: dict, first: str, inputs: dict, size: tuple | None):
    """Where a sampler's latent is the first pass's enlarged: (ids of the nodes between, our upscaler
    or None, ComfyUI's method, the target size (width, height) or why it is not read); else None."""
    source_id, source = link_of(inputs, "latent_image"), linked(graph, inputs, "latent_image")
    if kind(source) in ("LatentUpscale", "LatentUpscaleBy") and link_of(inputs_of(source), "samples") == first:
        method = inputs_of(source).get("upscale_method")
        return {source_id}, LATENT_METHODS.get(method), method, target_of(source, size)
    if kind(source) != "VAEEncode":
        return None
    # VAEDecode of the first pass -> [ImageUpscaleWithModel] -> [ImageScale(By)] -> VAEEncode, one of the two at least
    ids, node_id, node = {source_id}, link_of(inputs_of(source), "pixels"), linked(graph, inputs_of(source), "pixels")
    found = {}
    for kinds in (("ImageScale", "ImageScaleBy"), ("ImageUpscaleWithModel",)):
        if kind(node) in kinds:
            found[kinds[0]] = node
            ids.add(node_id)
            node_id, node = link_of(inputs_of(node), "image"), linked(graph, inputs_of(node), "image")
    if not found or kind(node) != "VAEDecode" or link_of(inputs_of(node), "samples") != first:
        return None
    ids.add(node_id)
    scale = found.get("ImageScale")
    method = inputs_of(scale).get("upscale_method") if scale else None
    if "ImageUpscaleWithModel" not in found:
        return ids, "Lanczos" if method == "lanczos" else None, method, target_of(scale, size)
    loader_id = link_of(inputs_of(found["ImageUpscaleWithModel"]), "upscale_model")
    loader = graph.get(loader_id, {})
    file = inputs_of(loader).get("model_name")
    if kind(loader) != "UpscaleModelLoader" or not isinstance(file, str) or not file.strip():
        return ids, None, None, None
    ids.add(loader_id)
    # AUTOMATIC1111's name of it: the file's, without folder or suffix (ldm-export --upscaler names it so)
    name = re.sub(r"\.[A-Za-z0-9]+$", "", re.split(r"[/\\]", file.strip())[-1])
    factor = name_scale(name)
    kept = scale is not None and kind(scale) == "ImageScale" and inputs_of(scale).get("width") == inputs_of(scale).get("height") == 0
    if scale is None or kept or kind(scale) == "ImageScaleBy":  # the model's own scale, from its name
        if factor is None or size is None:
            return ids, name, method, f"the upscale model {name!r}'s scale, not in its name"
        size = (size[0] * factor, size[1] * factor)
        if scale is None or kept:  # (ImageScale to 0 x 0 keeps the model's size)
            return ids, name, None, (size[0] // 8 * 8, size[1] // 8 * 8)
    return ids, name, method, target_of(scale, size)  # (ImageScale's sides keep the aspect, whatever the model's scale)


def name_scale(name: str) -> int | None:
    """An upscale model's scale as its name says it: "4x-UltraSharp", "4x_NMKD-Siax", "4xNomos8kSC",
    "RealESRGAN_x4plus", "realesr-general-x4v3" (None where it says none)."""
    found = re.findall(r"(?:^|[^A-Za-z0-9])([1-8])x(?![0-9])|(?:^|[^A-Za-z0-9])x([1-8])(?![0-9])", name)
    scales = {int(a or b) for a, b in found}
    return scales.pop() if len(scales) == 1 else None


def link_of(inputs: dict, name: str) -> str | None:
    """The node id wired into input `name` (None if none)."""
    link = inputs.get(name)
    return str(link[0]) if isinstance(link, list) and link else None


def target_of(node: dict, size: tuple | None):
    """The size (width, height) ComfyUI's upscale node enlarges the first pass's `size` to,
    as it computes it (latents: whole latent pixels; images: cropped to multiples of 8 when
    encoded); or why that is not read."""
    if size is None:
        return "the first pass's size is not read"
    w, h = size
    inputs = inputs_of(node)
    if kind(node).endswith("By"):
        by = inputs.get("scale_by")
        if isinstance(by, bool) or not isinstance(by, (int, float)) or not 0 < by < float("inf"):
            return f"scale_by {describe(by)}"
        if kind(node).startswith("Latent"):  # round(latent side x scale_by)
            return round(w / 8 * by) * 8, round(h / 8 * by) * 8
        return round(w * by) // 8 * 8, round(h * by) // 8 * 8
    width, height, crop = inputs.get("width"), inputs.get("height"), inputs.get("crop", "disabled")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (width, height)) or crop != "disabled":
        return f"width {describe(width)}, height {describe(height)}, crop {describe(crop)}"
    if width == 0 and height == 0:
        return "width and height 0 (no enlargement)"
    low = 64 if kind(node).startswith("Latent") else 1  # (its least side; 0: the other side's aspect)
    if width == 0:
        height = max(low, height)
        width = max(low, round(w * height / h))
    elif height == 0:
        width = max(low, width)
        height = max(low, round(h * width / w))
    return max(low, width) // 8 * 8, max(low, height) // 8 * 8


def start_kind(graph: dict, inputs: dict) -> str:
    """What a sampler's latent starts from: "EmptyLatentImage", "VAEEncode" (of a LoadImage's
    picture) or another node's kind."""
    node = linked(graph, inputs, "latent_image")
    if kind(node) == "VAEEncode" and kind(linked(graph, inputs_of(node), "pixels")) != "LoadImage":
        return "VAEEncode of another node"
    if kind(node) in INPAINT_NODES:
        encoder = inpaint_start(graph, inputs)[0]
        return "Inpaint" if kind(linked(graph, encoder, "pixels")) == "LoadImage" else f"{kind(node)} of another node"
    return kind(node)


def inpaint_start(graph: dict, inputs: dict) -> tuple[dict, dict, set[str]]:
    """For a sampler that starts an inpainting pass: (the inputs of the node that encodes its picture,
    the inputs of the node that gives its mask, the ids of both)."""
    key = link_of(inputs, "latent_image")
    node = graph.get(key, {})
    if kind(node) != "SetLatentNoiseMask":  # VAEEncodeForInpaint, InpaintModelConditioning: both in one
        return inputs_of(node), inputs_of(node), {key}
    encoder = link_of(inputs_of(node), "samples")
    return inputs_of(graph.get(encoder, {})), inputs_of(node), {key, encoder}


def mask_source(graph: dict, inputs: dict) -> tuple[str, set[str]]:
    """(Where the mask wired into `inputs` comes from, as a sentence names it; the loader's id)."""
    link, key = inputs.get("mask"), link_of(inputs, "mask")
    node = graph.get(key, {})
    name = inputs_of(node).get("image")
    name = repr(name) if isinstance(name, str) else f"(named {describe(name)})"
    alpha = ("(ComfyUI keeps a mask painted in its editor in the picture's alpha channel; make a mask image of it, "
             "white where the picture is transparent)")
    if kind(node) == "LoadImage" and isinstance(link, list) and link[1:] == [1]:
        return f"the transparent part of LoadImage's {name} {alpha}", {key}
    if kind(node) == "LoadImageMask":
        channel = inputs_of(node).get("channel")
        if channel == "alpha":
            return f"the transparent part of LoadImageMask's {name} {alpha}", {key}
        return f"the {describe(channel)} channel of LoadImageMask's {name} (white: redrawn)", {key}
    return f"a mask from {kind(node) if node else 'nothing'}, not read here", set()


def inpaint_differences(nodes: set[str], masked: dict, encoder: dict) -> list[str]:
    """How ComfyUI's inpainting through `nodes` (their kinds: INPAINT_NODES, the encoder's) differs
    from diffusers' (ours), as warnings; masked, encoder: the inputs of the node whose mask the
    sampler takes, and of the one that encodes the picture."""
    out = ["its inpainting keeps the unmasked part by its own blending of the image's noised latents at each "
           "step, near diffusers' (and ours: the kept part put back after each step), so the image will differ "
           "a little"]
    if "VAEEncodeForInpaint" in nodes:
        grow = encoder.get("grow_mask_by", 6)
        grows = "" if grow == 0 else f"grows the mask by {describe(grow)} px and "
        taken = "" if grow == 0 else " (grow it by as much for the same hole)"
        out.append(f"its VAEEncodeForInpaint {grows}encodes the picture with the masked part grey; here the mask is "
                   f"taken as given{taken} and the picture encoded as it is (--masked-content fill paints the hole "
                   "first)")
    if "InpaintModelConditioning" in nodes and masked.get("noise_mask") is False:  # the whole latent redrawn
        out.append("its InpaintModelConditioning has noise_mask off, so it redraws the unmasked part too; here "
                   "the unmasked part is kept")
    return out


def advanced_start(inputs: dict, steps: int | None) -> int | None:
    """KSamplerAdvanced's start_at_step where it draws from there to its walk's end with noise
    added (end_at_step at or past `steps`: its default 10000 is past any); None for another part.
    steps: None where not read (then only the default end is the end)."""
    start, end = inputs.get("start_at_step", 0), inputs.get("end_at_step", 10000)
    if inputs.get("add_noise", "enable") != "enable" or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
        return None
    return start if 0 <= start < (steps or 10000) <= end else None


def walk_cut(inputs: dict, advanced: bool, steps: int | None, warnings: list) -> tuple:
    """(Steps, Denoising strength) of diffusers' img2img that draws the steps ComfyUI's image-to-image
    sampler draws (the module's docstring); (steps, None) with a warning where its cut is not read."""
    if steps is None:  # (warned about: ldm-run's --steps and --strength)
        return None, None
    if advanced:
        start = advanced_start(inputs, steps)
        if start is None:
            warnings.append("its KSamplerAdvanced draws a part of a walk (start_at_step / end_at_step / add_noise) "
                            "not read here: --strength (default 0.8) sets how much of the image is redrawn")
            return steps, None
        total, drawn = steps, steps - start
    else:
        denoise = inputs.get("denoise", 1.0)
        if isinstance(denoise, bool) or not isinstance(denoise, (int, float)) or not 0 < denoise <= 1:
            warnings.append(f"its denoise is {describe(denoise)}, not read: --strength (default 0.8) sets how much "
                            "of the image is redrawn")
            return steps, None
        if not steps / denoise < 1001:  # (also inf)
            warnings.append(f"its denoise {denoise} draws {steps} steps of a walk of {steps / denoise:.0f}, more than "
                            "a model's 1000 timesteps: not read (--steps and --strength give the walk)")
            return steps, None
        total = int(steps / denoise)
        drawn = min(steps, total)
    # the strength whose int(total x strength) is `drawn`: drawn / total, rounded up to 4 places
    # (a field a reader takes in; under 10000 steps the rounding up adds less than a step)
    strength = math.ceil(drawn / total * 10000) / 10000
    if int(total * strength) < drawn:  # (drawn / total exactly, which float multiplication can round down)
        strength += 1e-4
    return total, round(strength, 4)


def source_image(graph: dict, latent: dict) -> str:
    """The LoadImage picture a VAEEncode encodes, as a sentence names it."""
    name = inputs_of(linked(graph, latent, "pixels")).get("image")
    return f"LoadImage's {name!r}" if isinstance(name, str) else f"a LoadImage's picture (named {describe(name)})"


def sampler_name(name, schedule) -> str:
    """AUTOMATIC1111's name of ComfyUI's sampler and scheduler, schedule included ("DPM++ 2M
    Karras"), or for a pair not offered here a name that says so (infotext.sampler refuses it
    unless --sampler is given)."""
    from ldm_deploy.engine.samplers import DISPLAY_NAMES

    if isinstance(name, str) and isinstance(schedule, str) and name in SAMPLERS and schedule in SCHEDULES:
        ours, label = SAMPLERS[name], SCHEDULES[schedule]
        if label == "Uniform" or (ours in OWN_WALK and label == "SGM Uniform"):  # (LCM's usual sgm_uniform)
            full = ours
        else:
            full = f"{ours} {label}"
        if full in DISPLAY_NAMES.values():
            return full
    return f"ComfyUI's {describe(name)} with scheduler {describe(schedule)}"


def describe(value) -> str:
    """A value of the graph as a sentence names it: a link as the node it comes from."""
    if isinstance(value, list) and len(value) == 2:
        return f"wired from node {value[0]}"
    return "missing" if value is None else repr(value) if isinstance(value, str) else str(value)


def kind(node: dict) -> str:
    """A node's class_type (a tiled VAE node's plain one: TILED)."""
    value = node.get("class_type")
    return TILED.get(value, value) if isinstance(value, str) else "?"


def inputs_of(node: dict) -> dict:
    value = node.get("inputs")
    return value if isinstance(value, dict) else {}


def linked(graph: dict, inputs: dict, name: str) -> dict:
    """The node wired into input `name` ({} if none)."""
    return graph.get(link_of(inputs, name), {})


def encoded_text(graph: dict, inputs: dict, name: str, warnings: list, size: tuple | None = None) -> str | None:
    """The text of the CLIPTextEncode wired into `name` (or CLIPTextEncodeSDXL's, one text for both
    encoders); None (and why, in `warnings`) for other conditioning."""
    node = linked(graph, inputs, name)
    seen = set()
    while kind(node) == "InpaintModelConditioning" and id(node) not in seen:  # (its conditioning passes through)
        seen.add(id(node))
        node = linked(graph, inputs_of(node), name)
    if kind(node) == "CLIPTextEncodeSDXL":
        return sdxl_text(node, name, warnings, size)
    value = inputs_of(node).get("text")
    if kind(node) != "CLIPTextEncode" or not isinstance(value, str):
        warnings.append(f"its {name} conditioning is not a CLIPTextEncode's text (it comes from "
                        f"{kind(node) if node else 'nothing'}): not read")
        return None
    return value


def sdxl_text(node: dict, name: str, warnings: list, size: tuple | None) -> str | None:
    """CLIPTextEncodeSDXL's text, where it gives both of SDXL's encoders the same one (as ours, and
    diffusers' `prompt` alone, do), with a warning where its size conditioning is not SDXL's default
    (original and target size the size drawn, crop (0, 0)), which is what is drawn here (size: the
    EmptyLatentImage's (width, height), None where unknown)."""
    inputs = inputs_of(node)
    text_g, text_l = inputs.get("text_g"), inputs.get("text_l")
    if not isinstance(text_g, str) or text_g != text_l:
        if isinstance(text_g, str) and isinstance(text_l, str):
            warnings.append(f"its {name} CLIPTextEncodeSDXL gives SDXL's two encoders other texts (text_g, text_l): "
                            "not read (here both encode the one prompt)")
        else:
            warnings.append(f"its {name} CLIPTextEncodeSDXL's text_g is {describe(text_g)} and text_l "
                            f"{describe(text_l)}: not read")
        return None
    sizes = [inputs.get(k) for k in ("width", "height", "target_width", "target_height", "crop_w", "crop_h")]
    if sizes[:2] != sizes[2:4] or sizes[4:] != [0, 0] or size is not None and tuple(sizes[:2]) != size:
        warnings.append(f"its {name} CLIPTextEncodeSDXL conditions on size {describe(sizes[0])}x{describe(sizes[1])}, "
                        f"target {describe(sizes[2])}x{describe(sizes[3])}, crop ({describe(sizes[4])}, "
                        f"{describe(sizes[5])}); here on the size drawn and crop (0, 0), so the image will differ")
    return text_g


def model_chain(graph: dict, inputs: dict, warnings: list) -> tuple[dict, list[str], set[str]]:
    """(the node the sampler's model comes from past its LoRA loaders, AUTOMATIC1111's
    <lora:name:te:unet> tag for each loader, nearest the checkpoint first, the loaders' ids).
    A loader's text encoder weight counts where the positive prompt's encoder is wired through
    it (its clip output), as ComfyUI applies it; else 0. LoRAs are merged into engines here
    (--lora), so the tags, added to the prompt as AUTOMATIC1111's web UI writes them, say where
    the engine does not hold one; a loader that cannot be written as one is warned about."""
    model_ids, node = chain(graph, inputs, "model")
    clip_ids, _ = chain(graph, inputs_of(linked(graph, inputs, "positive")), "clip")
    tags = []
    for key in [*model_ids, *(k for k in clip_ids if k not in model_ids)][::-1]:
        loader = inputs_of(graph[key])
        name = loader.get("lora_name")
        unet = loader.get("strength_model") if key in model_ids else 0.0
        te = loader.get("strength_clip") if key in clip_ids else 0.0
        if not isinstance(name, str) or not name or set(":<>") & set(file_stem(name)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (unet, te)):
            warnings.append(f"its {kind(graph[key])} loads {describe(name)} at {describe(unet)} (model) and "
                            f"{describe(te)} (clip), not read: LoRAs are merged into an engine by --lora when it is "
                            "exported")
        elif te or unet:
            tags.append(f"<lora:{file_stem(name)}:{f'{te:g}' if te == unet else f'{te:g}:{unet:g}'}>")
    return node, tags, set(model_ids) | set(clip_ids)


def chain(graph: dict, inputs: dict, name: str) -> tuple[list[str], dict]:
    """(ids of the LoRA loaders wired in a row into input `name`, nearest first; the node past them)."""
    ids, key = [], link_of(inputs, name)
    while key in graph and kind(graph[key]) in LORA_NODES and key not in ids:  # (a wired cycle ends)
        ids.append(key)
        key = link_of(inputs_of(graph[key]), "model" if name == "model" else "clip")
    return ids, graph.get(key, {}) if key and key not in ids else {}


def model_name(node: dict) -> str | None:
    """The checkpoint's file name, without its suffix, where a CheckpointLoaderSimple loads it."""
    name = inputs_of(node).get("ckpt_name") if kind(node) == "CheckpointLoaderSimple" else None
    if not isinstance(name, str) or not name:
        return None
    return file_stem(name)


def file_stem(name: str) -> str:
    """A model file's name as AUTOMATIC1111 names it: no folder, no suffix."""
    return re.sub(r"\.(safetensors|ckpt|pt|pth|bin)$", "", name.replace("\\", "/").rsplit("/", 1)[-1])
