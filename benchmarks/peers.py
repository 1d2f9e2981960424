"""diffusers' StableDiffusionPipeline as a contender, on the same weights as our engine.

Eager: fp32 on the CPU; fp16 with SDPA attention (diffusers' default processor) on CUDA.
Compiled: the same, with `torch.compile(pipe.unet, mode=...)` on a channels-last U-Net, as
diffusers' own speed-up guide does. On CUDA every component under test is first compared with
a float32 reference (TF32 off) on the same inputs; timing starts only after that.
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path

from benchmarks.recorder import Recorder
from ldm_deploy.engine.manifest import read_manifest
from ldm_deploy.export.source import is_xl_folder

log = logging.getLogger(__name__)

# Our sampler name -> the diffusers scheduler of the same name (the tests' oracle too: tests/conftest.py).
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "heun_karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "unipc_karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_exponential": ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True}),
    "dpmpp_2m_sde_exponential": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                 "use_exponential_sigmas": True}),
    "dpmpp_2m_sde_heun": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
    "dpmpp_2m_sde_heun_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                 "solver_type": "heun", "use_karras_sigmas": True}),
    "dpmpp_2m_sde_heun_exponential": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                      "solver_type": "heun",
                                                                      "use_exponential_sigmas": True}),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "dpmpp_3m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                                                            "use_karras_sigmas": True}),
    "dpmpp_3m_sde_exponential": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                 "solver_order": 3, "use_exponential_sigmas": True}),
    "euler_exponential": ("EulerDiscreteScheduler", {"use_exponential_sigmas": True}),
    "heun_exponential": ("HeunDiscreteScheduler", {"use_exponential_sigmas": True}),
    "unipc_exponential": ("UniPCMultistepScheduler", {"use_exponential_sigmas": True}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2_exponential": ("KDPM2DiscreteScheduler", {"use_exponential_sigmas": True}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm2_a_karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2_a_exponential": ("KDPM2AncestralDiscreteScheduler", {"use_exponential_sigmas": True}),
    # (ours seeds its Brownian tree with the image's seed, as diffusers' noise_sampler_seed would; timed
    # here with diffusers' own random one, which on a GPU torchsde draws there)
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "dpmpp_sde_exponential": ("DPMSolverSDEScheduler", {"use_exponential_sigmas": True}),
}
SCHEDULERS.update({f"{name}_sgm_uniform": (SCHEDULERS[name][0], {**SCHEDULERS[name][1], "timestep_spacing": "trailing"})
                   for name in ("euler", "euler_a", "heun", "dpm2", "dpm2_a", "dpmpp_2m", "dpmpp_2m_sde",
                                "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "dpmpp_sde", "unipc")})
SCHEDULERS.update({f"{name}_beta": (SCHEDULERS[name][0], {**SCHEDULERS[name][1], "use_beta_sigmas": True})
                   for name in ("euler", "heun", "dpm2", "dpm2_a", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun",
                                "dpmpp_3m_sde", "dpmpp_sde", "unipc")})
# The Align Your Steps ones: their sampler's scheduler walking given timesteps (`aligned`).
SCHEDULERS.update({f"{name}_ays": SCHEDULERS[name]
                   for name in ("euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")})
# A step's keywords a sampler needs beyond its scheduler's config (`stepped`): TCD's gamma, which
# diffusers' pipelines pass to its step as `eta=` (their default, 0.0, would be TCD's deterministic
# form; 0.3 is its step's own default and what its docs draw with).
STEP_OPTIONS = {"tcd": {"eta": 0.3}}
# ||out - ref|| / ||ref|| above which a reduced-precision component is flagged (fp16 lands near 1e-3).
CHECK_TOLERANCE = 2e-2


def from_index_zero(cls):
    """A diffusers scheduler class that begins its walk at index 0, as diffusers' SDXL pipelines set
    it and its SD ones do not: Beta's first two timesteps on the multistep schedulers are equal from
    32 steps on (998, 998), and their lookup of the first step then picks the second, so the walk
    runs off its end (IndexError)."""
    class FromZero(cls):
        def set_timesteps(self, *args, **kwargs):
            super().set_timesteps(*args, **kwargs)
            self.set_begin_index(0)

    FromZero.__name__ = FromZero.__qualname__ = cls.__name__
    return FromZero


def stepped(cls, options: dict):
    """A diffusers scheduler class whose step takes `options` (STEP_OPTIONS) whatever the pipeline
    passes, as `pipe(..., eta=0.3)` would pass TCD's: so that every pipeline call, and a step
    called alone, draws with them."""
    class Stepped(cls):
        def step(self, *args, **kwargs):
            return super().step(*args, **{**kwargs, **options})

    # (pipelines pass a step `generator` and `eta` only where its signature names them)
    Stepped.step.__signature__ = inspect.signature(cls.step)
    Stepped.__name__ = Stepped.__qualname__ = cls.__name__
    return Stepped


def aligned(cls, family: str):
    """A diffusers scheduler class that walks Align Your Steps' timesteps for `family` at any
    step count, as `pipe(..., timesteps=ays_timesteps(...))` sets them (at 10 steps diffusers'
    AysSchedules)."""
    from dataclasses import replace

    from ldm_deploy.engine.samplers import NoiseSchedule
    from ldm_deploy.engine.samplers.ays import ays_timesteps

    class Aligned(cls):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            schedule = replace(NoiseSchedule.from_config(self.config), family=family)
            timesteps = [int(t) for t in ays_timesteps(schedule, num_inference_steps)]
            super().set_timesteps(device=device, timesteps=timesteps)
            self.set_begin_index(0)

    Aligned.__name__ = Aligned.__qualname__ = cls.__name__
    return Aligned


def run(spec: dict) -> dict:
    """Measure diffusers per `spec` (see `bench.contender_spec`); returns the raw samples."""
    import diffusers
    import torch
    import transformers

    cuda = spec["device"] == "cuda"
    if cuda:  # the fp32 reference must be true fp32; the fp16 runs do not use TF32 anyway
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    elif spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.set_grad_enabled(False)
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    dtype = torch.float16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    start = time.perf_counter()
    if is_xl_folder(Path(spec["model"])):  # fp16: its VAE runs in fp32 where its config says so (force_upcast)
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(spec["model"], torch_dtype=dtype,
                                                                add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            spec["model"], torch_dtype=dtype, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    if spec.get("engine") and read_manifest(Path(spec["engine"])).model.tiling:
        from ldm_deploy.export.tiling import make_seamless

        make_seamless(pipe.unet, pipe.vae)  # like for like with a tiling engine (ldm-export --tiling)
    pipe = pipe.to(spec["device"])
    sync()
    load_s = time.perf_counter() - start
    cls_name, options = SCHEDULERS[spec["sampler"]]
    cls = getattr(diffusers, cls_name)
    if spec["sampler"].endswith("_beta"):
        cls = from_index_zero(cls)
    elif spec["sampler"].endswith("_ays"):
        cls = aligned(cls, "sdxl" if is_xl_folder(Path(spec["model"])) else "sd1")
    if spec["sampler"] in STEP_OPTIONS:
        cls = stepped(cls, STEP_OPTIONS[spec["sampler"]])
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **options)
    pipe.set_progress_bar_config(disable=True)
    processor = type(next(iter(pipe.unet.attn_processors.values()))).__name__

    inputs = step_inputs(pipe, spec)
    refs = fp32_references(spec["model"], inputs) if cuda else None
    mode, compile_s = spec.get("compile"), None
    if mode:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode=mode)
        log.info("compile: torch.compile(unet, mode=%r), compiling on the first call", mode)
        start = time.perf_counter()
        unet_call(pipe.unet, inputs)
        sync()
        compile_s = time.perf_counter() - start
        log.info("compile: first call took %.1f s", compile_s)
    checks = compare(pipe, inputs, refs) if refs else {}
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    rec = Recorder(sync=sync)
    pipe.encode_prompt = rec.wrap(pipe.encode_prompt, "text", sync=True)
    pipe.vae.decode = rec.wrap(pipe.vae.decode, "vae_decode", sync=True)
    in_loop = not cuda and not mode  # per-step host timing is exact only on the CPU, eager
    if in_loop:
        pipe.unet.forward = rec.wrap(pipe.unet.forward, "unet_step")
    runs, steps = timed_calls(pipe, spec, rec, torch)
    if not in_loop:
        steps = isolated_steps(pipe.unet, inputs, spec, torch)
    device_peak = torch.cuda.max_memory_allocated() if cuda else None  # before the ceiling's matrices
    out = {
        "label": label(spec, cuda),
        "load_s": load_s,
        "runs": runs,
        "unet_step": steps,
        "unet_step_how": "U-Net forward per step, inside the loop" if in_loop else
                         ("isolated U-Net + CFG combine, CUDA events over 10 back-to-back steps" if cuda
                          else "isolated U-Net + CFG combine"),
        "checks": checks,
        "unet_flops_per_step": unet_flops(pipe, inputs, torch),
        "ceiling": matmul_ceiling(spec["device"], dtype, torch),
        "notes": [f"attention processor: {processor}", f"scheduler: {cls_name} {options or ''}".strip()],
    }
    if compile_s is not None:
        from torch._dynamo.utils import counters

        out["compile_s"] = compile_s
        out["notes"].append(f"torch.compile mode={mode!r}: first call (compile) {compile_s:.1f} s; "
                            f"graphs compiled in all: {counters['stats']['unique_graphs']}")
    if cuda:
        out["device_peak_bytes"] = device_peak
        out["device_name"] = torch.cuda.get_device_name()
    return out


def label(spec: dict, cuda: bool) -> str:
    base = "diffusers fp16+SDPA" if cuda else "diffusers fp32"
    return f"{base} + torch.compile({spec['compile']})" if spec.get("compile") else f"{base} eager"


def timed_calls(pipe, spec: dict, rec: Recorder, torch) -> tuple[list[dict], list[float]]:
    """Warm-up calls, then `repeats` timed calls; each call's stage times from its events."""
    kwargs = dict(
        prompt=spec["prompt"], negative_prompt=spec["negative_prompt"], guidance_scale=spec["guidance"],
        height=spec["height"], width=spec["width"], num_images_per_prompt=spec["batch"], output_type="pil",
    )
    for i in range(spec["warmup"]):
        log.info("diffusers: warm-up %d/%d (%d steps)", i + 1, spec["warmup"], spec["warmup_steps"])
        pipe(num_inference_steps=spec["warmup_steps"], **kwargs)
    runs, steps = [], []
    for i in range(spec["repeats"]):
        rec.clear()
        generator = torch.Generator(spec["device"]).manual_seed(spec["seed"])
        start = time.perf_counter()
        pipe(num_inference_steps=spec["steps"], generator=generator, **kwargs)  # ends in a host copy
        end_to_end = time.perf_counter() - start
        runs.append({
            "end_to_end": end_to_end,
            "text": rec.total("text"),
            "loop": rec.gap("text", "vae_decode"),
            "vae_decode": rec.total("vae_decode"),
        })
        steps += rec.durations("unet_step")
        log.info("diffusers: run %d/%d: %.2f s", i + 1, spec["repeats"], end_to_end)
    return runs, steps


def unet_call(unet, inputs: dict):
    """The U-Net called exactly as the pipeline calls it (same arguments, same timestep dtype),
    so that a compiled U-Net meets the same guards here as in the loop: no recompilation."""
    return unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["emb"], timestep_cond=None,
                cross_attention_kwargs=None, added_cond_kwargs=inputs.get("added"), return_dict=False)[0]


def step_inputs(pipe, spec: dict) -> dict:
    """Seeded, non-degenerate inputs at the benchmark's shapes: token ids (K, 77) of the
    [negative,] positive prompt, latents x (K*B, 4, h, w) for one mid-schedule step and their text
    embeddings (K*B, 77, D), K = 2 with guidance (CFG) else 1; final latents z (B, 4, h, w) for
    the decoder. SDXL: the embeddings of both text encoders, as its pipeline makes them, and the
    U-Net's added conditioning (pooled text (K*B, P), sizes (K*B, 6))."""
    import torch

    device, dtype = pipe.device, pipe.unet.dtype
    g = torch.Generator().manual_seed(spec["seed"])
    b, h, w = spec["batch"], spec["height"] // 8, spec["width"] // 8
    texts = [spec["negative_prompt"], spec["prompt"]] if spec["guidance"] > 1 else [spec["prompt"]]
    ids = pipe.tokenizer(texts, padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    emb = pipe.text_encoder(ids.to(device))[0].repeat_interleave(b, dim=0)
    added = None
    if hasattr(pipe, "text_encoder_2"):
        guided = spec["guidance"] > 1
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(spec["prompt"], device=device, num_images_per_prompt=b,
                                                          do_classifier_free_guidance=guided,
                                                          negative_prompt=spec["negative_prompt"])
        emb, pooled = (torch.cat([neg, emb]), torch.cat([neg_pooled, pooled])) if guided else (emb, pooled)
        sizes = torch.tensor([[spec["height"], spec["width"], 0, 0, spec["height"], spec["width"]]], dtype=emb.dtype)
        added = {"text_embeds": pooled, "time_ids": sizes.repeat(len(emb), 1).to(device)}
    x = torch.randn((len(texts) * b, pipe.unet.config.in_channels, h, w), generator=g)
    z = torch.randn((b, pipe.unet.config.in_channels, h, w), generator=g) / pipe.vae.config.scaling_factor
    pipe.scheduler.set_timesteps(spec["steps"], device=device)
    t = pipe.scheduler.timesteps[len(pipe.scheduler.timesteps) // 2]  # a mid step, as the loop's dtype
    return {"ids": ids.to(device), "x": x.to(device, dtype), "t": t, "emb": emb, "added": added,
            "z": z.to(device, dtype), "guidance": spec["guidance"]}


def fp32_references(model: str, inputs: dict) -> dict:
    """The three components' outputs in float32 (TF32 off), each model loaded, run, freed."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    device = inputs["x"].device
    refs = {}
    text = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").to(device)
    refs["text_encoder"] = text(inputs["ids"])[0].float()
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device)
    added = inputs["added"] and {k: v.float() for k, v in inputs["added"].items()}
    refs["unet"] = unet_call(unet, inputs | {"x": inputs["x"].float(), "emb": inputs["emb"].float(), "added": added})
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(device)
    refs["vae_decode"] = vae.decode(inputs["z"].float()).sample
    del text, unet, vae
    torch.cuda.empty_cache()
    return refs


def compare(pipe, inputs: dict, refs: dict) -> dict:
    """Relative L2 error of each component under test against its float32 reference."""
    import torch

    vae, z = pipe.vae, inputs["z"]
    upcast = hasattr(pipe, "text_encoder_2") and vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:  # as SDXL's pipeline decodes: its __call__ runs such a VAE in fp32, then casts it back
        vae.to(torch.float32)
    try:
        outs = {
            "text_encoder": pipe.text_encoder(inputs["ids"])[0],
            "unet": unet_call(pipe.unet, inputs),
            "vae_decode": vae.decode(z.to(vae.dtype)).sample,
        }
    finally:
        if upcast:
            vae.to(torch.float16)
    checks = {}
    for name, out in outs.items():
        ref, out = refs[name], out.float()
        finite = bool(out.isfinite().all())
        rel = float((out - ref).norm() / ref.norm()) if finite else float("nan")
        checks[name] = {"rel_err": rel, "finite": finite, "ok": finite and rel < CHECK_TOLERANCE,
                        "ref_abs_max": float(ref.abs().max())}
        log.info("check %s: rel err %.2e vs fp32%s", name, rel, "" if checks[name]["ok"] else "  <-- FAILED")
    return checks


def isolated_steps(unet, inputs: dict, spec: dict, torch) -> list[float]:
    """Seconds per U-Net step with the CFG combine: on CUDA, events around 10 back-to-back
    steps, 5 times, after 3 warm-up steps; on the CPU, one step per sample."""
    x, g = inputs["x"], inputs["guidance"]

    def step():
        out = unet_call(unet, inputs)
        if g <= 1:
            return out
        uncond, cond = out.chunk(2)
        return uncond + g * (cond - uncond)

    if x.device.type != "cuda":
        step()
        samples = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            step()
            samples.append(time.perf_counter() - start)
        return samples
    inner, samples = 10, []
    for _ in range(3):
        step()
    for _ in range(5):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(inner):
            step()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end) / 1e3 / inner)
    return samples


def unet_flops(pipe, inputs: dict, torch) -> float | None:
    """FLOPs of one U-Net call at the benchmark's shapes, counted on the meta device (no compute)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(pipe.unet.config)
            meta = {"x": torch.empty(inputs["x"].shape), "emb": torch.empty(inputs["emb"].shape),
                    "t": torch.tensor(500),
                    "added": inputs["added"] and {k: torch.empty(v.shape) for k, v in inputs["added"].items()}}
            with FlopCounterMode(display=False) as counter:
                unet_call(unet, meta)
        return float(counter.get_total_flops())
    except Exception as e:  # a count is a nicety; never lose the timings over it
        log.warning("could not count U-Net FLOPs on the meta device: %s", e)
        return None


def matmul_ceiling(device: str, dtype, torch) -> dict:
    """The dense matrix-product rate on this device, dtype and thread count: the utilisation
    estimate's denominator, measured in the same run (n^3 multiply-adds = 2 n^3 FLOPs)."""
    cuda = device == "cuda"
    n = 8192 if cuda else 2048
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn((n, n), generator=g, device=device, dtype=dtype)
    b = torch.randn((n, n), generator=g, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    samples = []
    for _ in range(10 if cuda else 3):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            a @ b
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            a @ b
            samples.append(time.perf_counter() - start)
    samples.sort()
    return {"flops_per_s": 2 * n**3 / samples[len(samples) // 2],
            "how": f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')} matmul, median of {len(samples)}"}
