"""AUTOMATIC1111's HTTP API (`/sdapi/v1/...`, stable-diffusion-webui 1.10), on the engines served.

Clients written for its web UI's `--api` (webuiapi, image tools, bots, Krita and Photoshop
plugins of that API) talk to ldm-serve unchanged: txt2img and img2img (inpainting, the hires fix,
ControlNet units) answer with its JSON (`images` as base64 PNGs with their infotext, `parameters`,
`info`), its Extras upscale (a1111_extras.py), errors with its error body, and the listings (samplers, schedulers, models, upscalers,
embeddings, LoRAs, options, progress) with its fields, the engines as its checkpoints (engines.py).
"""

from __future__ import annotations

import base64
import io
import json
import time
from datetime import datetime
from pathlib import Path

from ldm_deploy import __version__
from ldm_deploy.engine import images, infotext, noise
from ldm_deploy.engine.hires import UPSCALERS
from ldm_deploy.engine.latent_resize import LATENT_UPSCALERS
from ldm_deploy.engine.noise import random_seed
from ldm_deploy.engine.samplers import DISPLAY_NAMES
from ldm_deploy.errors import InvalidRequest, UserError
from ldm_deploy.serve import a1111_extras, a1111_request, fields
from ldm_deploy.serve.server import HttpError, Route
from ldm_deploy.serve.engines import EngineUnavailable
from ldm_deploy.serve.worker import Interrupted, Job, QueueFull, ShuttingDown

PREFIX = "/sdapi/v1"
# Pipeline keywords -> its fields, for the mistakes the pipeline finds ("strength must lie in ...").
NAMES = {"guidance": "cfg_scale", "strength": "denoising_strength", "hires_strength": "denoising_strength",
         "hires_scale": "hr_scale", "hires_steps": "hr_second_pass_steps", "hires_upscaler": "hr_upscaler",
         "hires_sampler": "hr_sampler_name", "hires_prompt": "hr_prompt", "hires_negative_prompt": "hr_negative_prompt",
         "num_images": "batch_size x n_iter", "mask_crop": "inpaint_full_res_padding",
         "noise_multiplier": "initial_noise_multiplier", "variation_strength": "subseed_strength",
         "variation_seed": "subseed"}


def error_body(status: int, message: str, kind: str | None = None) -> dict:
    """AUTOMATIC1111's error body (its api_middleware's)."""
    return {"error": kind or "HTTPException", "detail": message, "body": "", "errors": f"{status}: {message}"}


class A1111:
    def __init__(self, worker, saved_styles: dict | None = None):
        self.worker = worker
        self.engines = worker.engines
        self.styles = saved_styles or {}  # name -> styles.Style

    @property
    def model(self):
        """The default engine's ModelInfo (what the listings describe)."""
        return self.engines.manifests[self.engines.default].model

    def routes(self) -> dict:
        get = {"/samplers": self.samplers, "/schedulers": self.schedulers, "/sd-models": self.sd_models,
               "/sd-vae": self.sd_vae, "/upscalers": self.upscalers, "/latent-upscale-modes": self.latent_modes,
               "/embeddings": self.embeddings, "/loras": self.loras, "/options": self.options,
               "/progress": self.progress, "/cmd-flags": lambda _: (200, {}), "/prompt-styles": self.prompt_styles,
               # What is not offered here lists nothing, as its own lists do with none installed.
               **dict.fromkeys(("/face-restorers", "/hypernetworks", "/sd-modules", "/script-info", "/extensions"),
                               lambda _: (200, [])),
               "/scripts": lambda _: (200, {"txt2img": [], "img2img": []})}
        extras = a1111_extras.Extras(self.engines)
        post = {"/txt2img": self.txt2img, "/img2img": self.img2img, "/png-info": self.png_info,
                "/options": self.set_options, "/extra-single-image": extras.single,
                "/extra-batch-images": extras.batch}
        out = {("GET", PREFIX + p): Route(f, error_body) for p, f in get.items()}
        out.update({("POST", PREFIX + p): Route(f, error_body, body=True, names=NAMES) for p, f in post.items()})
        out[("POST", PREFIX + "/interrupt")] = Route(self.interrupt, error_body)
        out[("POST", PREFIX + "/skip")] = Route(self.skip, error_body)
        # Its rescans of the models folder: the engines, with their VAEs, LoRAs and embeddings, are fixed
        # when ldm-serve starts (--engine, merged at ldm-export), so there is nothing to find anew.
        for p in ("/refresh-checkpoints", "/refresh-vae", "/refresh-loras", "/refresh-embeddings"):
            out[("POST", PREFIX + p)] = Route(lambda _: (200, None), error_body)
        out[("GET", "/internal/ping")] = Route(lambda _: (200, {}), error_body)
        # the ControlNet extension's: what its clients ask before they name a model in a unit
        out[("GET", "/controlnet/model_list")] = Route(self.controlnet_models, error_body)
        out[("GET", "/controlnet/module_list")] = Route(lambda _: (200, {"module_list": ["none"]}), error_body)
        return out

    # -- drawing --------------------------------------------------------------------------------

    def txt2img(self, body: dict):
        admit(self.worker)
        engine = self.engine(body)
        model, size = self.engines.manifests[engine].model, self.engines.default_size(engine)
        upscalers = tuple(self.engines.manifests[engine].upscalers)  # the engine's upscale models, by name
        return self.draw(body, self.refiner(a1111_request.txt2img(body, model, size, random_seed, self.styles, upscalers),
                                            engine), engine,
                         False)

    def img2img(self, body: dict):
        admit(self.worker)  # before its images are decoded
        engine = self.engine(body)
        model, size = self.engines.manifests[engine].model, self.engines.default_size(engine)
        return self.draw(body, self.refiner(a1111_request.img2img(body, model, size, random_seed, self.styles), engine), engine,
                         True)

    def refiner(self, options: dict, engine: str) -> dict:
        """refiner_checkpoint (a title or name, as sd_model_checkpoint) -> the engine's name, which the
        worker loads beside the request's: both at once, so the server must keep two loaded. The
        request's own engine is no refiner (AUTOMATIC1111 then does not switch)."""
        if "refiner" not in options:
            return options
        name = self.engines.find(options["refiner"])
        if name == engine:
            options.pop("refiner")
            options.pop("refiner_switch_at")
            return options
        if self.engines.keep < 2:
            raise InvalidRequest(f"refiner_checkpoint {options['refiner']!r} draws with two engines at once; this "
                                 "server keeps one loaded (start ldm-serve with --keep-loaded 2)")
        options["refiner"] = name
        return options

    def engine(self, body: dict) -> str:
        """The engine a request draws with: override_settings' sd_model_checkpoint, or the default;
        its sd_vae must be the engine's own (a VAE is exported into an engine)."""
        settings = body.get("override_settings") or {}
        if not isinstance(settings, dict):
            return self.engines.default  # refused with its reason by a1111_request
        engine = self.engines.find(settings.get("sd_model_checkpoint"))
        if "sd_model_checkpoint" in settings and body.get("override_settings_restore_afterwards") is False:
            self.engines.default = engine  # AUTOMATIC1111 keeps the checkpoint then
        vae = self.engines.manifests[engine].model.vae
        wanted = settings.get("sd_vae")
        if wanted not in (None, "", "Automatic", "None") and wanted not in (Path(vae).stem, Path(vae).name):
            raise InvalidRequest(f"override_settings.sd_vae {wanted!r}: {engine}'s VAE is "
                                 f"{vae_name(self.engines.manifests[engine].model)}; another is exported into an "
                                 "engine (ldm-export --vae)")
        return engine

    def draw(self, body: dict, options: dict, engine: str, img2img: bool):
        images = run(self.worker, options, engine)
        model = self.engines.manifests[engine].model
        infotexts = [im.info.get("parameters", "") for im in images]
        varied = options.get("variation_strength", 0)  # seeds and variation seeds as the Pipeline numbers them
        req_seeds = list(noise.image_seeds(options["seed"], len(images), same=bool(varied)))
        subseeds = list(noise.image_seeds(options["variation_seed"], len(images))) if varied else [-1] * len(images)
        resize = options.get("seed_resize_from") or (-1, -1)
        # the size asked for, as its p.width: the hires fix's first pass, "Only masked"'s drawn crop
        width, height = options.get("width") or images[0].size[0], options.get("height") or images[0].size[1]
        # its name as the PNG writes it: "Euler a" with "Schedule type: SGM Uniform" apart, which its
        # parser would cut from the name at " Uniform"
        sampler = {**infotext.sampler_fields(DISPLAY_NAMES[options["sampler"]]),
                   **infotext.beta_fields(options["sampler"], options.get("hires_sampler"))}  # as its PNG
        info = {
            "prompt": options["prompt"], "all_prompts": [options["prompt"]] * len(images),
            "negative_prompt": options["negative_prompt"] or "",
            "all_negative_prompts": [options["negative_prompt"] or ""] * len(images),
            "seed": req_seeds[0], "all_seeds": req_seeds, "subseed": subseeds[0], "all_subseeds": subseeds,
            "subseed_strength": varied, "width": width, "height": height,
            "sampler_name": sampler.pop("Sampler"), "cfg_scale": options["guidance"],
            "steps": options["steps"], "batch_size": fields.integer(body, "batch_size", 1),
            "restore_faces": False, "face_restoration_model": None, "sd_model_name": engine,
            "sd_model_hash": model.model_hash, "sd_vae_name": vae_name(model) if model.vae else None,
            "sd_vae_hash": None, "seed_resize_from_w": resize[0], "seed_resize_from_h": resize[1],
            "denoising_strength": options.get("strength", options.get("hires_strength")),
            "extra_generation_params": sampler, "index_of_first_image": 0, "infotexts": infotexts, "styles": list(body.get("styles") or []),
            "job_timestamp": datetime.now().strftime("%Y%m%d%H%M%S"), "clip_skip": options["clip_skip"] + 1,
            "is_using_inpainting_conditioning": bool(model.inpainting and img2img),
            "version": f"ldm-deploy {__version__}",
        }
        parameters = dict(body)
        if img2img and not body.get("include_init_images"):
            parameters["init_images"] = parameters["mask"] = None
        send = fields.flag(body, "send_images", True)
        return 200, {"images": [png_base64(im) for im in images] if send else [], "parameters": parameters,
                     "info": json.dumps(info)}

    # -- what is served -------------------------------------------------------------------------

    def prompt_styles(self, _):
        """The saved styles (ldm-serve --styles-file), as its PromptStyleItem list."""
        return 200, [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                     for s in self.styles.values()]

    def samplers(self, _):
        """Its sampler names (the schedule apart, as since its 1.9), each with its k-diffusion
        aliases and, where it has one, its own default schedule ("Automatic")."""
        out = {}
        for display in DISPLAY_NAMES.values():
            base = a1111_request.base_name(display)
            aliases = [a for a, name in a1111_request.ALIASES.items() if name == base]
            item = out.setdefault(base, {"name": base, "aliases": aliases, "options": {}})
            if base in infotext.AUTOMATIC_SCHEDULES:
                item["options"]["scheduler"] = infotext.AUTOMATIC_SCHEDULES[base].lower()
        return 200, list(out.values())

    def controlnet_models(self, _):  # every engine's (a unit is checked against its request's engine)
        # (the extension's names, "stem [old hash]"; engines from before them: the file's name and its SHA-256's start)
        names = [c.get("a1111_name") or f"{c['name']} [{c['sha256'][:8]}]" for m in self.engines.manifests.values()
                 for c in m.model.controlnets]
        return 200, {"model_list": list(dict.fromkeys(names))}

    def interrupt(self, _):
        self.worker.interrupt()
        return 200, {}

    def skip(self, _):  # one call runs at a time here: skipping it is interrupting it
        self.worker.interrupt()
        return 200, None

    def schedulers(self, _):
        return 200, [{"name": name, "label": label, "aliases": None, "default_rho": 7.0 if name == "karras" else -1,
                      "need_inner_model": False} for name, label in a1111_request.SCHEDULERS.items()]

    def sd_models(self, _):
        return 200, [{"title": self.engines.title(name), "model_name": name, "hash": m.model.model_hash,
                      "sha256": m.model.model_sha256, "filename": m.model.source, "config": None}
                     for name, m in self.engines.manifests.items()]

    def sd_vae(self, _):
        vae = self.model.vae
        return 200, [{"model_name": vae_name(self.model), "filename": vae}] if vae else []

    def upscalers(self, _):
        """Lanczos, then each engine's upscale models (ldm-export --upscaler), as AUTOMATIC1111 lists its own."""
        models = {name: rec for m in self.engines.manifests.values() for name, rec in m.upscalers.items()}
        return 200, [{"name": UPSCALERS[0], "model_name": None, "model_path": None, "model_url": None, "scale": 4},
                     *({"name": name, "model_name": rec["architecture"], "model_path": rec["file"], "model_url": None,
                        "scale": rec["scale"]} for name, rec in models.items())]

    def latent_modes(self, _):
        return 200, [{"name": name} for name in LATENT_UPSCALERS]

    def embeddings(self, _):
        loaded = {e["word"]: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                              "shape": self.model.text_width, "vectors": e["vectors"]} for e in self.model.embeddings}
        return 200, {"loaded": loaded, "skipped": {}}

    def loras(self, _):  # merged into the engine at ldm-export, at the weight given there
        return 200, [{"name": lo["name"], "alias": lo["name"], "path": lo["name"],
                      "metadata": {"weight": lo["weight"]}} for lo in self.model.loras]

    def options(self, _):
        return 200, {"sd_model_checkpoint": self.engines.title(self.engines.default),
                     "sd_vae": vae_name(self.model),
                     "CLIP_stop_at_last_layers": 1, "samples_format": "png", "sd_checkpoint_hash": self.model.model_sha256,
                     "tiling": self.model.tiling, **dict(zip(("beta_dist_alpha", "beta_dist_beta"),
                                                             infotext.BETA_DISTRIBUTION))}

    def set_options(self, body: dict):
        """sd_model_checkpoint chooses the default engine, as it switches AUTOMATIC1111's model (it is
        loaded with the first request that draws with it); other settings only as they are already,
        since they go with each request here."""
        chosen = self.engines.find(body.get("sd_model_checkpoint"))
        model = self.engines.manifests[chosen].model
        vae = vae_name(model)
        current = {**self.options(None)[1], "sd_vae": vae, "sd_checkpoint_hash": model.model_sha256,
                   "tiling": model.tiling}
        for key, value in body.items():
            if key == "sd_model_checkpoint" or (key == "sd_vae" and value in ("", "None", "Automatic", vae)):
                continue
            if key not in current or value != current[key]:
                raise HttpError(422, f"options: {key} = {value!r} cannot be set here; settings go with each request "
                                     "(override_settings: CLIP_stop_at_last_layers, sd_model_checkpoint, "
                                     "beta_dist_alpha / beta_dist_beta at 0.6 only), and a VAE "
                                     "is exported into an engine")
        self.engines.default = chosen
        return 200, None

    def progress(self, _):
        now, (state, _) = time.time(), self.worker.snapshot()
        fraction = state.step / state.steps if state.steps else 0.0
        elapsed = now - state.started if state.started else 0.0
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        return 200, {"progress": fraction, "eta_relative": eta, "current_image": None, "textinfo": None,
                     "state": {"skipped": False, "interrupted": False, "stopping_generation": False,
                               "job": "txt2img/img2img" if state.running else "", "job_count": state.job_count,
                               "job_timestamp": datetime.fromtimestamp(state.started).strftime("%Y%m%d%H%M%S")
                               if state.started else "0", "job_no": 0, "sampling_step": state.step,
                               "sampling_steps": state.steps}}

    def png_info(self, body: dict):
        image = fields.picture(body.get("image"), "image")
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        text = items.pop("parameters", "")
        if not text:
            return 200, {"info": "", "items": items, "parameters": {}}
        prompt, negative, written = infotext.parse(text)
        parameters = {"Prompt": prompt, "Negative prompt": negative}
        for key, value in written.items():  # its parse_generation_parameters: "WxH" values as key-1, key-2
            size = infotext.SIZE.match(value)
            parameters.update({f"{key}-1": size.group(1), f"{key}-2": size.group(2)} if size else {key: value})
        return 200, {"info": text, "items": items, "parameters": parameters}


def vae_name(model) -> str:
    """An engine's VAE as AUTOMATIC1111 names it: the replacement's file name without suffix, or
    "Automatic" (the model's own)."""
    return Path(model.vae).stem if model.vae else "Automatic"


def admit(worker, job: Job | None = None) -> Job | None:
    """Queue a job (none: only see that there is room); a full queue -> 503."""
    try:
        if job is None:
            worker.room()
            return None
        return worker.submit(job)
    except QueueFull as e:
        raise HttpError(503, str(e), "QueueFull", {"Retry-After": "5"}) from None
    except ShuttingDown as e:
        raise HttpError(503, str(e), "ShuttingDown") from None


def run(worker, options: dict, engine: str | None = None) -> list:
    """Queue a job for the engine (None: the default) and wait for its images; a full queue -> 503."""
    job = admit(worker, Job(options, engine))
    while not job.done.wait(1.0):
        if not worker.alive:
            raise HttpError(500, "the server's worker has stopped; its log says why")
    if isinstance(job.error, UserError):
        raise job.error  # the route family's "invalid request" answer
    if isinstance(job.error, ShuttingDown):
        raise HttpError(503, str(job.error), "ShuttingDown")
    if isinstance(job.error, EngineUnavailable):
        raise HttpError(503, str(job.error), "EngineUnavailable")
    if isinstance(job.error, Interrupted):
        raise HttpError(409, f"{job.error}: no image was finished", "Interrupted")
    if job.error is not None:
        raise HttpError(500, f"drawing failed: {type(job.error).__name__}: {job.error} (the server's log has "
                             "the traceback)", type(job.error).__name__)
    return job.images


def png_base64(image) -> str:
    """A PNG with its infotext (AUTOMATIC1111 writes it into the PNGs its API returns), base64."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=images.png_text(image))
    return base64.b64encode(buffer.getvalue()).decode()

