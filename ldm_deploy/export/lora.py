"""LoRA files merged into the model's weights before export (AUTOMATIC1111's `<lora:name:weight>`,
fixed at export time: an engine's weights are compiled in).

Two layouts are read:
- kohya (sd-scripts, most shared files): `lora_unet_<module path, dots as underscores>.lora_down.weight`,
  `.lora_up.weight` and `.alpha`; `lora_te_...` (or `lora_te1_`) for the text encoder, `lora_te2_` for
  SDXL's second. U-Net layers under diffusers' names or the original checkpoint's (SDXL's files:
  `input_blocks_4_1_...`; lora_names.py).
- diffusers: `unet.<module path>.lora_A.weight` / `.lora_B.weight`, or the older `.lora.down.weight`,
  `.lora_linear_layer.down.weight` and `processor.to_q_lora.down.weight` spellings; `text_encoder.`
  and `text_encoder_2.` likewise. Alphas from `.alpha` tensors or the `lora_adapter_metadata` header diffusers writes.

Each pair adds `weight * alpha / rank * up @ down` to its layer's weight (for convolutions, the
same product over the flattened kernel); without an alpha, alpha = rank (AUTOMATIC1111's rule). A
file holding anything else (LyCORIS' other kinds, DoRA, bundled embeddings, unknown keys) or
naming a layer the model lacks stops the export: merging part of it would change the model partly.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ldm_deploy.errors import ModelSourceError, UserError
from ldm_deploy.export import lora_names, single_file
from ldm_deploy.export.source import hash_files

log = logging.getLogger(__name__)

# kohya: lora_unet_<layer>.lora_down.weight; lora_te_ (or lora_te1_) for the text encoder, lora_te2_ SDXL's second.
KOHYA = re.compile(r"^lora_(unet|te1?|te2)_([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
# diffusers / PEFT: unet.<layer>.lora_A.weight, and the spellings diffusers wrote before PEFT.
DIFFUSERS = re.compile(r"^(unet|text_encoder_2|text_encoder)\.(.+?)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|"
                       r"lora\.up\.weight|lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha)$")
# diffusers' old attention-processor spelling: ...attn1.processor.to_q_lora.down.weight.
PROCESSOR = re.compile(r"^(unet|text_encoder_2|text_encoder)\.(.+?)\.(?:processor\.)?to_(q|k|v|out)_lora\.(down|up)\.weight$")
COMPONENT = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "text_encoder": "text_encoder",
             "te2": "text_encoder_2", "text_encoder_2": "text_encoder_2"}
# What else such files may hold, which a product of two matrices does not express.
UNSUPPORTED = {".hada_w1_a": "a LoHa (LyCORIS) file", ".lokr_w1": "a LoKr (LyCORIS) file",
               ".dora_scale": "a DoRA file", ".lora_magnitude_vector": "a DoRA file",
               ".oft_blocks": "an OFT file", ".lora_mid.": "a LoCon file with a Tucker decomposition (lora_mid)",
               "bundle_emb": "a LoRA with bundled embeddings (bundle_emb)",
               "base_model.model.": "a PEFT adapter file (save it with diffusers' save_lora_weights)"}


@dataclass
class Pair:
    component: str  # "unet", "text_encoder" or "text_encoder_2"
    name: str  # the layer, as the file names it
    down: object  # torch tensor [rank, in(, kh, kw)]
    up: object  # [out, rank(, 1, 1)]
    alpha: object  # a number or 1-element tensor; None: alpha = rank (scale 1)


def parse_spec(spec: str) -> tuple[str, float]:
    """"file.safetensors:0.8" -> (file, 0.8); no weight (or a colon of a path) -> weight 1."""
    path, _, tail = spec.rpartition(":")
    try:
        weight = float(tail)
    except ValueError:
        if path and Path(path).expanduser().is_file() and not Path(spec).expanduser().exists():
            raise UserError(f"--lora {spec}: its weight {tail!r} is not a number (FILE:WEIGHT, e.g. {path}:0.8)") \
                from None
        return spec, 1.0
    if not path:
        return spec, 1.0
    if not math.isfinite(weight):
        raise UserError(f"--lora {spec}: the weight must be a finite number")
    return path, weight


def entry(key: str) -> tuple[str, str, str] | None:
    """A key -> (component, layer, "down" | "up" | "alpha"), or None."""
    if m := KOHYA.match(key):
        return COMPONENT[m[1]], m[2], {"lora_down.weight": "down", "lora_up.weight": "up"}.get(m[3], "alpha")
    if m := DIFFUSERS.match(key):
        part = "alpha" if m[3] == "alpha" else "down" if m[3].startswith(("lora_A", "lora.down", "lora_linear_layer.down")) else "up"
        return COMPONENT[m[1]], m[2], part
    if m := PROCESSOR.match(key):
        text = m[1].startswith("text_encoder")
        layer = f"{m[3]}_proj" if text else f"to_{m[3]}" + (".0" if m[3] == "out" else "")
        return COMPONENT[m[1]], f"{m[2]}.{layer}", m[4]
    return None


def pairs(ck) -> list[Pair]:
    """The file's (down, up) pairs, or a ModelSourceError saying what the file is instead."""
    state, path = ck.state, ck.path
    for marker, kind in UNSUPPORTED.items():
        if any(marker in k for k in state):
            raise ModelSourceError(f"{path} is {kind}; only LoRA files (two matrices a layer) are supported yet")
    found: dict[tuple[str, str], dict] = {}
    unknown = []
    for key, value in state.items():
        e = entry(key)
        if e is None:
            unknown.append(key)
        else:
            found.setdefault(e[:2], {})[e[2]] = value
    if not found:
        raise ModelSourceError(f"{path} holds no LoRA weights (lora_down / lora_up, or lora_A / lora_B); "
                               "is it a LoRA for Stable Diffusion 1.x / 2.x?")
    if unknown:
        raise ModelSourceError(f"{path}: {len(unknown)} of its weights are of no LoRA layout we read (e.g. "
                               f"{', '.join(unknown[:3])}); merging the rest would change the model partly")
    meta = adapter_metadata(ck)
    out = []
    for (component, name), parts in found.items():
        if not {"down", "up"} <= set(parts):
            raise ModelSourceError(f"{path}: the LoRA of {name} lacks its {({'down', 'up'} - set(parts)).pop()} matrix")
        alpha = parts.get("alpha", meta.get(f"{component}.lora_alpha"))
        out.append(Pair(component, name, parts["down"], parts["up"], alpha))
    return out


def adapter_metadata(ck) -> dict:
    """diffusers' `lora_adapter_metadata` header (PEFT's r and lora_alpha a component), which
    holds the alphas of files whose tensors carry none."""
    import json

    try:
        meta = json.loads((ck.metadata or {}).get("lora_adapter_metadata", "{}") or "{}")
    except ValueError:
        raise ModelSourceError(f"{ck.path}: its lora_adapter_metadata header is not JSON") from None
    if any(meta.get(k) for k in meta if k.endswith(".alpha_pattern")):
        raise ModelSourceError(f"{ck.path}: per-layer alphas (PEFT alpha_pattern) are not supported yet")
    return meta


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


def a1111_hash(path: Path) -> str:
    """AUTOMATIC1111's hash of a LoRA file, which its "Lora hashes" infotext carries (12 digits)
    and CivitAI finds LoRAs by: of a .safetensors file the SHA-256 of what follows its header
    (kohya's "addnet" hash, whatever the metadata says), of any other file of all of it."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix.lower() == ".safetensors":
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def merge(src, loras, allow_pickle: bool) -> None:
    """Add each (file, weight) LoRA to `src`'s U-Net and text encoders in place, and fold the
    files and weights into its weight hash (the engine's "Model hash")."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    targets = {"unet": layers(src.unet), "text_encoder": layers(src.text_encoder),
               "text_encoder_2": layers(src.text_encoder_2) if src.text_encoder_2 is not None else {}}
    for spec, weight in loras:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelSourceError(f"--lora {spec}: no such file")
        if path.is_dir():
            raise ModelSourceError(f"--lora {spec} is a folder; pass the LoRA file (.safetensors)")
        found = pairs(single_file.read(path, allow_pickle))
        for p in found:  # the original checkpoint's U-Net block names, as SDXL files have them
            flat = p.name.replace(".", "_")
            if p.component == "unet" and lora_names.is_ldm(flat):
                p.name = lora_names.to_diffusers(flat, src.unet.config) or p.name
        missing = [p.name for p in found if p.name not in targets[p.component]]
        if missing:
            raise ModelSourceError(
                f"--lora {path}: {len(missing)} of its {len(found)} layers are not in this model (e.g. "
                f"{missing[0]}): a LoRA for another architecture")
        with torch.no_grad():
            for p in found:
                add(targets[p.component][p.name], p, weight, path)
        sha = hash_files([path])
        digest.update(f"{sha}:{weight}\n".encode())
        src.loras.append({"name": path.stem, "weight": weight, "sha256": sha, "a1111_hash": a1111_hash(path)})
        log.info("merged %s (%d layers, weight %g)", path.name, len(found), weight)
    src.weights_sha256 = hashlib.sha256(f"{src.weights_sha256}\n{digest.hexdigest()}".encode()).hexdigest()


def add(layer, p: Pair, weight: float, path: Path) -> None:
    """layer.weight += weight * alpha / rank * up @ down, the product over flattened kernels."""
    w, down, up = layer.weight, p.down, p.up
    rank = down.shape[0]
    if up.ndim < 2 or up.shape[1] != rank or up.reshape(up.shape[0], -1).shape[1] != rank:
        raise ModelSourceError(f"--lora {path}: {p.name}'s matrices do not chain (down {tuple(down.shape)}, "
                               f"up {tuple(up.shape)})")
    if up.shape[0] != w.shape[0] or down[0].numel() != w[0].numel():
        raise ModelSourceError(f"--lora {path}: {p.name} is {up.shape[0]} x {down[0].numel()} in the LoRA but "
                               f"{tuple(w.shape)} in the model; it was made for another architecture")
    alpha = 1.0 * rank if p.alpha is None else p.alpha
    if getattr(alpha, "numel", lambda: 1)() != 1:
        raise ModelSourceError(f"--lora {path}: {p.name}'s alpha is not one number")
    scale = weight * float(alpha) / rank
    delta = up.reshape(up.shape[0], -1).float() @ down.reshape(rank, -1).float()
    w += scale * delta.reshape(w.shape).to(w.dtype)
