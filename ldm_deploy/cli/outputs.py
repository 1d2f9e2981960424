"""The images `ldm-run --num-images` draws, call by call, and the PNG files it writes them to."""

from __future__ import annotations

import math
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def output_paths(out: str | None, n: int) -> list[Path]:
    """The PNG files of n images. `out`: a file name (".png" added when it has no suffix), or an
    existing folder (or one ending in "/") to write output*.png into. With no `out`, or a
    folder, existing files are kept: output.png, then output-2.png, output-3.png, ..."""
    from ldm_deploy.errors import UserError

    if out is not None and not out.strip():
        raise UserError("--out is empty; give a file name (a.png) or a folder (out/)")
    if out is not None and Path(out).exists() and not Path(out).is_dir() and not Path(out).is_file():
        raise UserError(f"--out {out} is not a file or a folder (a device?); give a file name (a.png) or a folder")
    if out is not None and (out.endswith(("/", "\\")) or Path(out).is_dir()):
        folder, out = Path(out), None
    else:
        folder = None
    if out is None:
        base = (folder or Path(".")) / "output.png"
        for k in range(1, 100000):
            p = base if k == 1 else base.with_name(f"output-{k}.png")
            paths = names(p, n)
            if not any(q.exists() for q in paths):
                return paths
    p = Path(out)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        raise UserError(f"--out {out}: ldm-run writes PNG files (with the generation parameters "
                        f"inside, as AUTOMATIC1111 does); use a name ending in .png")
    if p.suffix.lower() != ".png":
        p = p.with_name(p.name + ".png")
    return names(p, n)


def names(p: Path, n: int) -> list[Path]:
    return [p] if n == 1 else [p.with_name(f"{p.stem}-{i}{p.suffix}") for i in range(n)]


def calls(args, pipe, refiner=None) -> list[tuple]:
    """The calls that draw --num-images: [(index of the first, how many, seed, variation seed)], the
    seeds as ldm-run's (one call) or, where each image depends on its seeds alone, lists of the images' own
    seeds, one call per engine batch, so that each batch is written as soon as it is drawn (a long
    run keeps what it drew)."""
    from ldm_deploy.engine import noise

    n, batch = args.num_images, pipe.manifest.dims["batch"].max
    if refiner is not None:  # (its calls run in chunks of its own batch: whole ones of those too)
        batch = math.lcm(batch, refiner.manifest.dims["batch"].max)
    if n <= batch:
        return [(0, n, args.seed, args.variation_seed)]
    strength = args.variation_strength  # (a random seed, or variation seed, is drawn once for all)
    seeds = list(noise.image_seeds(args.seed, n, same=bool(strength)))
    varied = list(noise.image_seeds(args.variation_seed, n, name="variation_seed")) if strength else None
    return [(i, len(seeds[i:i + batch]), seeds[i:i + batch], varied[i:i + batch] if varied else args.variation_seed)
            for i in range(0, n, batch)]
