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
or decoded, ImageScaleBy with Lanczos and encoded again), reads as AUTOMATIC1111's: Hires upscale,
its upscaler, Hires steps and Denoising strength from the second pass's steps and denoise (both draw
`steps` steps, the last of int(steps / denoise)), and the second pass's sampler and prompts where
they are not the first's.
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
            "uni_pc": "UniPC", "lcm": "LCM"}
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
               "VAEEncode", *TEXT_NODES, *SAMPLER_NODES, *LORA_NODES}
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
    starts = {kind(linked(graph, inputs_of(node), "latent_image")): (key, node) for key, node in reversed(samplers)}
    if "EmptyLatentImage" not in starts and "VAEEncode" not in starts:
        raise UserError("its ComfyUI graph has no KSampler starting from an EmptyLatentImage or a VAEEncode (an "
                        "inpainting or other graph): give the settings on the command line instead")
    img2img = "EmptyLatentImage" not in starts
    key, node = starts["VAEEncode" if img2img else "EmptyLatentImage"]  # (the first such node of the graph)
    inputs = inputs_of(node)
    advanced = kind(node) == "KSamplerAdvanced"
    latent = inputs_of(linked(graph, inputs, "latent_image"))
    warnings = [NEAR]

    def number(source: dict, name: str, integer: bool = True):
        value = source.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and value != int(value)):
            warnings.append(f"its {name} is {describe(value)}, not read: ldm-run's default (or the option given) "
                            "is used")
            return None
        return int(value) if integer else float(value)

    fields = {"Version": "ComfyUI", "Steps": number(inputs, "steps"), "CFG scale": number(inputs, "cfg", False),
              "Seed": number(inputs, "noise_seed" if advanced else "seed")}
    if img2img:
        fields["Steps"], fields["Denoising strength"] = walk_cut(inputs, advanced, fields["Steps"], warnings)
        warnings.append(f"its image-to-image pass starts from {source_image(graph, latent)}: give that image with "
                        "--init-image (without it, a text-to-image is drawn)")
    else:
        width, height = number(latent, "width"), number(latent, "height")
        if width is not None and height is not None:
            fields["Size"] = f"{width}x{height}"
    fields["Sampler"] = sampler_name(inputs.get("sampler_name"), inputs.get("scheduler"))
    checkpoint, tags = model_chain(graph, inputs, warnings)
    ckpt = model_name(checkpoint)
    if ckpt:
        fields["Model"] = ckpt
    size = tuple(int(v) for v in fields["Size"].split("x")) if "Size" in fields else None
    prompt, negative = (encoded_text(graph, inputs, name, warnings, size) for name in ("positive", "negative"))
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
        steps, end = inputs.get("steps"), inputs.get("end_at_step", 10000)
        to_the_end = end == 10000 or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (end, steps)) \
            and end >= steps  # (its default, 10000: past any walk's last step)
        if inputs.get("add_noise") == "disable" or inputs.get("start_at_step", 0) != 0 or not to_the_end:
            warnings.append("its KSamplerAdvanced draws part of a walk (start_at_step / end_at_step / add_noise), "
                            "which is not read: the whole walk is drawn")
    elif inputs.get("denoise", 1.0) != 1.0:
        warnings.append(f"its denoise is {describe(inputs.get('denoise'))} (1: the whole walk; less, a walk of "
                        "steps / denoise cut short), not read: the whole walk is drawn")
    read_nodes = set() if img2img else second_pass(graph, key, fields, prompt, negative, warnings)
    if len(samplers) > 1 + bool(read_nodes):
        warnings.append(f"its graph samples {len(samplers)} times; only node {key}'s "
                        f"{'image-to-image' if img2img else 'text-to-image'} pass "
                        f"{'and its hires fix are' if read_nodes else 'is'} drawn")
    others = sorted({kind(n) for n in graph.values()} - PLAIN_NODES - read_nodes)
    if others:
        warnings.append(f"its graph's {', '.join(others)} {'is' if len(others) == 1 else 'are'} not drawn here, so "
                        "the image may differ")
    return prompt, negative, {k: str(v) for k, v in fields.items() if v is not None}, warnings


# ComfyUI's latent upscale methods -> ours (AUTOMATIC1111's names); its "area" and "bislerp" are not offered.
LATENT_METHODS = {"bilinear": "Latent", "bicubic": "Latent (bicubic)", "nearest-exact": "Latent (nearest-exact)"}


def second_pass(graph: dict, first: str, fields: dict, prompt, negative, warnings: list) -> set[str]:
    """Read the hires fix of the text-to-image pass at node `first` into `fields` (the module's
    docstring); -> the kinds of the nodes read (none where there is none, or it is not read)."""
    for key, node in graph.items():
        inputs = inputs_of(node)
        upscale = linked(graph, inputs, "latent_image")
        if kind(node) not in SAMPLER_NODES or not upscale:
            continue
        if kind(upscale) in ("LatentUpscale", "LatentUpscaleBy") and link_of(inputs_of(upscale), "samples") == first:
            method, scaling = inputs_of(upscale).get("upscale_method"), upscale
            upscaler = LATENT_METHODS.get(method)
        elif kind(upscale) == "VAEEncode" and kind(scale := linked(graph, inputs_of(upscale), "pixels")) in (
                "ImageScale", "ImageScaleBy") and kind(decode := linked(graph, inputs_of(scale), "image")) == "VAEDecode" \
                and link_of(inputs_of(decode), "samples") == first:
            method, scaling = inputs_of(scale).get("upscale_method"), scale
            upscaler = "Lanczos" if method == "lanczos" else None
        else:
            continue
        break
    else:
        return set()
    name = f"its hires fix (node {key})"
    scale = scale_of(scaling, fields.get("Size"))
    if kind(node) != "KSampler" or scale is None or upscaler is None:
        why = ("its KSamplerAdvanced" if kind(node) != "KSampler" else
               f"its {kind(scaling)}'s size" if scale is None else f"its upscale_method {describe(method)}")
        warnings.append(f"{name} is not drawn: {why} is not read here (--hires-scale and its options give one)")
        return set()
    inputs = inputs_of(node)
    steps, denoise = inputs.get("steps"), inputs.get("denoise", 1.0)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (steps, denoise)) \
            or steps != int(steps) or steps < 1 or not 0 < denoise <= 1:
        warnings.append(f"{name} is not drawn: its steps {describe(steps)} and denoise {describe(denoise)} are not "
                        "read here (--hires-scale and its options give one)")
        return set()
    fields.update({"Hires upscale": scale, "Hires upscaler": upscaler, "Hires steps": int(steps),
                   "Denoising strength": denoise})
    hires_sampler = sampler_name(inputs.get("sampler_name"), inputs.get("scheduler"))
    if hires_sampler.startswith("ComfyUI's"):  # (not offered: the first pass's, or --hires-sampler)
        warnings.append(f"{name} draws with {hires_sampler}, not offered here: the first pass's sampler redraws "
                        "(or --hires-sampler)")
    elif hires_sampler != fields["Sampler"]:
        fields["Hires sampler"] = hires_sampler
    for label, ours, theirs in (("prompt", prompt, "positive"), ("negative prompt", negative, "negative")):
        text = encoded_text(graph, inputs, theirs, [])
        if text is not None and text != ours:
            fields[f"Hires {label}"] = text
    for what, value, first_value in (("seed", inputs.get("seed"), fields.get("Seed")),
                                     ("cfg", inputs.get("cfg"), fields.get("CFG scale"))):
        if value != first_value:
            warnings.append(f"{name} has {what} {describe(value)}, here the first pass's ({first_value})")
    return {kind(n) for n in (node, scaling, upscale)} | ({"VAEDecode"} if upscaler == "Lanczos" else set())


def link_of(inputs: dict, name: str) -> str | None:
    """The node id wired into input `name` (None if none)."""
    link = inputs.get(name)
    return str(link[0]) if isinstance(link, list) and link else None


def scale_of(node: dict, size: str | None) -> float | None:
    """The factor an upscale node enlarges by: its scale_by, or its width and height over the first
    pass's `size` ("WxH") where both sides grow by one factor; None where not read."""
    inputs = inputs_of(node)
    if kind(node).endswith("By"):
        value = inputs.get("scale_by")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 1
        return float(value) if ok else None
    width, height = inputs.get("width"), inputs.get("height")
    if size is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in (width, height)) \
            or inputs.get("crop", "disabled") != "disabled":
        return None
    first_w, first_h = (int(v) for v in size.split("x"))
    scale = width / first_w
    return scale if scale > 1 and abs(height - first_h * scale) < 8 else None


def walk_cut(inputs: dict, advanced: bool, steps: int | None, warnings: list) -> tuple:
    """(Steps, Denoising strength) of diffusers' img2img that draws the steps ComfyUI's image-to-image
    sampler draws (the module's docstring); (steps, None) with a warning where its cut is not read."""
    if steps is None:  # (warned about: ldm-run's --steps and --strength)
        return None, None
    if advanced:
        start, end = inputs.get("start_at_step", 0), inputs.get("end_at_step", 10000)
        plain = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end))
        if inputs.get("add_noise") == "disable" or not plain or not 0 <= start < min(end, steps) \
                or end < steps:
            warnings.append("its KSamplerAdvanced draws a part of a walk (start_at_step / end_at_step / add_noise) "
                            "not read here: --strength (default 0.8) sets how much of the image is redrawn")
            return steps, None
        total, drawn = steps, steps - start
    else:
        denoise = inputs.get("denoise", 1.0)
        if isinstance(denoise, bool) or not isinstance(denoise, (int, float)) \
                or not 0 < denoise <= 1 or int(steps / denoise) < 1:
            warnings.append(f"its denoise is {describe(denoise)}, not read: --strength (default 0.8) sets how much "
                            "of the image is redrawn")
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
    """The image a VAEEncode encodes, as a sentence names it: LoadImage's file, or the node."""
    node = linked(graph, latent, "pixels")
    name = inputs_of(node).get("image")
    if kind(node) == "LoadImage" and isinstance(name, str):
        return f"LoadImage's {name!r}"
    return f"the image of node {kind(node) if node else 'nothing'}"


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
    value = node.get("class_type")
    return value if isinstance(value, str) else "?"


def inputs_of(node: dict) -> dict:
    value = node.get("inputs")
    return value if isinstance(value, dict) else {}


def linked(graph: dict, inputs: dict, name: str) -> dict:
    """The node wired into input `name` ({} if none)."""
    link = inputs.get(name)
    if isinstance(link, list) and link and str(link[0]) in graph:
        return graph[str(link[0])]
    return {}


def encoded_text(graph: dict, inputs: dict, name: str, warnings: list, size: tuple | None = None) -> str | None:
    """The text of the CLIPTextEncode wired into `name` (or CLIPTextEncodeSDXL's, one text for both
    encoders); None (and why, in `warnings`) for other conditioning."""
    node = linked(graph, inputs, name)
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


def model_chain(graph: dict, inputs: dict, warnings: list) -> tuple[dict, list[str]]:
    """(the node the sampler's model comes from past its LoRA loaders, AUTOMATIC1111's
    <lora:name:te:unet> tag for each loader, nearest the checkpoint first). LoRAs are merged into
    engines here (--lora), so the tags, added to the prompt as AUTOMATIC1111's web UI writes them,
    say where the engine does not hold one; a loader's malformed values are warned about."""
    node, tags, seen = linked(graph, inputs, "model"), [], {link_of(inputs, "model")}
    while kind(node) in LORA_NODES:
        loader = inputs_of(node)
        name, unet = loader.get("lora_name"), loader.get("strength_model")
        te = loader.get("strength_clip") if kind(node) == "LoraLoader" else 0.0
        if not isinstance(name, str) or not name or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in (unet, te)):
            warnings.append(f"its {kind(node)} loads {describe(name)} at {describe(unet)} (model) and {describe(te)} "
                            "(clip), not read: LoRAs are merged into an engine by --lora when it is exported")
        else:
            weights = f"{te:g}" if te == unet else f"{te:g}:{unet:g}"
            tags.insert(0, f"<lora:{file_stem(name)}:{weights}>")
        if link_of(loader, "model") in seen:  # (a wired cycle: no checkpoint)
            return {}, tags
        seen.add(link_of(loader, "model"))
        node = linked(graph, loader, "model")
    return node, tags


def model_name(node: dict) -> str | None:
    """The checkpoint's file name, without its suffix, where a CheckpointLoaderSimple loads it."""
    name = inputs_of(node).get("ckpt_name") if kind(node) == "CheckpointLoaderSimple" else None
    if not isinstance(name, str) or not name:
        return None
    return file_stem(name)


def file_stem(name: str) -> str:
    """A model file's name as AUTOMATIC1111 names it: no folder, no suffix."""
    return re.sub(r"\.(safetensors|ckpt|pt|pth|bin)$", "", name.replace("\\", "/").rsplit("/", 1)[-1])
