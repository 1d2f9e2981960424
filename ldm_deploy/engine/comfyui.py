"""ComfyUI's PNGs, read for `ldm-run --from-png`: ComfyUI writes no `parameters` text but the graph
it ran, in its API format, as the `prompt` text chunk:

    {"3": {"class_type": "KSampler", "inputs": {"seed": 7, "steps": 20, "cfg": 8.0,
           "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
           "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
     "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
     "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}}, ...}

(an input wired to another node is [node id, output index]). Its text-to-image generation, the
sampler node that starts from an EmptyLatentImage, becomes AUTOMATIC1111's fields (infotext.py),
read as AUTOMATIC1111's are; what this reads only in part is warned about.
"""

from __future__ import annotations

import json
import re

from ldm_deploy.errors import UserError

# ComfyUI's sampler names -> AUTOMATIC1111's (ours: infotext.sampler maps them on); "_gpu": the
# same sampler with its Brownian noise drawn on the GPU.
SAMPLERS = {"euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2",
            "dpm_2_ancestral": "DPM2 a", "dpmpp_2m": "DPM++ 2M", "dpmpp_sde": "DPM++ SDE",
            "dpmpp_sde_gpu": "DPM++ SDE", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2m_sde_gpu": "DPM++ 2M SDE",
            "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun_gpu": "DPM++ 2M SDE Heun",
            "dpmpp_3m_sde": "DPM++ 3M SDE", "dpmpp_3m_sde_gpu": "DPM++ 3M SDE", "ddim": "DDIM", "ddpm": "DDPM",
            "uni_pc": "UniPC", "lcm": "LCM"}
# Its schedulers -> AUTOMATIC1111's schedule types ("normal": timesteps evenly spaced, ours' uniform).
SCHEDULES = {"normal": "Uniform", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
             "beta": "Beta"}
SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
# Nodes that change nothing of what is read here (loaders, decoding, saving, previews).
PLAIN_NODES = {"CheckpointLoaderSimple", "EmptyLatentImage", "CLIPTextEncode", "VAEDecode", "SaveImage",
               "PreviewImage", *SAMPLER_NODES}
# ComfyUI's samplers are k-diffusion's, walking noise levels as it does; ours are diffusers' schedulers.
NEAR = ("the image was drawn by ComfyUI, whose samplers walk k-diffusion's noise levels where ours are diffusers' "
        "schedulers': near, so the image will differ a little")
WEIGHTED = re.compile(r"\([^()]*:\s*[-+]?\d*\.?\d+\s*\)")


def read(chunk: str) -> tuple[str, str, dict[str, str], list[str]]:
    """ComfyUI's `prompt` chunk -> (prompt, negative prompt, AUTOMATIC1111's fields, warnings)."""
    try:
        graph = json.loads(chunk)
    except json.JSONDecodeError as e:
        raise UserError(f"its ComfyUI graph (the 'prompt' text chunk) is not JSON ({e})") from None
    if not isinstance(graph, dict) or not all(isinstance(n, dict) for n in graph.values()):
        raise UserError("its ComfyUI graph (the 'prompt' text chunk) is not a graph of nodes")
    samplers = [(key, node) for key, node in graph.items() if node.get("class_type") in SAMPLER_NODES]
    first = [(key, node) for key, node in samplers if source(graph, node, "latent_image") == "EmptyLatentImage"]
    if not first:
        raise UserError("its ComfyUI graph has no KSampler starting from an EmptyLatentImage (an image-to-image "
                        "or other graph): give the settings on the command line")
    key, node = first[0]
    inputs = node["inputs"]
    advanced = node["class_type"] == "KSamplerAdvanced"
    latent = linked(graph, inputs, "latent_image")["inputs"]
    fields = {"Steps": inputs.get("steps"), "CFG scale": inputs.get("cfg"),
              "Seed": inputs.get("noise_seed" if advanced else "seed"),
              "Size": f"{latent.get('width')}x{latent.get('height')}", "Version": "ComfyUI"}
    name, schedule = inputs.get("sampler_name"), inputs.get("scheduler")
    if name not in SAMPLERS or schedule not in SCHEDULES:
        which = f"sampler {name!r}" if name not in SAMPLERS else f"scheduler {schedule!r}"
        raise UserError(f"the image's ComfyUI {which} is not offered here; pass --sampler with one of ours "
                        f"(ComfyUI's samplers {', '.join(SAMPLERS)} with its schedulers {', '.join(SCHEDULES)})")
    fields["Sampler"], fields["Schedule type"] = SAMPLERS[name], SCHEDULES[schedule]
    ckpt = model_name(graph, inputs)
    if ckpt:
        fields["Model"] = ckpt
    prompt, negative = encoded_text(graph, inputs, "positive"), encoded_text(graph, inputs, "negative")
    warnings = [NEAR]
    if name.endswith("_gpu"):
        warnings.append(f"its {name} drew its Brownian noise on the GPU; here it comes from the CPU")
    if WEIGHTED.search(prompt) or WEIGHTED.search(negative):
        warnings.append("its prompt weighs words, which ComfyUI does toward the empty prompt's embedding and "
                        "AUTOMATIC1111 (and ours) by scaling, so the image will differ")
    if int(latent.get("batch_size", 1) or 1) != 1:
        warnings.append(f"its batch of {latent['batch_size']} drew one noise for all; here one image is drawn, the "
                        "batch's first (--num-images draws seed + i each)")
    if advanced and (inputs.get("add_noise") == "disable" or int(inputs.get("start_at_step", 0) or 0) > 0
                     or int(inputs.get("end_at_step", 10000) or 10000) < int(inputs.get("steps", 0) or 0)):
        warnings.append("its KSamplerAdvanced draws only part of the walk (start_at_step / end_at_step / add_noise), "
                        "which is not read: the whole walk is drawn")
    elif not advanced and float(inputs.get("denoise", 1.0) or 0) != 1.0:
        warnings.append(f"its denoise {inputs['denoise']} (a walk of steps / denoise cut short) is not read: the "
                        "whole walk is drawn")
    others = sorted({n.get("class_type", "?") for n in graph.values()} - PLAIN_NODES)
    if len(samplers) > 1:
        warnings.append(f"its graph samples {len(samplers)} times; only node {key}'s text-to-image pass is drawn")
    if others:
        warnings.append(f"its graph's {', '.join(others)} {'is' if len(others) == 1 else 'are'} not drawn here, so "
                        "the image may differ")
    return prompt, negative, {k: str(v) for k, v in fields.items() if v is not None}, warnings


def linked(graph: dict, inputs: dict, name: str) -> dict:
    """The node wired into input `name` ({} if none)."""
    link = inputs.get(name)
    if isinstance(link, list) and link and str(link[0]) in graph:
        return graph[str(link[0])]
    return {}


def source(graph: dict, node: dict, name: str) -> str | None:
    return linked(graph, node.get("inputs", {}), name).get("class_type")


def encoded_text(graph: dict, inputs: dict, name: str) -> str:
    """The text of the CLIPTextEncode wired into `name`; a UserError for other conditioning."""
    node = linked(graph, inputs, name)
    if node.get("class_type") != "CLIPTextEncode" or not isinstance(node["inputs"].get("text"), str):
        raise UserError(f"the ComfyUI graph's {name} conditioning comes from {node.get('class_type', 'nothing')}, "
                        "not a CLIPTextEncode with its text: give the prompts on the command line")
    return node["inputs"]["text"]


def model_name(graph: dict, inputs: dict) -> str | None:
    """The checkpoint's file name, without its suffix, where a CheckpointLoaderSimple loads it."""
    node = linked(graph, inputs, "model")
    name = node.get("inputs", {}).get("ckpt_name") if node.get("class_type") == "CheckpointLoaderSimple" else None
    return re.sub(r"\.(safetensors|ckpt|pt|pth|bin)$", "", name.replace("\\", "/").rsplit("/", 1)[-1]) if name else None
