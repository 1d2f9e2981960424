"""AUTOMATIC1111's generation parameters ("infotext"), written into every PNG (`parameters`) and
read back: `ldm-run --from-png` draws an image again from the `parameters` text of a PNG that
ldm-deploy, AUTOMATIC1111 or a tool writing its format (Forge, SD.Next, CivitAI's downloads) made.

The text is the prompt (any number of lines), then a line starting "Negative prompt:" (it too may
go on over lines), then one line of "Key: value" fields, values with commas JSON-quoted:

    a lighthouse at dusk
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, ...

`settings` turns the fields into ldm-run's options, with a warning for each one that would make
the image come out otherwise here (another model, a sampler or upscaler not offered, ...).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ldm_deploy.errors import UserError

# One field: a name of words, then a quoted value or anything up to the next comma.
FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
SIZE = re.compile(r"^(\d+)x(\d+)$")
# A longer last line is not read as fields (FIELD's search grows with the square of its length;
# AUTOMATIC1111's own are well under 2 KB, LoRA and ControlNet fields included).
MAX_FIELDS_LINE = 8192
# Number fields -> (ldm-run option, type); Clip skip counts as ldm-run's --clip-skip does.
NUMBERS = {"Steps": ("steps", int), "CFG scale": ("guidance", float), "Seed": ("seed", int),
           "Clip skip": ("clip_skip", int), "Mask blur": ("mask_blur", float),
           "Refiner switch at": ("refiner_switch_at", float), "Variation seed": ("variation_seed", int),
           "Variation seed strength": ("variation_strength", float), "Noise multiplier": ("noise_multiplier", float)}
# The schedules our sampler names end in (ldm_deploy.engine.samplers.DISPLAY_NAMES).
SCHEDULE_LABELS = ("Karras", "Exponential", "SGM Uniform", "Beta", "Align Your Steps")
# AUTOMATIC1111 1.9+'s "Schedule type: Automatic": each sampler's own default (others: uniform).
AUTOMATIC_SCHEDULES = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2S a": "Karras",
                       "DPM++ 2M SDE": "Exponential", "DPM++ 3M SDE": "Exponential", "DPM++ 2M SDE Heun": "Exponential"}
# Our samplers (by the start of their names) whose AUTOMATIC1111 images differ from diffusers' here,
# and why: "the image's <its sampler> is AUTOMATIC1111's, <why>, so the image will differ".
DIFFERS = {
    "unipc": "which runs another variant (bh1, order 3) than diffusers' UniPC here",
    "dpm2": "which drops the next-to-last noise level of one step more than diffusers' KDPM2 schedulers here",
    "dpmpp_2m_sde": "whose noise comes from a Brownian tree, where ours is diffusers' fresh noise each step",
    "dpmpp_3m_sde": "which drops the next-to-last noise level and draws its noise from a Brownian tree, where ours is "
                    "diffusers' fresh noise each step",
    "dpmpp_sde": "whose Brownian noise is drawn on its GPU over its own noise levels, where ours follows diffusers' "
                 "on the CPU",
    "lcm": "whose timesteps are spaced otherwise than diffusers' LCMScheduler spaces them here",
}
SGM_UNIFORM = ("which spaces the timesteps from 999 to 0 at fractions, where diffusers' trailing spacing here "
               "takes whole ones: near, so the image will differ a little")
AYS = ("which spreads NVIDIA's levels over the steps down to sigma_min and then takes a step to 0, where "
       "diffusers' (and ComfyUI's) here put 0 in place of sigma_min: near, so the image will differ a little")
# Our schedules (by the end of our names) whose AUTOMATIC1111 walks differ: (its label, why).
SCHEDULE_DIFFERS = {"_sgm_uniform": ("SGM Uniform", SGM_UNIFORM), "_ays": ("Align Your Steps", AYS)}
# Fields whose difference changes nothing here, or that say how the image was made elsewhere.
# Ours: an SDXL image whose empty negative prompt was encoded (given as ""), not zeros (none given),
# which the text alone cannot tell apart (no "Negative prompt:" line either way).
EMPTY_NEGATIVE = "Empty negative prompt"
QUIET = {"Model", "Version", "Batch size", "Batch pos", "VAE", "TI hashes", "Lora hashes", "Emphasis",
         "Hires upscale", "Hires steps", "Hires upscaler", "Denoising strength", "Clip skip", "Size",
         "Seed", "Steps", "Sampler", "Schedule type", "CFG scale", "Model hash", "Negative prompt", "Mask blur",
         "Refiner", "Refiner switch at", "Variation seed", "Variation seed strength", "Seed resize from",
         "Tiling", "Hires prompt", "Hires negative prompt", "Hires sampler", "Hires schedule type", "Noise multiplier",
         "Inpaint area", "Masked area padding", EMPTY_NEGATIVE,
         *(f"Beta schedule{r} {p}" for r in ("", "r") for p in ("alpha", "beta"))}
# The Beta schedule's distribution (samplers/beta_dist.py): AUTOMATIC1111's default, and diffusers' only one.
# It writes "Beta schedule alpha" and "... beta" wherever a pass draws with it (Forge: "Beta scheduler beta").
BETA_DISTRIBUTION = (0.6, 0.6)


def beta_fields(*samplers: str | None) -> dict:
    """AUTOMATIC1111's Beta fields where any of a request's samplers (first pass, hires) draws with
    Beta; {} where none does."""
    if not any((s or "").endswith("_beta") for s in samplers):
        return {}
    return dict(zip(("Beta schedule alpha", "Beta schedule beta"), BETA_DISTRIBUTION))


def read_png(path: str | Path) -> str:
    """The `parameters` text of a PNG, or a UserError saying why there is none."""
    text = png_text(path).get("parameters")
    if not isinstance(text, str) or not text.strip():
        raise no_parameters(path)
    return text


def no_parameters(path: str | Path) -> UserError:
    return UserError(f"--from-png {path}: it has no generation parameters (no 'parameters' text chunk, as "
                     "AUTOMATIC1111 and ldm-run write them, nor ComfyUI's 'prompt'; image sites often strip them)")


def read(path: str | Path) -> tuple[str, str, dict[str, str], list[str]]:
    """A PNG's generation: (prompt, negative prompt, fields, warnings) from its `parameters` text
    (AUTOMATIC1111's, ours) or else ComfyUI's graph (comfyui/), whose fields are AUTOMATIC1111's."""
    from ldm_deploy.engine import comfyui

    chunks = png_text(path)
    text, graph = chunks.get("parameters"), chunks.get("prompt")
    if isinstance(text, str) and text.strip():
        return (*parse(text), [])
    if isinstance(graph, str):
        try:
            return comfyui.read(graph)
        except UserError as e:
            raise UserError(f"--from-png {path}: {e}") from None
    raise no_parameters(path)


def png_text(path: str | Path) -> dict:
    """A PNG's text chunks (PIL's info), or a UserError where it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # text chunks after the image data
            return dict(im.info)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"--from-png {path}: cannot read it ({e})") from None


def parse(text: str) -> tuple[str, str, dict[str, str]]:
    """Infotext -> (prompt, negative prompt, {field: value}), as AUTOMATIC1111 reads its own: the
    last line holds the fields where at least three parse."""
    lines = text.strip().split("\n")
    fields: dict[str, str] = {}
    if len(lines[-1]) <= MAX_FIELDS_LINE and len(FIELD.findall(lines[-1])) >= 3:
        for key, value in FIELD.findall(lines.pop()):
            value = value.strip()
            if len(value) > 1 and value[0] == value[-1] == '"':
                try:
                    value = json.loads(value)  # as quoted: spaces inside kept
                except json.JSONDecodeError:
                    pass
            fields[key.strip()] = value
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt).strip(), "\n".join(negative).strip(), fields


def settings(fields: dict[str, str], given: set = frozenset()) -> tuple[dict, list[str]]:
    """The fields -> ({ldm-run option: value}, [warnings]). given: options set otherwise (the
    command line's), whose fields are not read."""
    from ldm_deploy.engine.hires import UPSCALERS, upscaler_name
    from ldm_deploy.engine.samplers import DISPLAY_NAMES

    out, warnings = {}, []

    def number(key, kind, option):
        if option in given:
            return None  # set on the command line: the field is not read
        try:
            return kind(fields[key])
        except ValueError:
            raise UserError(f"the image's {key} is {fields[key]!r}, not a number") from None

    for key, (option, kind) in NUMBERS.items():
        if key in fields:
            out[option] = number(key, kind, option)
    if "Size" in fields:
        m = SIZE.match(fields["Size"])
        if not m:
            raise UserError(f"the image's Size is {fields['Size']!r}, not WIDTHxHEIGHT")
        out["width"], out["height"] = int(m.group(1)), int(m.group(2))
    if "Seed resize from" in fields and "seed_resize_from" not in given:
        m = re.match(r"^(-?\d+)x(-?\d+)$", fields["Seed resize from"])
        if not m:
            raise UserError(f"the image's Seed resize from is {fields['Seed resize from']!r}, not WIDTHxHEIGHT")
        w, h = int(m.group(1)), int(m.group(2))
        out["seed_resize_from"] = (w, h) if w > 0 and h > 0 else None  # its "-1x-1" (1.3-1.5's API): none
    if fields.get("Emphasis") == "None":
        out["prompt_weighting"] = False
    if "Sampler" in fields and "sampler" not in given:
        out["sampler"] = sampler(fields["Sampler"], fields.get("Schedule type"), DISPLAY_NAMES)
        warnings += sampler_warnings(out["sampler"], fields["Sampler"], fields)
    beta = beta_warning(fields)
    if "Hires upscale" in fields:
        out["hires_scale"] = number("Hires upscale", float, "hires_scale")
        if "Hires steps" in fields:
            out["hires_steps"] = number("Hires steps", int, "hires_steps")
        if "Denoising strength" in fields:
            out["hires_strength"] = number("Denoising strength", float, "hires_strength")
        for key, option in (("Hires prompt", "hires_prompt"), ("Hires negative prompt", "hires_negative_prompt")):
            if key in fields and option not in given:
                out[option] = fields[key]
        if ("Hires sampler" in fields or "Hires schedule type" in fields) and "hires_sampler" not in given:
            # its get_hr_sampler_and_scheduler: each the first pass's where the hires field is missing
            name = fields.get("Hires sampler", fields.get("Sampler", "Euler"))
            out["hires_sampler"] = sampler(name, fields.get("Hires schedule type", fields.get("Schedule type")),
                                           DISPLAY_NAMES)
            # (a reason the first pass's sampler gave already is not repeated)
            first = sampler_reasons(out["sampler"]) if "sampler" in out else []
            warnings += sampler_warnings(out["hires_sampler"], name, fields, hires=True, skip=first)
        upscaler = upscaler_name(fields.get("Hires upscaler", UPSCALERS[0]))
        if upscaler == "None":  # AUTOMATIC1111's plain resize: Lanczos
            upscaler = UPSCALERS[0]
        # Another name may be an upscale model the engine holds (ldm-export --upscaler): upscaler_warning
        # checks it once the engine is loaded.
        out["hires_upscaler"] = upscaler
    elif "Denoising strength" in fields:
        out["strength"] = number("Denoising strength", float, "strength")  # img2img: with --init-image
    if fields.get("Inpaint area") == "Only masked":  # (with --mask); AUTOMATIC1111's default padding is 32
        out["mask_crop"] = number("Masked area padding", int, "mask_crop") if "Masked area padding" in fields else 32
    if "RNG" not in fields and not fields.get("Version", "").startswith(("ldm-deploy", "ComfyUI")):
        # its default noise source, the GPU's, writes no field; ours is its CPU source
        warnings.append("the PNG names no noise source (RNG), so AUTOMATIC1111 drew its noise on the GPU, its default "
                        "source; here seeds draw its CPU source's noise (RNG: CPU), so the image will differ")
    elif fields.get("RNG", "CPU") != "CPU":  # its noise source other than CPU, ours
        warnings.append(f"the image's noise came from AUTOMATIC1111's {fields['RNG']} random source; here seeds "
                        "draw its CPU source's noise, so the image will differ")
    if beta and beta_fields(out.get("sampler"), out.get("hires_sampler")):  # (else not drawn with it)
        warnings.append(beta)
    controls, control_warnings = control_settings(fields)
    warnings += control_warnings
    if controls:  # (ldm-run takes them where the control images are given)
        out["png_controls"] = controls
    other = [k for k in fields if k not in QUIET and k != "RNG" and not re.fullmatch(r"ControlNet \d+", k)]
    if other:
        warnings.append(f"the image's {', '.join(other)} {'is' if len(other) == 1 else 'are'} not taken here, "
                        "so the image may differ")
    return {k: v for k, v in out.items() if k not in given and v is not None}, warnings


NUMBER = r"(-?[0-9.]+(?:e-?[0-9]+)?)"


def control_settings(fields: dict[str, str]) -> tuple[dict[int, tuple[float, float, float]], list[str]]:
    """AUTOMATIC1111's ControlNet extension's fields ("ControlNet 0": "Module: ..., Model: ...,
    Weight: 1, Guidance Start: 0, Guidance End: 1, ...", ours alike; its older "weight: 1,
    starting/ending: (0, 1)") -> ({unit: (weight, start, end)}, [warnings for units not read]);
    a unit's other settings (its preprocessor, control mode) are not ours to take."""
    out, warnings = {}, []
    for key, value in fields.items():
        m = re.fullmatch(r"ControlNet (\d+)", key)
        if m is None:
            continue
        text = value.lower()
        weight = re.search(r"\bweight:\s*" + NUMBER, text)
        start, end = (re.search(rf"guidance {side}:\s*" + NUMBER, text) for side in ("start", "end"))
        span = re.search(r"starting/ending:\s*\(\s*" + NUMBER + r"\s*,\s*" + NUMBER + r"\s*\)", text)
        try:
            out[int(m.group(1))] = (float(weight.group(1)) if weight else 1.0,
                                    float(start.group(1)) if start else float(span.group(1)) if span else 0.0,
                                    float(end.group(1)) if end else float(span.group(2)) if span else 1.0)
        except ValueError:
            warnings.append(f"the image's {key} ({value[:60]}...) is not read here: its weight or guidance is not "
                            "a number")
    return out, warnings


def beta_warning(fields: dict[str, str]) -> str | None:
    """A warning where the image's Beta schedule is another Beta distribution than ours."""
    def ours(value, default):
        try:
            return value is None or float(value) == default
        except ValueError:
            return False

    # each spelling written (Forge writes "Beta schedule alpha" beside "Beta scheduler beta")
    values = [[fields.get(f"Beta {s} {p}") for s in ("schedule", "scheduler")] for p in ("alpha", "beta")]
    if all(ours(v, d) for pair, d in zip(values, BETA_DISTRIBUTION) for v in pair):
        return None
    alpha, beta = (next((v for v in pair if not ours(v, d)), d) for pair, d in zip(values, BETA_DISTRIBUTION))
    return (f"the image's Beta schedule has alpha {alpha} and beta {beta}; here it is Beta"
            f"{BETA_DISTRIBUTION} (AUTOMATIC1111's default, and diffusers'), so the image will differ")


def sampler_reasons(key: str) -> list[str]:
    """Why AUTOMATIC1111's images with our sampler `key` differ here (DIFFERS, SCHEDULE_DIFFERS)."""
    if key.startswith("dpmpp_3m_sde") and key.endswith("_ays"):
        # its next-to-last level, which it drops, is the sigma_min that Align Your Steps here puts 0
        # in place of: the walk is ours (ays.py), the noise not
        return [DIFFERS["dpmpp_2m_sde"]]
    out = [why for prefix, why in DIFFERS.items() if key.startswith(prefix)][:1]
    return out + [why for suffix, (_, why) in SCHEDULE_DIFFERS.items() if key.endswith(suffix)]


def sampler_warnings(key: str, name: str, fields: dict[str, str], hires: bool = False, skip=()) -> list[str]:
    """Why an AUTOMATIC1111 image drawn with its sampler `name` (ours: `key`; hires: its hires
    sampler) will differ here, but for the reasons in `skip`."""
    if fields.get("Version", "").startswith(("ldm-deploy", "ComfyUI")):  # (ComfyUI's: comfyui.NEAR)
        return []
    out = []
    for why in sampler_reasons(key):
        if why in skip:
            continue
        label = next((label for label, reason in SCHEDULE_DIFFERS.values() if why is reason), None)
        if label:
            out.append(f"the image's {'hires ' if hires else ''}{label} schedule is AUTOMATIC1111's, {why}")
        else:
            out.append(f"the image's {'hires sampler ' if hires else ''}{name} is AUTOMATIC1111's, {why}, so the "
                       "image will differ")
    return out


def refiner_warning(fields: dict[str, str], refiner_hash: str | None) -> str | None:
    """A warning where the image's "Refiner" is not the refiner given (None: none given)."""
    theirs = fields.get("Refiner")
    if theirs is None:
        return None if refiner_hash is None else "the image was drawn without a refiner; this one will change it"
    if refiner_hash is None:
        return f"the image was finished by the refiner {theirs}; pass --refiner ENGINE (its engine) to draw it again"
    h = re.search(r"\[([0-9a-fA-F]+)\]\s*$", theirs)
    if h and not refiner_hash.startswith(h.group(1).lower()):
        return f"the image was finished by the refiner {theirs}; this refiner's hash is {refiner_hash[:10]}"
    return None


def upscaler_warning(fields: dict[str, str], upscaler: str | None, models: dict) -> str | None:
    """A warning where the hires upscaler read from the image is neither one of ours nor an upscale
    model of the engine's (`models`: its manifest's upscalers), which Lanczos then replaces."""
    from ldm_deploy.engine.hires import UPSCALERS

    if upscaler is None or upscaler in UPSCALERS or upscaler in models:
        return None
    offered = ", ".join((*UPSCALERS, *models))
    return (f"the image's hires upscaler {fields.get('Hires upscaler', upscaler)!r} is not offered by this engine "
            f"(one of {offered}); Lanczos enlarges it instead. Upscale models (ESRGAN, ...) go into an engine "
            "with ldm-export --upscaler FILE[:NAME]")


def tiling_warning(fields: dict[str, str], tiles: bool) -> str | None:
    """A warning where the image's "Tiling" is not the engine's (ldm-export --tiling)."""
    theirs = fields.get("Tiling") == "True"
    if theirs == tiles:
        return None
    return ("the image was drawn to tile (Tiling: True); this engine does not tile: export one with ldm-export "
            "--tiling (ldm-run --model ... --tiling)" if theirs else
            "this engine tiles (exported with --tiling) and the image was drawn without, so it will differ")


def model_warning(fields: dict[str, str], model) -> str | None:
    """A warning where the image's "Model hash" is not the engine's model's (its checkpoint's:
    ModelInfo.model_hash), or the engine merges LoRAs its "Lora hashes" do not name."""
    theirs = fields.get("Model hash", "")
    named = fields.get("Model", "")
    if not theirs and named:  # (ComfyUI's graph names its checkpoint, hashing nothing): the names
        def bare(name: str) -> str:  # (a ckpt_name may hold its folder, and Windows' separators)
            path = Path(name.replace("\\", "/"))
            return (path.stem if path.suffix.lower() in CHECKPOINT_SUFFIXES else path.name).lower()

        if bare(named) != bare(model_name(model.source)):
            return (f"the image was drawn with the checkpoint {named}; this engine's model is "
                    f"{model_name(model.source)}: another model, so the image will differ (the PNG gives no hash: "
                    "only the names were compared)")
    if theirs and not model.model_hash.startswith(theirs.lower()[:10]):
        return (f"the image was drawn by a model with hash {theirs} ({fields.get('Model', 'unnamed')}); this "
                f"engine's is {model.model_hash}: another model, or the same weights in another format (a diffusers "
                "folder hashes otherwise than its checkpoint file)")
    # its "name: hash" pairs; the name is the prompt's (an alias, maybe), so the hash counts as well
    drawn_with = {side.strip().lower() for part in fields.get("Lora hashes", "").split(",") for side in part.split(":")}
    # (engines from before LoRAs' hashes wrote no Lora hashes: theirs not checked)
    extra = [lora["name"] for lora in model.loras if lora.get("a1111_hash")
             and not {lora["name"].lower(), lora["a1111_hash"][:12].lower()} & drawn_with]
    if extra:
        return (f"this engine merges the LoRA{'s' if len(extra) > 1 else ''} {', '.join(extra)} (ldm-export --lora), "
                "which the image's Lora hashes do not name: it was drawn without, so it will differ")
    return None


def sampler(name: str, schedule: str | None, display_names: dict) -> str:
    """AUTOMATIC1111's sampler (and, since its 1.9, separate schedule type) -> ours."""
    ours = {display.lower(): key for key, display in display_names.items()}
    if name.endswith(tuple(f" {label}" for label in SCHEDULE_LABELS)):  # the name says it: that one
        schedule = None
    if schedule == "Automatic":  # AUTOMATIC1111 1.9+: the sampler's own default schedule
        schedule = AUTOMATIC_SCHEDULES.get(name)
    full = f"{name} {schedule}" if schedule and schedule != "Uniform" else name
    key = ours.get(full.lower())
    if key is None:
        raise UserError(f"the image's sampler {full!r} is not offered here; pass --sampler with one of "
                        f"{', '.join(display_names)} ({', '.join(display_names.values())})")
    return key


def sampler_fields(display: str, sampler_field: str = "Sampler", schedule_field: str = "Schedule type") -> dict:
    """A sampler's infotext fields. The schedule stays in the name ("DPM++ 2M Karras"), which every
    AUTOMATIC1111 reads ("Beta", "Align Your Steps": its 1.10+, which has them), but for "SGM Uniform", which its 1.9+ would cut at " Uniform", and a
    uniform sampler whose name alone it reads as its own default ("DPM++ 2M": Karras): those say
    their schedule apart, as its 1.9+ writes."""
    if display.endswith(" SGM Uniform"):
        return {sampler_field: display.removesuffix(" SGM Uniform"), schedule_field: "SGM Uniform"}
    return {sampler_field: display, **({schedule_field: "Uniform"} if display in AUTOMATIC_SCHEDULES else {})}


def parameters(model, req, i: int, img2img: bool, fix=None, crop_pad: int | None = None, control=None,
               mask_blur: float | None = None, refiner: dict | None = None) -> str:
    """The `parameters` text of image i of a request drawn by an engine of `model` (its manifest's
    ModelInfo), in AUTOMATIC1111's format: what `ldm-run --from-png` and image browsers read.
    refiner: the refiner's fields (refine.fields)."""
    from ldm_deploy import __version__
    from ldm_deploy.engine import hires, images
    from ldm_deploy.engine.samplers import DISPLAY_NAMES

    fields = {
        "Steps": req.steps,
        **sampler_fields(DISPLAY_NAMES[req.sampler]),
        "CFG scale": req.guidance,
        "Seed": req.seeds[i],
        "Size": f"{req.width}x{req.height}",
        "Model hash": model.model_hash,
        "Model": model_name(model.source),
    }
    if model.vae:  # AUTOMATIC1111 names a replacement VAE so
        fields["VAE"] = Path(model.vae).stem
    if req.variation_strength:  # AUTOMATIC1111's, where it writes them
        fields["Variation seed"] = req.variation_seeds[i]
        fields["Variation seed strength"] = req.variation_strength
    if req.seed_resize_from:
        fields["Seed resize from"] = "{}x{}".format(*req.seed_resize_from)
    if img2img:
        fields["Denoising strength"] = req.strength
        if req.noise_multiplier != 1:  # AUTOMATIC1111's, where it writes it
            fields["Noise multiplier"] = req.noise_multiplier
    if fix is not None:
        fields.update(hires.fields(fix, req, i))
    fields.update(beta_fields(req.sampler, fix and fix.sampler))
    if refiner:
        fields.update(refiner)
    if mask_blur is not None:  # AUTOMATIC1111 writes whole pixels without a point
        fields["Mask blur"] = int(mask_blur) if float(mask_blur).is_integer() else mask_blur
    if crop_pad is not None:  # AUTOMATIC1111's fields for it
        fields.update({"Inpaint area": "Only masked", "Masked area padding": crop_pad})
    if control is not None:
        fields.update(control.fields(model.controlnets))
    if model.zero_negative and req.guided and not req.zero_negative and not req.negative_prompts[i]:
        fields[EMPTY_NEGATIVE] = "encoded"
    if req.clip_skip:
        fields["Clip skip"] = req.clip_skip + 1  # AUTOMATIC1111 counts the last layer as 1
    if model.tiling:
        fields["Tiling"] = "True"
    hires_texts = "" if fix is None else f"{fix.prompt or ''}\n{fix.negative_prompt or ''}"
    if not req.prompt_weighting and re.search(r"[()\[\]]|<\w+:[^>]+>|\bBREAK\b",
                                              req.prompts[i] + req.negative_prompts[i] + hires_texts):
        fields["Emphasis"] = "None"  # AUTOMATIC1111's setting that reads brackets as plain text
    loras = [f"{lora['name']}: {lora['a1111_hash'][:12]}" for lora in model.loras
             if lora.get("a1111_hash")]  # merged: in every image (engines before the hash: none)
    if loras:
        fields["Lora hashes"] = json.dumps(", ".join(loras))
    texts = f"{req.prompts[i]}\n{req.negative_prompts[i]}\n{hires_texts}".lower()
    used = [f"{e['word']}: {e['sha256'][:12]}" for e in model.embeddings if e["word"].lower() in texts]
    if used:  # AUTOMATIC1111's field, JSON-quoted as it quotes values with commas or colons
        fields["TI hashes"] = json.dumps(", ".join(used))
    fields["Version"] = f"ldm-deploy {__version__}"
    return images.parameters_text(req.prompts[i], req.negative_prompts[i], fields)


# export/single_file.py's SAFE_SUFFIXES + PICKLE_SUFFIXES (the runtime imports nothing of export/)
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def model_name(source: str) -> str:
    """What AUTOMATIC1111's "Model" field shows: the checkpoint file's name without its suffix,
    the model folder's (or hub id's) last part, or the folder above a generically named one (our
    bundled shapes/model -> "shapes")."""
    path = Path(source)
    if path.is_absolute() and path.suffix.lower() in CHECKPOINT_SUFFIXES:
        return path.stem  # a single-file checkpoint: its file name, as AUTOMATIC1111 shows it
    generic = path.is_absolute() and path.name in ("model", "diffusers") and path.parent.name
    return path.parent.name if generic else path.name
