"""ComfyUI's inpainting passes (the package's docstring): the nodes that encode a picture with its
mask, where the mask comes from, and how its inpainting differs from diffusers' (ours)."""

from __future__ import annotations

from ldm_deploy.engine.comfyui.graph import describe, inputs_of, kind, link_of, linked

# Its nodes that start an inpainting pass: the latent a sampler starts from (module docstring).
INPAINT_NODES = ("SetLatentNoiseMask", "VAEEncodeForInpaint", "InpaintModelConditioning")


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
