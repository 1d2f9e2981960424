"""How well an engine of the shapes model follows prompts, judged by `judge.read`.

    python -m ldm_deploy.shapes.evaluate [--engine DIR] [--seeds 8] [--guidance 1 3 7.5]
                                         [--backend openvino --precision bf16]

prints, per guidance scale, the share of images whose foreground and background colours are the
asked ones, and whose largest object of the asked colour has the asked shape, over the held-out
(colour, shape, background) triples that training never saw; then what a negative prompt does:
the share of foreground objects in a colour with and without that colour as the negative prompt,
on prompts that leave the foreground colour unsaid (the colour: the one drawn most often there).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from ldm_deploy.shapes import data, judge


@dataclass(frozen=True)
class Rates:
    images: int
    colors: float  # asked background and an object of the asked foreground colour
    shapes: float  # ... and the largest object of that colour has the asked shape

    def __str__(self):
        return f"colours {self.colors:.0%}, shapes {self.shapes:.0%} of {self.images} images"


def score(images, truths) -> Rates:
    """images: (64, 64, 3) arrays or PIL images; truths: (foreground, shape, background) each."""
    colors = shapes = 0
    for image, (fg, shape, bg) in zip(images, truths):
        r = judge.read(image)
        ok = r.background == bg and r.has(fg)
        colors += ok
        shapes += ok and r.has(fg, shape)
    n = len(truths)
    return Rates(n, colors / n, shapes / n)


def held_out_rates(pipe, seeds: int, guidance: float, steps: int = 20, negative: str = "") -> Rates:
    images, truths = [], []
    for prompt, truth in data.eval_prompts():
        out = pipe(prompt, negative_prompt=negative, steps=steps, guidance=guidance, seed=0,
                   num_images=seeds, width=data.SIZE, height=data.SIZE, output_type="np", progress=False)
        images += [np.round(a * 255).astype(np.uint8) for a in out]
        truths += [truth] * seeds
    return score(images, truths)


def object_colors(pipe, negative: str, seeds: int, guidance: float, steps: int = 20) -> list[str]:
    """The colour of the largest object ("" for none) in every image of "a SHAPE on a BG
    background" prompts, which leave the foreground colour unsaid (every shape, every background)."""
    colors = []
    for shape in data.SHAPES:
        for bg in data.COLORS:
            out = pipe(f"a {shape} on {data.with_article(bg)} background", negative_prompt=negative, steps=steps,
                       guidance=guidance, seed=0, num_images=seeds, width=data.SIZE, height=data.SIZE,
                       output_type="np", progress=False)
            for a in out:
                r = judge.read(np.round(a * 255).astype(np.uint8))
                colors.append(r.objects[0].color if r.objects else "")
    return colors


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", help="default: the bundled model's cached engine (exported on first use)")
    p.add_argument("--seeds", type=int, default=8, help="images per prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 7.5])
    p.add_argument("--backend", default="auto", help="e.g. openvino, to judge another runtime on the same engine")
    p.add_argument("--precision", default=None, help="openvino: fp32 (default) or bf16")
    args = p.parse_args(argv)

    from ldm_deploy import shapes
    from ldm_deploy.cache import engine_for
    from ldm_deploy.engine.pipeline import Pipeline

    pipe = Pipeline.load(args.engine or engine_for(shapes.MODEL_DIR, shapes.EXPORT_SETTINGS, "shapes"),
                         backend=args.backend, **({"precision": args.precision} if args.precision else {}))
    print(f"held-out prompts ({len(data.HELD_OUT)} triples x {args.seeds} seeds, {args.steps} steps):")
    for g in args.guidance:
        print(f"  guidance {g:>4}: {held_out_rates(pipe, args.seeds, g, args.steps)}")
    print("negative prompt: the colour drawn most often where the prompt leaves it unsaid, as the "
          "negative prompt (share of images with it):")
    n = max(1, args.seeds // 4)
    for g in args.guidance:
        plain = object_colors(pipe, "", n, g, args.steps)
        top = max(data.COLORS, key=plain.count)
        neg = object_colors(pipe, top, n, g, args.steps)
        print(f"  guidance {g:>4}: {top} in {plain.count(top) / len(plain):.0%} without, "
              f"{neg.count(top) / len(neg):.0%} with negative prompt \"{top}\" ({len(plain)} images each)")


if __name__ == "__main__":
    main()
