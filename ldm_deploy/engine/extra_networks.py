"""AUTOMATIC1111's extra-network tags in prompts: "<lora:name:0.8>", "<hypernet:name>", ...

Its web UI applies them as it samples. Here LoRAs are merged into the engine when it is exported
(ldm-export --lora FILE:WEIGHT, ldm-run --model ... --lora), so with AUTOMATIC1111's prompt syntax
read, the tags are taken out of the text the text encoder sees (as the web UI takes them out),
and `advice` says where a tag asks for something the engine does not hold.
"""

from __future__ import annotations

import re

TAG = re.compile(r"<(\w+):([^>]+)>")  # AUTOMATIC1111's extra-network syntax
LORA_KINDS = ("lora", "lyco")  # lyco: the LyCORIS extension's, LoRAs to the web UI since 1.5


def strip(prompt: str) -> tuple[str, list[tuple[str, str]]]:
    """prompt -> (the prompt without its tags, [(kind, arguments), ...])."""
    tags = [(m.group(1).lower(), m.group(2)) for m in TAG.finditer(prompt)]
    return TAG.sub("", prompt), tags


def advice(kind: str, arguments: str, loras: tuple) -> str | None:
    """What to tell the user about one tag, given the engine's merged LoRAs ({"name", "weight"}
    each); None where the engine holds what it asks for."""
    tag = f"<{kind}:{arguments}>"
    if kind not in LORA_KINDS:
        return f"the prompt's {tag} is not applied: ldm-deploy runs no {kind} extra networks"
    name, weights = lora_weights(arguments)
    if weights is None:
        return f"the prompt's {tag} is not applied: its weights are not numbers"
    if weights == (0.0, 0.0):
        return None  # off: nothing to apply
    te, unet = weights
    if te != unet:
        return f"the prompt's {tag} is not applied: its text encoder and U-Net weights differ ({te:g}, " \
               f"{unet:g}), and --lora merges one weight into both"
    weight = te
    merged = {lora["name"]: lora["weight"] for lora in loras}
    fix = f"export it with --lora {name}.safetensors:{weight:g} (ldm-export, or ldm-run --model)"
    if name not in merged:
        held = f"only {', '.join(merged)}" if merged else "none"
        return f"the prompt's {tag} is not applied: LoRAs are merged into an engine when it is exported, and " \
               f"this one holds {held}; {fix}"
    if abs(merged[name] - weight) > 1e-6:
        return f"the prompt's {tag} is not applied at {weight:g}: this engine has {name} merged at weight " \
               f"{merged[name]:g}; for another weight, {fix}"
    return None


def lora_weights(arguments: str) -> tuple[str, tuple[float, float] | None]:
    """"name:0.8:0.5", "name:te=0.8:unet=0.5", ... -> (name, (text encoder weight, U-Net weight)),
    as AUTOMATIC1111 reads them: the first weight 1 by default, the U-Net's the first's; None
    where a weight is not a number."""
    name, *items = arguments.split(":")
    positional, named = [], {}
    for item in items:
        key, eq, value = item.partition("=")
        if eq:
            named[key.strip()] = value
        else:
            positional.append(item)
    try:
        te = float(named.get("te", positional[0] if positional else 1.0))
        unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
    except ValueError:
        return name, None
    return name, (te, unet)
