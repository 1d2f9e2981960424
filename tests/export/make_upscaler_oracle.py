"""Writes upscaler_oracle.npz: small upscale networks in the layouts their files come in (each
weight's name and shape; the values are `weights()`'s, drawn from a seed), an input, and what
spandrel (the loader of ComfyUI's and AUTOMATIC1111's upscale models) makes of them.
test_upscalers.py draws the same weights (importing `weights` from here) and checks that our networks (export/upscale_nets.py)
give the same.

spandrel imports torchvision, whose CPU build is not on these machines' registries (PyPI's pins a
CUDA torch), so this runs once, elsewhere, and its answers are committed:

    python3 -m venv /tmp/oracle && /tmp/oracle/bin/pip install spandrel==0.4.2 safetensors
    /tmp/oracle/bin/python tests/export/make_upscaler_oracle.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).with_name("upscaler_oracle.npz")


def weights(shapes: dict[str, tuple], seed: int) -> dict[str, np.ndarray]:
    """float32 values for each named shape, in order: convolutions' scaled to their fan-in, the rest small."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        scale = 0.5 / np.sqrt(np.prod(shape[1:])) if len(shape) == 4 else 0.05
        out[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
    return out


def basicsr_rrdbnet(in_ch: int, nf: int, gc: int, blocks: int, names: dict | None = None, ups: int = 2) -> dict:
    """Weight shapes under BasicSR's RRDBNet names (Real-ESRGAN's files); `names` renames its
    top-level convolutions (BSRGAN's spelling)."""
    names = names or {}

    def conv(cin, cout):
        return (cout, cin, 3, 3), (cout,)

    layers = {"conv_first": conv(in_ch, nf), "conv_body": conv(nf, nf),
              **{f"conv_up{i}": conv(nf, nf) for i in range(1, ups + 1)}, "conv_hr": conv(nf, nf),
              "conv_last": conv(nf, 3)}
    for b in range(blocks):
        for r in (1, 2, 3):
            for k in range(1, 6):
                layers[f"body.{b}.rdb{r}.conv{k}"] = conv(nf + (k - 1) * gc, gc if k < 5 else nf)
    shapes = {}
    for name, (w, bias) in layers.items():
        for old, new in names.items():
            name = name.replace(old, new)
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = w, bias
    return shapes


def shapes_of(module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def cases() -> dict[str, dict]:
    """case -> {weight name: shape}, in the layout of the files of that kind."""
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.ESRGAN import ESRGAN

    bsrgan = {"conv_body": "trunk_conv", "conv_up": "upconv", "conv_hr": "HRconv", "body.": "RRDB_trunk.",
              "rdb": "RDB"}
    return {
        "esrgan_4x_original_names": shapes_of(ESRGAN(num_filters=8, num_blocks=2, scale=4)),
        "esrgan_2x_original_names": shapes_of(ESRGAN(num_filters=8, num_blocks=1, scale=2)),
        "esrgan_8x_original_names": shapes_of(ESRGAN(num_filters=4, num_blocks=1, scale=8)),
        "realesrgan_x4plus": basicsr_rrdbnet(3, 8, 32, 2),
        "realesrgan_x2plus": basicsr_rrdbnet(12, 8, 32, 1),  # pixel-unshuffled by 2: 2x in all
        "bsrgan_4x": basicsr_rrdbnet(3, 8, 32, 1, bsrgan),
        "bsrgan_2x": basicsr_rrdbnet(3, 8, 32, 1, bsrgan, ups=1),
        "compact_4x": shapes_of(Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=3, upscale=4)),
        "compact_2x": shapes_of(Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2)),
    }


def main() -> None:
    import spandrel
    import torch

    x = np.random.default_rng(1).random((1, 3, 6, 8), dtype=np.float32)
    out = {"input": x}
    for seed, (case, shapes) in enumerate(cases().items()):
        state = {k: torch.from_numpy(v) for k, v in weights(shapes, seed).items()}
        model = spandrel.ModelLoader().load_from_state_dict(state)
        with torch.no_grad():
            y = model.model.eval()(torch.from_numpy(x))
        print(f"{case}: {model.architecture.id} {model.scale}x -> {tuple(y.shape)}")
        out[f"{case}|seed"] = np.array(seed)
        out[f"{case}|scale"] = np.array(model.scale)
        out[f"{case}|output"] = y.numpy()
        out[f"{case}|shapes"] = np.array(json.dumps(shapes))
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
