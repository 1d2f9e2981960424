"""The runtime pipeline: prompts (and an init image) in, images out, on any backend.

tokenize -> text encoder -> sampler table (host) -> N x unet_step -> VAE decoder -> images
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np

from ldm_deploy.engine import backends, hires, images, noise
from ldm_deploy.engine import controls, infotext, inpaint, progress as progress_, refine, text, vae, vae_tiling
from ldm_deploy.engine import diffusers_names as diffusers_names_
from ldm_deploy.engine import mask_crop as mask_crop_
from ldm_deploy.engine.backends import Run
from ldm_deploy.engine.manifest import TOKENIZER, check_unchanged, file_stats, read_manifest, verify_files
from ldm_deploy.engine.request import (Request, check_history, check_init_size, check_request, check_size,
                                       noise_multiplier_of, plain_inputs, split, whole)
from ldm_deploy.engine.samplers import plan
from ldm_deploy.engine.samplers.update import C_PP
from ldm_deploy.engine.tokenizer import PromptTokenizer
from ldm_deploy.errors import InvalidRequest

log = logging.getLogger(__name__)


class Pipeline:
    """An engine directory loaded on a backend. Call it to generate images.

    >>> pipe = Pipeline.load("engines/sd15")
    >>> images = pipe("a photo of an astronaut", steps=30, seed=7)
    """

    def __init__(self, engine_dir: Path, manifest, backend):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.backend = backend
        self.specs = manifest.specs()
        self.tokenizer = PromptTokenizer(self.engine_dir / TOKENIZER, manifest.model.text_length,
                                         manifest.model.embeddings)
        # vae_encoder is loaded on the first img2img call: txt2img never needs it.
        self.components = {
            name: backend.load(self.engine_dir, manifest, name)
            for name in ("text_encoder", "unet_step", "vae_decoder")
        }
        # TensorRT's --rebuild-stale rebuilt every plan (and the manifest) as the first loaded: the
        # encoder's, loaded later, must be those files (manifest.check_unchanged)
        self.manifest = getattr(backend, "checked", {}).get(self.engine_dir, manifest)
        self.file_stats = file_stats(self.engine_dir, self.manifest)
        self.warned = set()  # advice given once per pipeline, not on every call of a loop
        self.upscalers = {}  # the hires fix's upscale models, loaded on first use (hires.upscale_model)
        self.vae_tile = None  # latent px of the decoder's tiles (enable_vae_tiling); None: one run a batch

    @classmethod
    def load(cls, engine_dir: str | Path, backend: str = "auto", verify: bool = True, rebuild_stale: bool = False,
             **backend_options) -> "Pipeline":
        """Load an engine directory. `backend` "auto" takes the one it was built for (a TensorRT
        engine runs its ONNX graphs on ONNX Runtime where TensorRT or a GPU is missing).
        `verify` checks every file's size and SHA-256 against the manifest first.
        `rebuild_stale` (TensorRT): rebuild plans made for another GPU or TensorRT version from
        the ONNX graphs in the engine directory instead of refusing them."""
        manifest = read_manifest(Path(engine_dir))
        name = backends.auto(manifest) if backend == "auto" else backend
        backends.check_compatible(name, manifest)  # before hashing gigabytes
        verify_files(Path(engine_dir), manifest, hashes=verify)
        if name == "tensorrt":
            backend_options["rebuild_stale"] = rebuild_stale
        return cls(engine_dir, manifest, backends.create(name, **backend_options))

    from_pretrained = load  # (diffusers' name for it; an engine directory, not a model, is what it takes)

    def to(self, *args, **kwargs) -> "Pipeline":
        """diffusers' .to(device or dtype), taken and ignored: an engine runs on the backend and in the
        precision it was exported for (ldm-export --backend / --precision)."""
        if "to" not in self.warned:
            self.warned.add("to")
            log.info(".to(...) changes nothing here: this engine runs on %s as exported", self.backend.name)
        return self

    def enable_vae_tiling(self, tile_size: int | None = None) -> None:
        """Run the VAE on overlapping tiles from now on, as diffusers' `pipe.enable_vae_tiling()`
        (engine/vae_tiling.py): its images (to float rounding, where the decoder's output is
        within range), with the VAE's memory that of one tile. tile_size: the tile's side in
        pixels (a multiple of 32; default the VAE's, as diffusers': 512 for SD 1.x, 768 for
        SD 2.x, 1024 for SDXL); images no larger than one tile are run whole."""
        m = self.manifest.model
        self.vae_tile = vae_tiling.tile_of(tile_size, m, self.manifest.size_multiple)
        if tile_size is None and not m.vae_tile:
            log.warning("this engine was exported before its VAE's own tile size was recorded: VAE tiles of %d px "
                        "(the U-Net's size), which diffusers takes unless the VAE's config says otherwise; "
                        "re-export it (ldm-export --force) for the VAE's", self.vae_tile * m.vae_scale)

    def disable_vae_tiling(self) -> None:
        self.vae_tile = None

    @property
    def default_size(self) -> tuple[int, int]:
        d = self.manifest.dims
        s = self.manifest.model.vae_scale
        return d["latent_width"].opt * s, d["latent_height"].opt * s

    @diffusers_names_.returns
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        steps: int = 30,
        guidance: float = 7.5,
        seed: int | list[int] | None = None,
        variation_seed: int | list[int] | None = None,
        variation_strength: float = 0.0,
        seed_resize_from: tuple[int, int] | None = None,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        sampler: str = "dpmpp_2m_karras",
        init_image=None,
        mask=None,
        mask_crop: int | None = None,
        mask_blur: float | None = None,
        masked_content: str = "original",
        resize_mode: str | int = "just-resize",
        control_image=None,
        control_scale: float | list | None = None,
        control_start: float | list = 0.0,
        control_end: float | list = 1.0,
        strength: float | None = None,
        noise_multiplier: float = 1.0,
        clip_skip: int | None = None,
        prompt_weighting: bool = False,
        hires_scale: float | None = None,
        hires_steps: int | None = None,
        hires_strength: float | None = None,
        hires_upscaler: str | None = None,
        hires_prompt: str | None = None,
        hires_negative_prompt: str | None = None,
        hires_sampler: str | None = None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        refiner: "Pipeline | None" = None,
        refiner_switch_at: float | None = None,
        latents: np.ndarray | None = None,
        generator=None,
        output_type: str = "pil",
        progress=True,
        _hires_pass: tuple[int, int] | None = None,
        _first_step: int | None = None,
        **diffusers_names,
    ):
        """Generate images. Returns a list of PIL images (also its `.images`, as diffusers'; with
        return_dict=False diffusers' (images, None)), or for output_type="np" a
        (B, H, W, 3) float32 array in [0, 1], or for "latent" the (B, C, H/8, W/8) final latents
        (undecoded), as diffusers does.

        init_image (a path, a PIL image or an array) switches to img2img with `strength` (default 0.8);
        noise_multiplier scales the noise added to the image (AUTOMATIC1111's "Noise multiplier for
        img2img", e.g. 1.05; txt2img ignores it, as there).
        mask (a path, a PIL image or an (H, W) array; white: redraw, black: keep) inpaints the init
        image, as diffusers' StableDiffusionInpaintPipeline does (strength then defaults to 1.0):
        an inpainting model takes the mask and the masked image at every step; any other model
        has the kept part put back at each step's noise level. An inpainting model given no mask
        redraws the whole image (txt2img: from a blank one), as AUTOMATIC1111 runs them.
        mask_crop (pixels, e.g. 32): inpaint only the masked area (AUTOMATIC1111's "Only masked",
        diffusers' padding_mask_crop): the box around the mask, widened by that much and to the
        aspect of width x height (default: the engine's size), is drawn at width x height and pasted
        back over the image through the mask (mask_crop.py); the images are the init image's size.
        mask_blur (pixels): blur the mask first (AUTOMATIC1111's "Mask blur", diffusers'
        mask_processor.blur), which softens the paste of mask_crop.
        masked_content: AUTOMATIC1111's "Masked content": "original" (the image there, noised, as
        diffusers inpaints), "fill" (the hole first painted with the blurred colours around it,
        at the size drawn, inpaint.fill), "latent noise" (the image's latents there replaced by
        each image's seed noise) or "latent nothing" (by zeros), as AUTOMATIC1111 does
        (inpaint.latent_fill); the last two tell below strength 1.
        resize_mode: how an init image (and its mask) of another aspect than width x height is
        fitted, AUTOMATIC1111's "Resize mode" (resize_mode.py): "just-resize" (stretched, as
        diffusers does; the default), "crop-and-resize" (its middle), "resize-and-fill" (its edges
        stretched into the bands), or its numbers 0-3. Not with mask_crop, which cuts the picture.
        control_image: for an engine with ControlNets (ldm-export --controlnet), each one's image
        (one image, or a list of one per ControlNet, None where it is off), resized to the size
        drawn, which it sets when there is no init image; control_scale (its residuals' weight;
        default as diffusers' ControlNet pipelines: 1.0, img2img 0.8, with a mask 0.5),
        control_start / control_end (the part of the steps it acts in), a number or a list of one
        per ControlNet, as diffusers' ControlNet pipelines take them.
        clip_skip: text encoder layers skipped, as diffusers counts them (1: the penultimate
        layer's output, AUTOMATIC1111's "Clip skip: 2"; SDXL: 0 is already the penultimate's), for the prompt and the negative prompt
        alike, as AUTOMATIC1111 and ComfyUI do (diffusers' StableDiffusionPipeline skips them
        for the prompt only).
        hires_scale: AUTOMATIC1111's hires fix (hires.py): draw at width x height, enlarge each side
        hires_scale times, and redraw as img2img with hires_strength (default 0.7) in exactly
        hires_steps steps (default, or 0: steps), with hires_prompt, hires_negative_prompt and
        hires_sampler where given (AUTOMATIC1111's "Hires prompt", ...; None: the first pass's).
        `latents` are the first pass's.
        Prompts longer than 75 tokens are encoded in chunks of 75, as AUTOMATIC1111 does
        (tokenizer.py), up to the engine's `ldm-export --max-prompt-tokens`.
        prompt_weighting: read AUTOMATIC1111's emphasis, "(word)", "[word]", "(word:1.3)", BREAK,
        and prompt editing, "[from:to:when]", "[a|b]" (prompt_schedule.py), in the prompt and the
        negative prompt (off: brackets are plain text, as diffusers reads them).
        latents: the initial unit-variance noise (B, C, H/8, W/8), as diffusers' `latents` (for
        img2img: the noise added to the encoded image). init_image may also be latents, a
        (1, C, H/8, W/8) float array as diffusers' img2img takes them (output_type="latent" gives
        them): img2img then skips the VAE encoder. generator: overrides `seed`; a
        torch.Generator (the same noise, so the same image, as diffusers given that generator),
        any object with `standard_normal(shape)`, or a list of one per image (see `noise.py`).
        seed: image i gets seed + i (None or -1: a random one), or a list of one seed per image.
        The DPM++ SDE samplers draw their step noise from a Brownian tree seeded by each image's
        seed, not from the generator: give seed with a generator or latents for a repeatable image.
        variation_strength (0 to 1) and variation_seed: AUTOMATIC1111's "Variation seed", each
        image's start noise slerped that far toward its variation seed's (image i: variation_seed
        + i; None or -1: a random one), all images of one seed, as AUTOMATIC1111 draws a batch of
        variations. seed_resize_from (width, height): its "Resize seed from": each seed's noise
        drawn at that size and pasted into the middle, so that a seed keeps its composition at
        another size (noise.vary).
        aesthetic_score / negative_aesthetic_score: an SDXL refiner engine's aesthetic conditioning
        of the prompt and of the negative prompt (diffusers' defaults: 6.0 and 2.5).
        denoising_end / denoising_start (fractions in (0, 1)): SDXL's "ensemble of expert
        denoisers", as diffusers' SDXL pipelines take them: denoising_end stops the walk where the
        timestep falls below round(1000 * (1 - denoising_end)) (with output_type="latent": hand
        those latents on); denoising_start runs the rest of it from init_image (those latents, or
        an image, encoded and not noised; strength is then ignored).
        refiner: another Pipeline (an SDXL refiner engine) to finish each image, AUTOMATIC1111's
        "Refiner": this engine draws until refiner_switch_at (default 0.8) of the walk, the refiner
        the rest, with the same prompts, seeds and settings (refine.py). Not with masks, the hires
        fix or ControlNets.
        progress: True shows progress bars; a function is called with (steps done, steps) after
        each step of each pass instead, and with the same counts again after each tile of a tiled
        VAE or upscale model run ((0, steps) before a pass's first step): raising there stops the
        call (ldm-serve's progress, progress.py).
        diffusers' names are taken too: num_inference_steps, guidance_scale,
        num_images_per_prompt, image, mask_image, padding_mask_crop, controlnet_conditioning_scale,
        control_guidance_start, control_guidance_end. (_hires_pass: internal, (first pass steps, hires steps)
        when this call is the hires fix's second pass; _first_step: a refiner's, the steps the base
        drew, which prompt editing counts on from.)
        """
        steps, guidance, num_images, init_image, mask, mask_crop, control_scale, control_start, control_end = \
            diffusers_names_.take(dict(steps=steps, guidance=guidance, num_images=num_images, init_image=init_image,
                                       mask=mask, mask_crop=mask_crop, control_scale=control_scale,
                                       control_start=control_start, control_end=control_end), diffusers_names,
                                  type(self).__call__)
        prompts, negs, steps, guidance, width, height, latents = plain_inputs(
            prompt, negative_prompt, steps, guidance, num_images, width, height, latents, output_type, progress)
        progress = progress_.reporting(progress)
        # SDXL base: no negative prompt at all is zero embeddings (diffusers' force_zeros_for_empty_prompt)
        zero_negative = negative_prompt is None and self.manifest.model.zero_negative
        check_size(self.manifest, width, height)  # before anything is drawn or cut at that size
        # (crop: mask_crop's (pad, box, the original image, the original mask), or None)
        init, mask, crop, width, height = inpaint.prepare(self, init_image, mask, mask_blur, resize_mode, mask_crop,
                                                          width, height, hires_scale, output_type)
        if strength is None:
            strength = 1.0 if mask is not None else 0.8  # diffusers' inpainting and img2img defaults
        settings_given = control_scale is not None or control_start != 0.0 or control_end != 1.0
        if control_scale is None:  # diffusers' SDXL ControlNet inpainting pipeline's is 1.0
            xl_mask = mask is not None and self.manifest.model.pooled_width
            control_scale = 0.5 if mask is not None and not xl_mask else 0.8 if init is not None and not xl_mask else 1.0
        control = controls.Control.of(control_image, control_scale, control_start, control_end,
                                      len(self.manifest.model.controlnets), settings_given)
        if crop is not None and control.pictures:  # the control images cut to the box, as the image
            control = control.cropped(crop[1], crop[2].size, width, height)
        if init is not None:
            default_w, default_h = images.init_image_size(init, self.manifest.model.vae_scale)
            check_init_size(self.manifest, init, width, height)
        elif control.first_image is not None:  # as diffusers' ControlNet pipelines: the control image's size
            default_w, default_h = images.init_image_size(control.first_image, self.manifest.model.vae_scale)
            check_init_size(self.manifest, control.first_image, width, height, "control image")
        else:
            default_w, default_h = self.default_size
        width, height = default_w if width is None else width, default_h if height is None else height
        init = inpaint.masked_content(masked_content, init, mask, width, height, strength, self.warned)
        n = len(prompts) * num_images
        m = self.manifest.model
        if isinstance(init, images.InitLatents) and init.array.shape[0] not in (1, n):
            raise InvalidRequest(f"init latents hold {init.array.shape[0]} images; give one, or one per image ({n})")
        if isinstance(init, images.InitLatents) and len(init.array) > 1 and (m.inpainting or mask is not None):
            raise InvalidRequest("inpainting starts every image from one image's latents: give one (1, C, h, w)")
        seeds, variation = noise.variation(seed, variation_seed, variation_strength, seed_resize_from, n,
                                           generator, latents)
        noise.warn_unseeded_trees((sampler, hires_sampler), seed, generator, latents, self.warned)
        clip_skip = whole("clip_skip", clip_skip, 0)
        if not isinstance(prompt_weighting, (bool, np.bool_)):
            raise InvalidRequest(f"prompt_weighting must be True or False, got {prompt_weighting!r}")
        if guidance <= 1.0 and any(negs) and "negative" not in self.warned:
            self.warned.add("negative")
            log.warning("the negative prompt has no effect with guidance %s (<= 1 disables "
                        "classifier-free guidance, which is what uses it)", guidance)
        if sampler in ("lcm", "tcd") and guidance > 3 and sampler not in self.warned:
            self.warned.add(sampler)
            log.warning("the %s sampler is made for %s-LoRA models, which draw best in 2-8 steps with guidance %s; "
                        "guidance %s tends to burn the image", sampler, sampler.upper(),
                        "1-2" if sampler == "lcm" else "1 (off) to 2", guidance)
        refiner, denoising_end = refine.switch(self, refiner, refiner_switch_at, denoising_start, denoising_end)
        req = Request(
            prompts=tuple(p for p in prompts for _ in range(num_images)),
            negative_prompts=tuple(q for q in negs for _ in range(num_images)),
            seeds=seeds,
            steps=int(steps),
            guidance=float(guidance),
            sampler=sampler,
            width=width,
            height=height,
            strength=float(strength) if init is not None else 1.0,
            clip_skip=clip_skip,
            prompt_weighting=prompt_weighting,
            zero_negative=zero_negative,
            **refine.scores(m, refiner, aesthetic_score, negative_aesthetic_score),
            **refine.cut(m, denoising_start, denoising_end, init, mask, hires_scale, control, latents,
                         refiner is not None),
            **({"first_pass_steps": _hires_pass[0], "edit_steps": _hires_pass[1]} if _hires_pass else {}),
            first_step=_first_step,
            masked_content=masked_content,
            noise_multiplier=noise_multiplier_of(noise_multiplier) if init is not None else 1.0,
            **variation,
        )
        check_request(req, self.manifest, img2img=init is not None)
        check_history(self.manifest, req.sampler, req.steps, req.strength)
        alone = False  # the switch comes before the base's first step: the refiner draws it all
        if refiner is not None:  # where the switch leaves one model no step, the other draws alone
            refiner, req, alone = refine.settle(refiner, req, m, init is not None)
        if not alone:
            plan(req.sampler, m.noise_schedule, req.steps, req.guidance, req.strength, req.denoising_start,
                 req.denoising_end)  # a switch that leaves no step, before anything is drawn
        fix = hires.of(hires_scale, hires_steps, hires_strength, hires_upscaler, hires_prompt, hires_negative_prompt,
                       hires_sampler)
        if fix is not None:
            hires.check(fix, init is not None, req.width, req.height, self.manifest)
            # (before pass 1)
            check_history(self.manifest, fix.sampler or req.sampler, *hires.img2img_steps(fix, req.steps))
        if self.vae_tile is not None:  # tiles the backend cannot run, said before anything is drawn
            sizes = [(req.width, req.height)] + ([hires.target_size(req.width, req.height, fix.scale,
                                                                    self.manifest.size_multiple)] if fix else [])
            vae_tiling.check_shapes(self.manifest, self.backend.name, self.vae_tile, sizes)
        shape = (n, m.latent_channels, req.height // m.vae_scale, req.width // m.vae_scale)
        if latents is not None and tuple(latents.shape) != shape:
            raise InvalidRequest(f"latents have shape {tuple(latents.shape)}; this request needs {shape}")
        gen = generator if generator is not None else noise.seeded(req.seeds)
        if isinstance(gen, (list, tuple)) and len(gen) != n:
            raise InvalidRequest(f"{len(gen)} generators for {n} images; pass one generator, or a list of one per image")
        shared = {}  # what chunks of one call share: inpainting's image latents, sampled once
        # A Latent upscaler takes the first pass's latents; output_type="latent" wants the last's.
        decode = output_type != "latent" if fix is None else not fix.latent
        decode = decode and refiner is None  # the refiner takes this call's latents
        scores = (aesthetic_score, negative_aesthetic_score)
        if alone:
            out = refine.alone(refiner, req, init, latents, gen, progress, output_type, *scores)
        else:
            out = np.concatenate([  # (B, H, W, 3) (or latents), in chunks of the engine's largest batch
                self.generate(sub_req, sub_init, sub_latents, sub_gen, progress, decode, mask, control, shared)
                for sub_req, sub_latents, sub_gen, sub_init in split(req, latents, gen, self.manifest.dims["batch"].max,
                                                                     init)
            ])
        if refiner is not None and not alone:
            out = refine.finish(refiner, m, req, out, gen, progress, output_type, *scores)
        if fix is not None:
            out = hires.second_pass(self, req, out, fix, generator, progress,
                                    "latent" if output_type == "latent" else "np", control)
        if crop is not None:  # each drawn crop pasted back into the image through the mask
            pad, box, original, original_mask = crop
            pils = [mask_crop_.overlay(original_mask, original, im, box) for im in images.to_pil(out)]
            if output_type == "np":
                return np.stack([np.asarray(im, np.float32) / 255 for im in pils])
        elif output_type != "pil":
            return out
        else:
            pils = images.to_pil(out)
        for i, im in enumerate(pils):
            im.info["parameters"] = infotext.parameters(self.manifest.model, req, i, init is not None, fix,
                                                        crop and crop[0], control, mask_blur,
                                                        refiner and refine.fields(refiner, req))
        return pils

    def generate(self, req: Request, init, latents, generator, progress, decode: bool = True,
                 mask=None, control=None, shared=None) -> np.ndarray:
        """Run one request; returns (B, H, W, 3) float32 in [0, 1] (decode False: the final
        latents, (B, C, H/8, W/8), as diffusers' output_type="latent")."""
        be, m = self.backend, self.manifest.model
        b = req.batch
        shape = (b, m.latent_channels, req.height // m.vae_scale, req.width // m.vae_scale)

        sp = plan(req.sampler, m.noise_schedule, req.steps, req.guidance, req.strength, req.denoising_start,
                  req.denoising_end)
        progress_.pass_start(progress, sp.steps)
        # each U-Net evaluation's text inputs (a refiner's part: those of the walk's last steps)
        first = req.first_step if req.first_step is not None else \
            req.steps - sp.steps if req.denoising_start is not None else 0
        step_emb = text.step_inputs(self, req, sp.steps, first)

        # Noise is drawn in diffusers' order: encoder sample, start noise, then one at each step
        # whose scheduler draws (or, for DPM++ SDE, from Brownian trees of the images' seeds).
        step_masks = None  # per step: the U-Net step's mask and image_latents (engines with masks)
        if m.inpainting or mask is not None:
            x, step_masks = inpaint.start(be, m, partial(self.encode_latents, progress=progress), init, mask, req,
                                          sp, generator, latents, shape, {} if shared is None else shared)
        elif init is not None:
            x = self.encode(init, req, sp, generator, latents, shape, progress)
        else:
            x = be.upload(noise.start(generator, shape, req, latents) * np.float32(sp.init_noise_scale))
        rows = noise.step_noise(sp, generator, req.seeds, shape)
        buffers = {id(n): be.upload(n) for n in rows}  # one upload per array: the rows' zeros once
        step_noise = [buffers[id(n)] for n in rows]
        if m.masks and step_masks is None:  # nothing masked: mask 1 keeps every step's output as it is
            keep = {"mask": be.upload(np.ones((b, 1, *shape[2:]), np.float32)),
                    "image_latents": be.upload(np.zeros(shape, np.float32))}
            step_masks = [keep] * sp.steps
        step_extra = step_masks or [{}] * sp.steps
        if m.controlnets:  # each step's control images (one buffer) and scales
            pictures, scales = control.inputs(b, req.width, req.height, sp.steps)
            pictures = be.upload(pictures)
            step_extra = [{**e, "control_images": pictures, "control_scales": be.upload(s)}
                          for e, s in zip(step_extra, scales)]
        x = self.denoise(x, step_emb, sp, step_noise, shape, req, progress, step_extra)
        if not decode:
            return be.download(x)

        return vae.decode(be, self.components["vae_decoder"], x, shape, m.vae_scale, self.vae_tile,
                          progress).transpose(0, 2, 3, 1)

    def denoise(self, x, step_emb, sp, step_noise, shape, req, progress, step_extra=None):
        """The N-step loop: latents ping-pong between two buffers, the x0 states rotate through
        three (step i writes x0 into states[i % 3] and reads the two before it: state, state2;
        engines without state2 ping-pong two); step_emb: each step's text inputs (the same buffers
        for all, but where the prompt is edited); step_extra: each step's further inputs (masks,
        ControlNets' images and scales)."""
        be, history = self.backend, self.manifest.model.history
        x_next = be.empty(shape)
        states = [be.empty(shape)] + [be.upload(np.zeros(shape, np.float32)) for _ in range(2 if history else 1)]
        table = sp.rows
        if not history:  # rows of 9: no x0_prev2 column (check_history refused what needs it)
            table = table[:, :C_PP]
        rows = [be.upload(np.ascontiguousarray(r)) for r in table]
        n = len(states)
        runs = []
        for i in range(sp.steps):
            inputs = {"latents": x, **step_emb[i], "coeffs": rows[i], "state": states[(i - 1) % n],
                      "noise": step_noise[i], **(step_extra[i] if step_extra else {})}
            if history:
                inputs["state2"] = states[(i - 2) % n]
            runs.append(Run(inputs, {"latents_out": x_next, "state_out": states[i % n]}))
            x, x_next = x_next, x
        key = (shape, req.guided, req.sampler, sp.steps)
        with progress_.step_bar(sp.steps, bool(progress) and not callable(progress)) as bar:
            def on_step(i: int) -> None:
                bar.update(1)
                if callable(progress):
                    progress(i + 1, sp.steps)

            be.run_steps(self.components["unet_step"], runs, key, on_step)
        return x

    def encode(self, init, req, sp, generator, latents, shape, progress=False):
        """img2img start: the VAE-encoded image noised to the first executed step."""
        be = self.backend
        if isinstance(init, images.InitLatents):  # encoded already: noise them, as diffusers draws it
            z = np.repeat(init.array, req.batch // len(init.array), axis=0)
            if req.denoising_start is not None:  # a refiner's part of the walk: they are noisy already
                return be.upload(z)
            start_noise = noise.start(generator, shape, req, latents) * np.float32(req.noise_multiplier)
            return be.upload(np.float32(sp.image_scale) * z + np.float32(sp.noise_scale) * start_noise)
        self.load_vae_encoder()
        pixels = images.to_model_input(init, req.width, req.height)  # (1, 3, H, W)
        if isinstance(generator, (list, tuple)):  # one per image: each image samples its own
            sample_noise = noise.draw(generator, shape)
        else:  # one for the batch: as diffusers, one sample of the image's latent, repeated
            sample_noise = np.repeat(noise.draw(generator, (1,) + tuple(shape[1:])), shape[0], axis=0)
        # denoising_start: the image's latents as they are (diffusers' add_noise=False draws no noise)
        start = [1.0, 0.0] if req.denoising_start is not None else [sp.image_scale, sp.noise_scale]
        start_noise = np.zeros(shape, np.float32) if req.denoising_start is not None else \
            noise.start(generator, shape, req, latents) * np.float32(req.noise_multiplier)
        return self.run_encoder(pixels, sample_noise, start_noise, start, req.batch, progress)

    def run_encoder(self, pixels: np.ndarray, sample_noise: np.ndarray, start_noise: np.ndarray, start,
                    repeat: int = 1, progress=False):
        """vae.encode with this engine's encoder and VAE tiling: device latents."""
        return vae.encode(self.backend, self.components["vae_encoder"], self.manifest.model, pixels, sample_noise,
                          start_noise, start, repeat, self.vae_tile, progress)

    def load_vae_encoder(self) -> None:
        if "vae_encoder" not in self.manifest.files:
            raise InvalidRequest(
                f"{self.engine_dir} was exported without the VAE encoder (--no-img2img); "
                "re-export without that flag to use --init-image"
            )
        if "vae_encoder" not in self.components:
            check_unchanged(self.engine_dir, self.manifest, "vae_encoder", self.file_stats)
            self.components["vae_encoder"] = self.backend.load(self.engine_dir, self.manifest, "vae_encoder")

    def encode_latents(self, pixels: np.ndarray, sample_noise: np.ndarray, repeat: int = 1,
                       progress=False) -> np.ndarray:
        """(B, 3, H, W) in [-1, 1], each repeated `repeat` times -> the scaled latents
        (B * repeat, C, H/8, W/8) of that VAE sample (progress: as __call__'s, for its tiles)."""
        self.load_vae_encoder()
        return self.backend.download(self.run_encoder(pixels, sample_noise, np.zeros_like(sample_noise), [1.0, 0.0],
                                                      repeat, progress))
