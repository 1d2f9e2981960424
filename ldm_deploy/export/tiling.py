"""AUTOMATIC1111's "Tiling": images that tile seamlessly (textures, wallpapers, patterns).

Every 2-D convolution of the U-Net and the VAE (encoder and decoder) pads circularly, torch's
padding_mode "circular", as AUTOMATIC1111's model hijack sets every Conv2d of the checkpoint:
the image's right edge then continues its left one and its bottom its top, since each layer sees
the far side where it would have seen zeros. The text encoder has no convolutions; ControlNets keep
their zero padding (the ControlNet extension's models are not the checkpoint's, so its Tiling leaves
them so too). It changes the graphs, not the weights: an engine tiles or it does not
(`ModelInfo.tiling`). The ONNX export writes the wrap as Slice and Concat, which every backend
runs; the Winograd rewrite leaves such convolutions alone (winograd.applies).
"""

from __future__ import annotations

from torch import nn


def make_seamless(*modules: nn.Module) -> int:
    """Set the padded convolutions of `modules` to pad circularly, in place; -> how many."""
    count = 0
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d) and any(layer._reversed_padding_repeated_twice):
                layer.padding_mode = "circular"
                count += 1
    return count
