"""AUTOMATIC1111's txt2img / img2img request bodies -> Pipeline keywords.

Its API (stable-diffusion-webui 1.10, `modules/api/models.py`) takes the fields of its processing
classes, each optional with that class's default, and ignores fields it does not know. Here:
the fields that draw the image are read with its API's defaults (steps 50, CFG scale 7, sampler
"Euler", img2img denoising strength 0.75, mask blur 4, "Only masked" inpainting, masked content
"fill"), but width and height, which default to the engine's size for txt2img and the image's for
img2img, rather than 512 (an SDXL engine draws 1024 px, the shapes model 64); a field asking for what is not
offered here (face restoration, scripts, ControlNet preprocessors, ...) is refused by name rather than
left out, so that no image comes back other than asked for. Fields that tune k-diffusion's
samplers (eta, s_churn, s_noise, ...), instruct-pix2pix's image_cfg_scale (no such model is served)
or say where to save are accepted and have no effect.
"""

from __future__ import annotations

from PIL import Image, ImageOps

from ldm_deploy.engine.hires import UPSCALERS, upscaler_name
from ldm_deploy.engine import styles
from ldm_deploy.engine.infotext import AUTOMATIC_SCHEDULES, BETA_DISTRIBUTION, SCHEDULE_LABELS, beta_fields
from ldm_deploy.engine.samplers import DISPLAY_NAMES, SAMPLERS
from ldm_deploy.errors import InvalidRequest
from ldm_deploy.serve.a1111_controlnet import controlnet
from ldm_deploy.serve.fields import flag, integer, number, picture, text

# AUTOMATIC1111's scheduler names -> labels (those that fit our samplers' schedules).
SCHEDULERS = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
              "sgm_uniform": "SGM Uniform", "beta": "Beta", "align_your_steps": "Align Your Steps"}
# Its sampler aliases (k-diffusion's names) -> its display names.
ALIASES = {"k_euler": "Euler", "k_euler_a": "Euler a", "k_euler_ancestral": "Euler a", "k_heun": "Heun",
           "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_2m_sde": "DPM++ 2M SDE", "k_lcm": "LCM", "ddim": "DDIM",
           "unipc": "UniPC", "k_dpm_2": "DPM2", "k_dpm_2_a": "DPM2 a",
           "k_dpmpp_sde": "DPM++ SDE", "k_dpmpp_3m_sde": "DPM++ 3M SDE",
           "k_dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "k_dpmpp_2s_a": "DPM++ 2S a"}
# Its inpainting_fill -> masked_content
FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
# Fields that ask for what is not offered, and the value that asks for nothing.
NOT_OFFERED = {"restore_faces": (None, False),
               "script_name": (None, ""), "script_args": (None, []),
               "firstphase_width": (None, 0), "firstphase_height": (None, 0), "firstpass_image": (None,),
               "hr_checkpoint_name": (None, "", "Use same checkpoint"), "latent_mask": (None,)}
WHY = {"restore_faces": "face restoration",
       "script_name": "scripts", "script_args": "scripts",
       "firstphase_width": "the old hires fix's first phase size", "firstphase_height": "the old hires fix's "
       "first phase size", "firstpass_image": "a given first pass", "hr_checkpoint_name": "another hires "
       "checkpoint", "latent_mask": "a separate latent mask"}


def txt2img(body: dict, model, size: tuple[int, int], random_seed, saved: dict | None = None,
            upscalers=()) -> dict:
    """A txt2img body -> Pipeline keywords (the seed drawn where it is -1). `model`: the engine's
    ModelInfo; `size`: its default (width, height); `saved`: the server's styles (styles.read)."""
    options, resizes = common(body, model, size, random_seed, saved)
    fit_controls(options, resizes, (options["width"], options["height"]))
    if flag(body, "enable_hr"):
        fix = hires(body, options, upscalers)
        names = body.get("styles") or []  # its hires prompts are styled too (none given: the styled ones)
        if "hires_prompt" in fix:
            fix["hires_prompt"] = styles.apply(names, saved or {}, fix["hires_prompt"], None)[0]
        if "hires_negative_prompt" in fix:
            fix["hires_negative_prompt"] = styles.apply(names, saved or {}, "", fix["hires_negative_prompt"])[1]
        options.update(fix)
    else:
        for k in ("hr_prompt", "hr_negative_prompt"):
            text(body, k)
    beta_distribution(body.get("override_settings") or {}, options)
    return options


def img2img(body: dict, model, size: tuple[int, int], random_seed, saved: dict | None = None) -> dict:
    """An img2img body (init_images, and mask for inpainting) -> Pipeline keywords."""
    if flag(body, "enable_hr"):
        raise InvalidRequest("enable_hr (the hires fix) is a txt2img field; img2img draws at width x height")
    options, resizes = common(body, model, None, random_seed, saved)
    # its "Noise multiplier for img2img" (txt2img ignores it, as there; so do its override_settings,
    # which it applies after the request has taken the setting)
    options["noise_multiplier"] = number(body, "initial_noise_multiplier", 1.0)
    beta_distribution(body.get("override_settings") or {}, options)
    inits = body.get("init_images")
    if not isinstance(inits, list) or not inits:
        raise InvalidRequest("init_images: give the image to start from, as a list of one base64-encoded image")
    if any(v != inits[0] for v in inits[1:]):
        raise InvalidRequest("init_images holds several images; one is drawn from here (send one request each)")
    init = flatten(picture(inits[0], "init_images[0]"))
    size = (options.get("width") or init.size[0], options.get("height") or init.size[1])
    mode = mode_of(body.get("resize_mode", 0), "resize_mode")
    mask = binary_mask(picture(body["mask"], "mask")) if body.get("mask") is not None else None
    only_masked = mask is not None and flag(body, "inpaint_full_res", True)
    if only_masked and mask.size != init.size:  # (AUTOMATIC1111's paste of the two fails)
        raise InvalidRequest(f"the mask is {mask.size[0]}x{mask.size[1]} and the image {init.size[0]}x"
                             f"{init.size[1]}: inpaint_full_res (\"Only masked\") cuts the image where the "
                             f"mask is; send them at the same size, or set inpaint_full_res false")
    options["init_image"] = init
    if mode in (1, 2) and not only_masked:  # the pipeline fits the picture and its mask (blurred first), as
        options["resize_mode"] = mode       # AUTOMATIC1111 does; "Only masked" cuts around the mask instead
    options["strength"] = number(body, "denoising_strength", 0.75)
    fit_controls(options, resizes, size)
    if mask is not None:
        if integer(body, "inpainting_mask_invert", 0):
            mask = ImageOps.invert(mask)
        options["mask"] = mask  # (of any size but with "Only masked": fitted as the picture is, as there)
        options["mask_blur"] = mask_blur(body)
        fill = integer(body, "inpainting_fill", 0)
        if fill not in FILLS:
            raise InvalidRequest(f"inpainting_fill is 0 (fill: the colours around it), 1 (original: the image "
                                 f"there), 2 (latent noise) or 3 (latent nothing); got {fill}")
        options["masked_content"] = FILLS[fill]
        if only_masked:
            options["mask_crop"] = integer(body, "inpaint_full_res_padding", 0)
    return options


def flatten(image: Image.Image) -> Image.Image:
    """An init image as AUTOMATIC1111's img2img takes it (its images.flatten): an RGBA one laid over
    its img2img background colour, white by default, so that what hides under transparent pixels
    does not show; any other made RGB as it is."""
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        background.paste(image, mask=image)
        image = background
    return image.convert("RGB")


def binary_mask(image: Image.Image) -> Image.Image:
    """A mask as AUTOMATIC1111 takes it: an RGBA image with transparency is its alpha (strokes drawn
    on a transparent layer), cut at the middle (its mask_round); else its grey (which the pipeline
    cuts at 0.5, as diffusers' mask processor does, where AUTOMATIC1111 keeps it soft)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        alpha = image.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.point(lambda v: 255 if v > 128 else 0)
    return image.convert("L")


def common(body: dict, model, size, random_seed, saved: dict | None = None) -> tuple[dict, list]:
    """What both take -> (Pipeline keywords, [(resize mode, size, what)] of the control images);
    `styles` named in the body are merged into the prompts from `saved`, in order."""
    for key, fine in NOT_OFFERED.items():
        if key in body and body[key] not in fine:
            raise InvalidRequest(f"{key} = {body[key]!r} asks for {WHY[key]}, which this server does not offer; "
                                 f"leave it out")
    scripts = body.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise InvalidRequest("alwayson_scripts must be an object of {script name: {\"args\": [...]}}")
    unknown = [k for k in scripts if k.lower() != "controlnet"]
    if unknown:
        raise InvalidRequest(f"always on script {unknown[0]!r} is not offered here (only \"controlnet\", for the "
                             "engine's own ControlNets)")
    settings = body.get("override_settings") or {}
    if not isinstance(settings, dict):
        raise InvalidRequest("override_settings must be an object of {setting: value}")
    batch, n_iter = integer(body, "batch_size", 1), integer(body, "n_iter", 1)
    if batch < 1 or n_iter < 1:
        raise InvalidRequest(f"batch_size and n_iter must be at least 1, got {batch} and {n_iter}")
    seed = integer(body, "seed", -1)
    options = {
        "prompt": text(body, "prompt"),
        "negative_prompt": text(body, "negative_prompt") or None,  # "" is AUTOMATIC1111's "none" (SDXL: zeros)
        "steps": integer(body, "steps", 50),
        "guidance": number(body, "cfg_scale", 7.0),
        "seed": random_seed() if seed == -1 else seed,
        "num_images": batch * n_iter,
        "sampler": sampler(body.get("sampler_name") or body.get("sampler_index") or "Euler", body.get("scheduler")),
        "prompt_weighting": True,  # AUTOMATIC1111's prompt syntax
        "clip_skip": clip_skip(settings, model),
    }
    names = body.get("styles") or []
    if names:
        if not saved:
            raise InvalidRequest(f"styles {names!r}: this server has no saved styles (start ldm-serve with "
                                 "--styles-file styles.csv)")
        options["prompt"], options["negative_prompt"] = styles.apply(names, saved, options["prompt"],
                                                                     options["negative_prompt"])
    options.update(variation(body, random_seed))
    # its 1.6+: the request's tiling, else its Tiling option (override_settings), else the engine's
    tiling = flag(body, "tiling", None)
    if tiling is None:
        tiling = flag(settings, "tiling", model.tiling)
    if tiling != model.tiling:  # the engine draws one way: no image other than asked for
        raise InvalidRequest("tiling: this engine does not tile; export one with ldm-export --tiling (and serve it)"
                             if tiling else "tiling: this engine tiles (exported with ldm-export --tiling); send "
                             "tiling true, or draw with an engine exported without it")
    for key in ("width", "height"):
        value = body.get(key)
        if value is not None:
            options[key] = integer(body, key, None)
        elif size is not None:
            options[key] = size[0 if key == "width" else 1]
    refiner = body.get("refiner_checkpoint")
    if refiner not in (None, "", "None", "none"):  # AUTOMATIC1111's "no refiner" values
        if not isinstance(refiner, str):
            raise InvalidRequest(f"refiner_checkpoint must be a checkpoint's title or name, got {refiner!r}")
        options["refiner"] = refiner  # an engine's title or name: the app finds it
        # none given: AUTOMATIC1111's API switches before the first step (the refiner draws it all)
        options["refiner_switch_at"] = number(body, "refiner_switch_at", 0.0)
    resizes = []
    if scripts:
        control, resizes = controlnet(next(iter(scripts.values())), model)  # a1111_controlnet.py
        options.update(control)
    return options, resizes


def variation(body: dict, random_seed) -> dict:
    """Its variation seed fields -> ours: subseed (-1: random) where subseed_strength is not 0,
    seed_resize_from_w / _h where both are above 0 (its rule)."""
    out = {}
    strength = number(body, "subseed_strength", 0.0)
    if not 0 <= strength <= 1:
        raise InvalidRequest(f"subseed_strength is from 0 to 1, got {strength}")
    if strength:
        subseed = integer(body, "subseed", -1)
        out.update(variation_strength=strength, variation_seed=random_seed() if subseed == -1 else subseed)
    w, h = integer(body, "seed_resize_from_w", -1), integer(body, "seed_resize_from_h", -1)
    if w > 0 and h > 0:
        if not (8 <= w <= 16384 and 8 <= h <= 16384):
            raise InvalidRequest(f"seed_resize_from_w and _h are from 8 to 16384 pixels, got {w} and {h}")
        out["seed_resize_from"] = (w, h)
    return out


def hires(body: dict, options: dict, upscalers=()) -> dict:
    """AUTOMATIC1111's hires fix fields -> ours; its default upscaler is "Latent"; hr_prompt,
    hr_negative_prompt ("": the first pass's) and hr_sampler_name ("Use same sampler")."""
    out = {}
    for key, option in (("hr_prompt", "hires_prompt"), ("hr_negative_prompt", "hires_negative_prompt")):
        given = text(body, key)
        if given:  # "": the first pass's, as there
            out[option] = given
    name, scheduler = body.get("hr_sampler_name"), body.get("hr_scheduler")
    name = None if name in ("", "Use same sampler") else name
    scheduler = None if scheduler in ("", "Use same scheduler") else scheduler
    if name is not None or scheduler is not None:  # each the first pass's where not given, as its 1.9+
        first = body.get("sampler_name") or body.get("sampler_index") or "Euler"
        chosen = sampler(name or first, scheduler if scheduler is not None else body.get("scheduler"))
        if chosen != options["sampler"]:
            out["hires_sampler"] = chosen
    scale = number(body, "hr_scale", 2.0)
    targets = {k: integer(body, k, 0) for k in ("hr_resize_x", "hr_resize_y")}
    if targets["hr_resize_x"] or targets["hr_resize_y"]:  # a size asked for: its scale, the same both ways
        w, h = options.get("width"), options.get("height")
        if not (w and h and w > 0 and h > 0):
            raise InvalidRequest(f"width and height must be positive numbers of pixels, got {w} and {h}")
        scales = {v / base for v, base in ((targets["hr_resize_x"], w), (targets["hr_resize_y"], h)) if v}
        if len(scales) != 1:
            raise InvalidRequest(f"hr_resize_x x hr_resize_y ({targets['hr_resize_x']}x{targets['hr_resize_y']}) "
                                 f"is not {w}x{h} enlarged evenly; the hires fix here keeps the aspect (use hr_scale)")
        scale = scales.pop()
    upscaler = body.get("hr_upscaler") or "Latent"
    name = upscaler_name(upscaler)
    if name not in UPSCALERS and name != "None" and upscaler not in upscalers:
        raise InvalidRequest(f"hr_upscaler {upscaler!r} is not offered; choose one of "
                             f"{', '.join((*UPSCALERS, *upscalers))}")
    return out | {"hires_scale": scale, "hires_steps": integer(body, "hr_second_pass_steps", 0),
            "hires_strength": number(body, "denoising_strength", 0.75),  # its txt2img default
            "hires_upscaler": UPSCALERS[0] if name == "None" else name}


def sampler(name, scheduler) -> str:
    """AUTOMATIC1111's sampler name (display name, alias, or with its schedule: "DPM++ 2M Karras")
    and scheduler -> our sampler, as its get_sampler_and_scheduler resolves them; an unknown
    name is refused (AUTOMATIC1111 would draw with DPM++ 2M instead)."""
    if not isinstance(name, str) or (scheduler is not None and not isinstance(scheduler, str)):
        raise InvalidRequest(f"sampler_name and scheduler must be text, got {name!r} and {scheduler!r}")
    if name.lower() in SAMPLERS:  # ours: as it is, or its display name with the scheduler given
        if scheduler in (None, "", "automatic", "Automatic"):
            return name.lower()
        name = base_name(DISPLAY_NAMES[name.lower()])
    name = ALIASES.get(name.lower(), name)
    label = "Automatic"  # none given: each sampler's own default, as AUTOMATIC1111 1.9+ takes it
    if scheduler:
        label = SCHEDULERS.get(scheduler.lower()) or next(
            (v for v in SCHEDULERS.values() if v.lower() == scheduler.lower()), None)
        if label is None:
            raise InvalidRequest(f"scheduler {scheduler!r} is not offered here; choose one of "
                                 f"{', '.join(SCHEDULERS)}")
    for suffix in sorted(SCHEDULERS.values(), key=len, reverse=True):  # "DPM++ 2M Karras": the schedule in the name
        # (longest first: "SGM Uniform" before "Uniform")
        if name.lower().endswith(" " + suffix.lower()) and label in ("Automatic", suffix):
            name, label = name[: -len(suffix) - 1], suffix
    automatic = label == "Automatic"
    if automatic:
        label = AUTOMATIC_SCHEDULES.get(name)
    full = f"{name} {label}" if label and label != "Uniform" else name
    ours = {display.lower(): key for key, display in DISPLAY_NAMES.items()}.get(full.lower())
    bases = {base_name(display) for display in DISPLAY_NAMES.values()}
    if ours is None and automatic and label and name in bases:
        raise InvalidRequest(f"{name}'s own schedule (scheduler \"automatic\") is {label}, which is not offered "
                             f"here; pass scheduler \"karras\", \"exponential\", \"beta\" or \"uniform\"")
    if ours is None and name in bases:  # a sampler of ours, not on that schedule: say which it walks
        walks = sorted({display[len(name):].strip() or "Uniform" for display in DISPLAY_NAMES.values()
                        if base_name(display) == name})
        offered = "only its own walk" if walks == ["Uniform"] else f"its schedules are {', '.join(walks)}"
        raise InvalidRequest(f"{name} is not offered with the {label} schedule here: {offered} (scheduler "
                             f"\"automatic\", or none, for its own)")
    if ours is None:
        raise InvalidRequest(f"sampler {full!r} is not offered here (GET /sdapi/v1/samplers lists those that are: "
                             f"{', '.join(sorted(set(DISPLAY_NAMES.values())))})")
    return ours


def base_name(display: str) -> str:
    """A display name without its schedule ("DPM++ 2M Karras" -> "DPM++ 2M")."""
    for label in SCHEDULE_LABELS:
        display = display.removesuffix(" " + label)
    return display


def beta_distribution(settings: dict, options: dict) -> None:
    """Refuses override_settings' beta_dist_alpha / beta_dist_beta other than ours (0.6) where a pass
    draws with the Beta schedule (elsewhere AUTOMATIC1111 does not read them either)."""
    if not beta_fields(options["sampler"], options.get("hires_sampler")):
        return
    for key, ours in zip(("beta_dist_alpha", "beta_dist_beta"), BETA_DISTRIBUTION):
        value = settings.get(key, ours)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != ours:
            raise InvalidRequest(f"override_settings.{key} is {value!r}: the Beta schedule here is Beta{BETA_DISTRIBUTION} "
                                 f"(AUTOMATIC1111's default, and diffusers'); leave it out, or send the number {ours}")


def clip_skip(settings: dict, model) -> int:
    """override_settings' CLIP_stop_at_last_layers (AUTOMATIC1111 counts the last layer as 1) -> the
    layers skipped; AUTOMATIC1111 does not apply it to SDXL, nor does this."""
    value = settings.get("CLIP_stop_at_last_layers", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"override_settings.CLIP_stop_at_last_layers must be a whole number from 1, got {value!r}")
    return 0 if model.pooled_width else value - 1


def mode_of(mode, what: str) -> int:
    """AUTOMATIC1111's resize mode (None: 0) -> 0 just resize, 1 crop and resize, 2 resize and fill,
    3 just resize (latent upscale); 1.0 taken as 1, as its API's int field takes it."""
    if mode is None:
        return 0
    if isinstance(mode, bool) or not isinstance(mode, (int, float)) or mode not in (0, 1, 2, 3):
        raise InvalidRequest(f"{what} must be 0 (just resize), 1 (crop and resize), 2 (resize and fill) or "
                             f"3 (just resize, latent upscale), got {mode!r}")
    return int(mode)


def fit_control(mode, image: Image.Image, size: tuple[int, int], what: str) -> Image.Image:
    """A control image for the size drawn (`size`: width, height) by its ControlNet unit's resize
    mode, as the ControlNet extension fits it: 0 just resize (the pipeline does); 1 crop and resize,
    scaled by k = max(w / width, h / height) to sides it rounds, the middle cut at floor((side -
    size) / 2) (its resampling, OpenCV's, is Lanczos here); 2 pads with the edges' median colour,
    not offered: refused where it would pad."""
    mode = mode_of(mode, what)
    w, h = size
    if mode in (0, 3) or w <= 0 or h <= 0 or abs(image.size[0] * h - image.size[1] * w) < max(w, h):
        return image  # (the aspect drawn, to a pixel: the pipeline resizes it)
    if mode == 2:
        raise InvalidRequest(f"{what} 2 (resize and fill) pads the {image.size[0]}x{image.size[1]} image to "
                             f"{w}x{h} with its edges' colour, which is not offered here; send it at that aspect, "
                             "or use 0 or 1")
    k = max(w / image.size[0], h / image.size[1])
    cover = (max(w, round(image.size[0] * k)), max(h, round(image.size[1] * k)))
    left, top = (cover[0] - w) // 2, (cover[1] - h) // 2
    return image.resize(cover, resample=Image.LANCZOS).crop((left, top, left + w, top + h))


def fit_controls(options: dict, resizes: list, size: tuple[int, int]) -> None:
    """The control images fitted by their units' resize modes (a1111_controlnet.py)."""
    for mode, slot, what in resizes:
        if isinstance(options["control_image"], list):
            options["control_image"][slot] = fit_control(mode, options["control_image"][slot], size, what)
        else:
            options["control_image"] = fit_control(mode, options["control_image"], size, what)


def mask_blur(body: dict) -> float:
    """mask_blur, or AUTOMATIC1111's separate x and y blurs (default 4), which must agree here."""
    if body.get("mask_blur") is not None:
        return number(body, "mask_blur", 4)
    x, y = number(body, "mask_blur_x", 4), number(body, "mask_blur_y", 4)
    if x != y:
        raise InvalidRequest(f"mask_blur_x {x} and mask_blur_y {y} differ; the blur here is the same both ways")
    return x
