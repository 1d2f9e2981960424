"""What every command shares: logging to stderr, user errors without tracebacks, and the model
options ldm-export and ldm-run --model both take."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Callable

from ldm_deploy.errors import InvalidRequest, UserError, renamed


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr, force=True
    )
    # Libraries we call are chatty at INFO / WARNING about things users cannot act on.
    for name in ("diffusers", "transformers", "torch", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, `docker stop`, a cancelled CI job), raised where the command is,
    so that what it was writing is removed as for Ctrl+C (a half-built engine directory)."""


def terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one (a supervisor's) cuts no cleanup short
    raise Terminated


def flag_names(parser, keywords) -> dict[str, str]:
    """Each of `keywords` (Pipeline's) that is an option's dest -> its long flag ("hires_scale" ->
    "--hires-scale")."""
    return {a.dest: long[0] for a in parser._actions
            if a.dest in keywords and (long := [o for o in a.option_strings if o.startswith("--")])}


def run_main(fn: Callable[[], None], prog: str, names: Callable[[], dict[str, str]] | None = None) -> int:
    """Run a command; a UserError prints `prog: error: message` and exits 2, Ctrl+C 130, SIGTERM
    143 (128 + its number, as a shell reports a process it ended). names: -> Pipeline keywords ->
    the command's flags, for the pipeline's mistakes that start with one ("strength must lie in
    ..." -> "--strength must lie in ...")."""
    main_thread = threading.current_thread() is threading.main_thread()  # (signals are set there alone)
    previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
    try:
        fn()
    except UserError as e:
        message = renamed(str(e), names()) if names and isinstance(e, InvalidRequest) else str(e)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:  # (None: not set from Python)
            signal.signal(signal.SIGTERM, previous)
    return 0


# What goes into an engine besides the model itself: ldm-export's options, and ldm-run's with
# --model (which exports into the cache). flag -> ExportConfig field.
MODEL_OPTIONS = {"--config": "model_config", "--prediction-type": "prediction_type", "--vae": "vae",
                 "--lora": "loras", "--embedding": "embeddings", "--controlnet": "controlnets",
                 "--upscaler": "upscalers", "--tiling": "tiling", "--allow-pickle": "allow_pickle"}


def add_model_options(p) -> None:
    """The MODEL_OPTIONS on a parser or argument group."""
    from ldm_deploy.export.single_file import PREDICTION_TYPES

    p.add_argument("--config", dest="model_config", default=None,
                   help="single-file checkpoints of an architecture other than SD 1.5's, 2.1's or SDXL base's: a diffusers "
                        "folder or hub id whose configs describe it (its weights are not read)")
    p.add_argument("--prediction-type", default=None, choices=PREDICTION_TYPES,
                   help="what the U-Net predicts, overriding the model's (SD 2.x checkpoints: v_prediction "
                        "for the 768 px models, epsilon for the 512 px base models)")
    p.add_argument("--vae", default=None,
                   help="a VAE to use instead of the model's: a file (e.g. vae-ft-mse-840000-ema-pruned.safetensors) "
                        "or a diffusers VAE folder")
    p.add_argument("--lora", dest="loras", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="merge a LoRA into the weights (kohya or diffusers layout; weight default 1); "
                        "repeat for several")
    p.add_argument("--embedding", dest="embeddings", action="append", default=[], metavar="FILE[:WORD]",
                   help="add a textual inversion embedding (AUTOMATIC1111 or diffusers layout), triggered by "
                        "its file name (or WORD) in prompts; repeat for several")
    p.add_argument("--controlnet", dest="controlnets", action="append", default=[], metavar="DIR|FILE",
                   help="run a ControlNet beside the U-Net at every step: a diffusers ControlNet folder, or one "
                        "file as AUTOMATIC1111's models/ControlNet holds them (.safetensors); ldm-run "
                        "--control-image gives its image; repeat for several")
    p.add_argument("--upscaler", dest="upscalers", action="append", default=[], metavar="FILE[:NAME]",
                   help="export an upscale model (ESRGAN, Real-ESRGAN, 4x-UltraSharp, ... as AUTOMATIC1111's "
                        "models/ESRGAN holds them) for the hires fix: ldm-run --hires-upscaler NAME (default: the "
                        "file's name without its suffix); repeat for several")
    p.add_argument("--tiling", action="store_true",
                   help="AUTOMATIC1111's Tiling: the U-Net's and VAE's convolutions pad circularly, so that images "
                        "tile seamlessly (textures, patterns); the engine always draws so")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load .ckpt / .pt / .pth / .bin pickle files (model, VAE, LoRAs, embeddings, upscalers): runs code from "
                        "the file, only for sources you trust")


# ldm-run's and ldm-serve's --model: its cached engine's image sides, as ldm-export's options set them
# (theirs default 256 and the family's, ldm-export's own).
SIZE_OPTIONS = {"--min-size": "min_size", "--max-size": "max_size"}


def add_size_options(p) -> None:
    """The SIZE_OPTIONS on ldm-run's or ldm-serve's --model argument group."""
    p.add_argument("--min-size", type=int, default=None,
                   help="smallest image side the cached engine accepts (px; default 256), as ldm-export's")
    p.add_argument("--max-size", type=int, default=None,
                   help="largest image side the cached engine accepts (px; default 1024, SDXL 1536), as ldm-export's")


def size_options(args) -> dict:
    """The SIZE_OPTIONS given, as ExportConfig fields."""
    given = {field: getattr(args, field) for field in SIZE_OPTIONS.values() if getattr(args, field) is not None}
    from ldm_deploy.export.config import ExportConfig

    if given.get("min_size") == ExportConfig.min_size:  # the default: the same engine (and key) as without it
        del given["min_size"]
    return given


def model_options(args) -> dict:
    """The MODEL_OPTIONS given, as ExportConfig fields (LoRA and embedding specs parsed)."""
    from ldm_deploy.export import embeddings, lora, upscalers

    given = {field: getattr(args, field) for field in MODEL_OPTIONS.values() if getattr(args, field)}
    if "loras" in given:
        given["loras"] = tuple(lora.parse_spec(spec) for spec in given["loras"])
    if "embeddings" in given:
        given["embeddings"] = tuple(embeddings.parse_spec(spec) for spec in given["embeddings"])
    if "controlnets" in given:
        given["controlnets"] = tuple(given["controlnets"])
    if "upscalers" in given:
        given["upscalers"] = tuple(upscalers.parse_spec(spec) for spec in given["upscalers"])
    return given
