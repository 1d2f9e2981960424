"""ControlNets (Zhang et al. 2023) exported inside the U-Net step: `ldm-export --controlnet DIR`.

Each is a diffusers ControlNetModel (a folder: config.json and its weights) made for the model's
U-Net (its blocks' widths, its text width). In the step it sees what diffusers' ControlNet
pipelines give it: the latent model input, the timestep, the text embeddings and its control
image in [0, 1]; its residuals, times each step's scale, are summed (several ControlNets, as
diffusers' MultiControlNetModel sums them) and added to the U-Net's skip connections.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ldm_deploy.errors import ModelSourceError
from ldm_deploy.export.single_file import PICKLE_SUFFIXES, SAFE_SUFFIXES

log = logging.getLogger(__name__)


def load(src, paths: tuple[str, ...], allow_pickle: bool) -> None:
    """Load each ControlNet into src.controlnets (fp32, eval) and its record into
    src.controlnet_records ({"name", "sha256"}); refuse one that does not fit the U-Net."""
    from ldm_deploy.export.source import hash_files, quiet_libraries

    quiet_libraries()
    for given in paths:
        path = Path(given).expanduser()
        net, files = load_one(path, allow_pickle)
        check_fits(net, src.unet, path)
        src.controlnets.append(net.eval().float())
        src.controlnet_records.append({"name": path.name, "sha256": hash_files(files)})
        log.info("ControlNet %s", path.name)


def load_one(path: Path, allow_pickle: bool):
    """-> (ControlNetModel, its weight files) of a diffusers ControlNet folder."""
    from diffusers import ControlNetModel

    if not path.exists():
        raise ModelSourceError(f"--controlnet {path} does not exist; pass a diffusers ControlNet folder "
                               "(config.json and diffusion_pytorch_model.safetensors)")
    if path.is_file():
        raise ModelSourceError(f"--controlnet {path} is a file; pass the diffusers ControlNet folder it "
                               "belongs in (config.json beside its weights); single-file ControlNets "
                               "(AUTOMATIC1111's models/ControlNet) are not supported yet")
    safe = sorted(f for f in path.iterdir() if f.suffix in SAFE_SUFFIXES)
    pickled = sorted(f for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if not (path / "config.json").is_file() or not (safe or pickled):
        raise ModelSourceError(f"--controlnet {path} is not a diffusers ControlNet folder (config.json and "
                               "*.safetensors weights)")
    if not safe and not allow_pickle:
        raise ModelSourceError(f"--controlnet {path} holds only pickle weights ({pickled[0].name}); loading a "
                               "pickle runs arbitrary code. Pass --allow-pickle if you trust its source")
    try:
        net = ControlNetModel.from_pretrained(path, use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelSourceError(f"could not load the ControlNet at {path}: {e}") from None
    return net, safe or pickled


def check_fits(net, unet, path: Path) -> None:
    """The ControlNet's residuals must match the U-Net's skip connections and text width."""
    c, u = net.config, unet.config
    for name in ("block_out_channels", "layers_per_block", "cross_attention_dim"):
        if _plain(c[name]) != _plain(u[name]):
            raise ModelSourceError(
                f"--controlnet {path} was made for another model: its {name} is {_plain(c[name])}, the "
                f"U-Net's {_plain(u[name])} (a ControlNet for SD 1.5 fits SD 1.x models, one for SD 2.1 "
                "SD 2.x)")
    if c.in_channels != u.out_channels:
        raise ModelSourceError(f"--controlnet {path} takes {c.in_channels}-channel latents; this model's "
                               f"have {u.out_channels}")


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value
