"""Reading ComfyUI's API-format graph ({node id: {"class_type", "inputs"}}, an input wired to another
node as [node id, output index]): the nodes wired into a node, the texts its conditioning encodes,
the checkpoint and LoRA loaders behind its model, and values as a warning names them."""

from __future__ import annotations

import math
import re

SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
# Its tiled VAE nodes read as the plain ones (kind), with --vae-tiling advised: its tiles are its own
# (tile_size and overlap in px; its decoder averages three tilings), ours diffusers'.
TILED = {"VAEDecodeTiled": "VAEDecode", "VAEEncodeTiled": "VAEEncode"}
LORA_NODES = ("LoraLoader", "LoraLoaderModelOnly")


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


def link_of(inputs: dict, name: str) -> str | None:
    """The node id wired into input `name` (None if none)."""
    link = inputs.get(name)
    return str(link[0]) if isinstance(link, list) and link else None


def source_image(graph: dict, latent: dict) -> str:
    """The LoadImage picture a VAEEncode encodes, as a sentence names it."""
    name = inputs_of(linked(graph, latent, "pixels")).get("image")
    return f"LoadImage's {name!r}" if isinstance(name, str) else f"a LoadImage's picture (named {describe(name)})"


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
    if kind(node) != "CLIPTextEncode":
        warnings.append(f"its {name} conditioning is not a CLIPTextEncode's text (it comes from "
                        f"{kind(node) if node else 'nothing'}): not read")
        return None
    if not isinstance(value, str):  # wired from another node (a PrimitiveNode, a text node)
        source = linked(graph, inputs_of(node), "text") if isinstance(value, list) else None
        warnings.append(f"its {name} CLIPTextEncode's text is not written in it (it comes from "
                        f"{kind(source) if source else 'another node'}): not read")
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
