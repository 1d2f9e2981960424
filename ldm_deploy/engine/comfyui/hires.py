"""ComfyUI's "hires fix" (the package's docstring): a second sampler from the first's latents enlarged,
read as AUTOMATIC1111's Hires fields."""

from __future__ import annotations

import math
import re

from ldm_deploy.engine.comfyui.graph import (
    SAMPLER_NODES,
    describe,
    encoded_text,
    inputs_of,
    kind,
    link_of,
    linked,
    model_chain,
    model_name,
)
from ldm_deploy.engine.comfyui.walk import sampler_name

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
