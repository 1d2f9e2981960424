"""ComfyUI's samplers, schedulers and image-to-image cut of a walk, as AUTOMATIC1111's fields
(Sampler; Steps and Denoising strength) name them (see the package's docstring)."""

from __future__ import annotations

import math

from ldm_deploy.engine.comfyui.graph import describe

# ComfyUI's sampler names -> AUTOMATIC1111's (ours: infotext.sampler maps them on); "_gpu": the
# same sampler with its Brownian noise drawn on the GPU; its "ddim" is its Euler (with inpainting's
# random noise), so Euler here.
SAMPLERS = {"euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2",
            "dpm_2_ancestral": "DPM2 a", "dpmpp_2m": "DPM++ 2M", "dpmpp_sde": "DPM++ SDE",
            "dpmpp_sde_gpu": "DPM++ SDE", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2m_sde_gpu": "DPM++ 2M SDE",
            "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun_gpu": "DPM++ 2M SDE Heun",
            "dpmpp_3m_sde": "DPM++ 3M SDE", "dpmpp_3m_sde_gpu": "DPM++ 3M SDE", "ddim": "Euler", "ddpm": "DDPM",
            "uni_pc": "UniPC", "lcm": "LCM", "dpmpp_2s_ancestral": "DPM++ 2S a"}
# Its schedulers -> AUTOMATIC1111's schedule types. "normal": timesteps evenly spaced (ours' uniform);
# "simple": every (1000 / steps)-th timestep from the last, what our SGM Uniform (diffusers' trailing)
# takes; its "sgm_uniform" spaces them at fractions, near that.
SCHEDULES = {"normal": "Uniform", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
             "simple": "SGM Uniform", "beta": "Beta"}
# Samplers of one walk of their own here (diffusers' DDPM and LCM schedulers), whichever scheduler.
OWN_WALK = ("DDPM", "LCM")


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


def advanced_start(inputs: dict, steps: int | None) -> int | None:
    """KSamplerAdvanced's start_at_step where it draws from there to its walk's end with noise
    added (end_at_step at or past `steps`: its default 10000 is past any); None for another part.
    steps: None where not read (then only the default end is the end)."""
    start, end = inputs.get("start_at_step", 0), inputs.get("end_at_step", 10000)
    if inputs.get("add_noise", "enable") != "enable" or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
        return None
    return start if 0 <= start < (steps or 10000) <= end else None


def walk_cut(inputs: dict, advanced: bool, steps: int | None, warnings: list) -> tuple:
    """(Steps, Denoising strength) of diffusers' img2img that draws the steps ComfyUI's image-to-image
    sampler draws (the module's docstring); (steps, None) with a warning where its cut is not read."""
    if steps is None:  # (warned about: ldm-run's --steps and --strength)
        return None, None
    if advanced:
        start = advanced_start(inputs, steps)
        if start is None:
            warnings.append("its KSamplerAdvanced draws a part of a walk (start_at_step / end_at_step / add_noise) "
                            "not read here: --strength (default 0.8) sets how much of the image is redrawn")
            return steps, None
        total, drawn = steps, steps - start
    else:
        denoise = inputs.get("denoise", 1.0)
        if isinstance(denoise, bool) or not isinstance(denoise, (int, float)) or not 0 < denoise <= 1:
            warnings.append(f"its denoise is {describe(denoise)}, not read: --strength (default 0.8) sets how much "
                            "of the image is redrawn")
            return steps, None
        if not steps / denoise < 1001:  # (also inf)
            warnings.append(f"its denoise {denoise} draws {steps} steps of a walk of {steps / denoise:.0f}, more than "
                            "a model's 1000 timesteps: not read (--steps and --strength give the walk)")
            return steps, None
        total = int(steps / denoise)
        drawn = min(steps, total)
    # the strength whose int(total x strength) is `drawn`: drawn / total, rounded up to 4 places
    # (a field a reader takes in; under 10000 steps the rounding up adds less than a step)
    strength = math.ceil(drawn / total * 10000) / 10000
    if int(total * strength) < drawn:  # (drawn / total exactly, which float multiplication can round down)
        strength += 1e-4
    return total, round(strength, 4)
