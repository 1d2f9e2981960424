"""LoRA files merged into the model's weights before export (AUTOMATIC1111's `<lora:name:weight>`,
fixed at export time: an engine's weights are compiled in).

Two layouts are read:
- kohya (sd-scripts, most shared files): `lora_unet_<module path, dots as underscores>.lora_down.weight`,
  `.lora_up.weight` and `.alpha`; `lora_te_...` for the text encoder.
- diffusers / PEFT: `unet.<module path>.lora_A.weight` / `.lora_B.weight` (or `.lora.down.weight` /
  `.lora.up.weight`), `text_encoder.<module path>...`.

Each pair adds `weight * alpha / rank * up @ down` to its layer's weight (for convolutions, the
same product over the flattened kernel). A pair naming a layer the model lacks stops the export:
that is a LoRA for another architecture.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ldm_deploy.errors import ModelSourceError
from ldm_deploy.export import single_file
from ldm_deploy.export.source import hash_files

log = logging.getLogger(__name__)

KOHYA = re.compile(r"^lora_(unet|te)_(.+?)\.(lora_down|lora_up)\.weight$")
PEFT = re.compile(r"^(unet|text_encoder)\.(.+?)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight$")
COMPONENT = {"unet": "unet", "te": "text_encoder", "text_encoder": "text_encoder"}
# LyCORIS' other factorisations, which are not a product of two matrices.
UNSUPPORTED = {"hada_w1_a": "LoHa", "lokr_w1": "LoKr", "dora_scale": "DoRA", "oft_blocks": "OFT"}


@dataclass
class Pair:
    component: str  # "unet" or "text_encoder"
    name: str  # the layer, as the file names it
    down: object  # torch tensor [rank, in(, kh, kw)]
    up: object  # [out, rank(, 1, 1)]
    alpha: float | None


def parse_spec(spec: str) -> tuple[str, float]:
    """"file.safetensors:0.8" -> (file, 0.8); no weight (or a colon of a path) -> weight 1."""
    path, _, tail = spec.rpartition(":")
    try:
        return (path, float(tail)) if path else (spec, 1.0)
    except ValueError:
        return spec, 1.0


def pairs(state: dict, path: Path) -> list[Pair]:
    """The file's (down, up) pairs, or a ModelSourceError saying what the file is instead."""
    for key, kind in UNSUPPORTED.items():
        if any(k.endswith(key) or f".{key}" in k for k in state):
            raise ModelSourceError(f"{path} is a {kind} (LyCORIS) file; only LoRA (two-matrix) files are "
                                   "supported yet")
    found: dict[tuple[str, str], dict] = {}
    for key, value in state.items():
        m = KOHYA.match(key) or PEFT.match(key)
        if m:
            side = "down" if m[3] in ("lora_down", "lora_A", "lora.down") else "up"
            found.setdefault((COMPONENT[m[1]], m[2]), {})[side] = value
    if not found:
        raise ModelSourceError(f"{path} holds no LoRA weights (lora_down / lora_up, or lora_A / lora_B); "
                               "is it a LoRA for Stable Diffusion 1.x / 2.x?")
    out = []
    for (component, name), sides in found.items():
        if set(sides) != {"down", "up"}:
            raise ModelSourceError(f"{path}: the LoRA of {name} lacks its {({'down', 'up'} - set(sides)).pop()} matrix")
        prefix = "lora_" + ("unet" if component == "unet" else "te") + "_" + name
        alpha = state.get(prefix + ".alpha", state.get(f"{component}.{name}.alpha"))
        out.append(Pair(component, name, sides["down"], sides["up"], None if alpha is None else float(alpha)))
    return out


def layers(module) -> dict[str, object]:
    """Layer name -> torch module, under both spellings a file may use: dotted, and kohya's
    underscores; text encoders with and without the text_model. level (transformers >= 5.6
    dropped it from CLIPTextModel)."""
    out = {}
    for name, layer in module.named_modules():
        if hasattr(layer, "weight") and name:
            for spelling in (name, "text_model." + name if not name.startswith("text_model.") else name[11:]):
                out[spelling] = out[spelling.replace(".", "_")] = layer
    return out


def merge(src, loras, allow_pickle: bool) -> None:
    """Add each (file, weight) LoRA to `src`'s U-Net and text encoder in place, and fold the
    files and weights into its weight hash (the engine's "Model hash")."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    targets = {"unet": layers(src.unet), "text_encoder": layers(src.text_encoder)}
    for spec, weight in loras:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelSourceError(f"--lora {spec}: no such file")
        found = pairs(single_file.read(path, allow_pickle).state, path)
        missing = [p.name for p in found if p.name not in targets[p.component]]
        if missing:
            raise ModelSourceError(
                f"--lora {path}: {len(missing)} of its {len(found)} layers are not in this model (e.g. "
                f"{missing[0]}); it was made for another architecture (an SDXL LoRA on SD 1.x?)")
        with torch.no_grad():
            for p in found:
                add(targets[p.component][p.name], p, weight, path)
        digest.update(f"{hash_files([path])}:{weight}\n".encode())
        log.info("merged %s (%d layers, weight %g)", path.name, len(found), weight)
    src.weights_sha256 = hashlib.sha256(f"{src.weights_sha256}\n{digest.hexdigest()}".encode()).hexdigest()


def add(layer, p: Pair, weight: float, path: Path) -> None:
    w = layer.weight
    rank = p.down.shape[0]
    scale = weight * (p.alpha / rank if p.alpha is not None else 1.0)
    delta = p.up.reshape(p.up.shape[0], -1).float() @ p.down.reshape(rank, -1).float()
    if delta.numel() != w.numel():
        raise ModelSourceError(f"--lora {path}: {p.name} is {tuple(delta.shape)} in the LoRA but "
                               f"{tuple(w.shape)} in the model; it was made for another architecture")
    w += scale * delta.reshape(w.shape).to(w.dtype)
