"""The upscale networks that AUTOMATIC1111's and ComfyUI's ESRGAN-type upscalers run, rebuilt from
their weight files' names and shapes (no code from the file: safetensors, or a pickle read only with
--allow-pickle).

RRDBNet (ESRGAN, Wang et al. 2018; Real-ESRGAN and its fine-tunes: 4x-UltraSharp, NMKD, ...):

    feat = conv_first(x)                         (Real-ESRGAN x2 / x1: x pixel-unshuffled by 2 / 4 first)
    feat = feat + conv_body(RRDB^n(feat))        RRDB(x) = x + 0.2 * RDB3(RDB2(RDB1(x)))
    feat = lrelu(conv_up_i(nearest_2x(feat)))    once per doubling (two for 4x)
    out  = conv_last(lrelu(conv_hr(feat)))

with RDB(x) = x + 0.2 * conv5([x, x1, x2, x3, x4]), each x_k = lrelu(conv_k([x, x1, ..., x_{k-1}])) growing
by gc channels, and lrelu a leaky ReLU of slope 0.2. Files come in two layouts: the original
ESRGAN's ("model.0", "model.1.sub.N.RDB1.conv1.0", ...) and BasicSR's ("conv_first", "body.N.rdb1.conv1",
...; BSRGAN's "RRDB_trunk" / "trunk_conv"); the old one is renamed to the new.

SRVGGNetCompact (Real-ESRGAN's "realesr-general-x4v3", "realesr-animevideov3"): a plain stack of 3x3
convolutions with PReLUs, its last one giving out * s^2 channels that pixel-shuffle to s times the
size, added to the input enlarged by nearest neighbour.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.nn import functional as F

from ldm_deploy.errors import ModelSourceError

# The original ESRGAN names -> BasicSR's, for the parts whose place does not depend on the scale.
OLD_BLOCK = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)")
BSRGAN_BLOCK = re.compile(r"RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\.(weight|bias)")


def build(state: dict):
    """(torch module in eval mode, scale, architecture name) for an upscaler's weights; a
    ModelSourceError where they are not a network this file knows (or are damaged)."""
    state = unwrap(state)
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelSourceError("not a file of named weights (it holds other things than name -> tensor)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        return recognised(state)
    except (KeyError, ValueError, IndexError, TypeError) as e:  # a weight missing, a layout cut short
        raise ModelSourceError(f"its weights do not make a whole network ({type(e).__name__}: {str(e)[:200]})") from None


def recognised(state: dict):
    """build() of weights already unwrapped and named."""
    if any(".conv1x1." in k for k in state):
        raise ModelSourceError("an ESRGAN+ network (its blocks have 1x1 convolutions), not offered here; RRDBNet "
                               "(ESRGAN, Real-ESRGAN, 4x-UltraSharp, ...) and SRVGGNetCompact are")
    if "model.0.weight" in state and any(OLD_BLOCK.fullmatch(k) for k in state):
        state = renamed_old(state)
    elif "conv_first.weight" in state and any(BSRGAN_BLOCK.fullmatch(k) for k in state):
        state = renamed_bsrgan(state)
    if "conv_first.weight" in state and "body.0.rdb1.conv1.weight" in state:
        net = rrdbnet(state)
        arch = "ESRGAN"
    elif "body.0.weight" in state and "body.1.weight" in state and state["body.1.weight"].ndim == 1:
        net = compact(state)
        arch = "SRVGGNetCompact"
    elif "body.0.weight" in state and state["body.0.weight"].ndim == 4 and "body.2.weight" in state:
        raise ModelSourceError("an SRVGGNetCompact without PReLU weights (ReLU or LeakyReLU activations), which its "
                               "file does not say; only the PReLU one (Real-ESRGAN's releases) is offered here")
    else:
        raise ModelSourceError(f"not an upscaler network known here (it holds {', '.join(list(state)[:3])}, ...); "
                               "RRDBNet (ESRGAN, Real-ESRGAN, 4x-UltraSharp, ...) and SRVGGNetCompact are")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:  # a weight missing, left over or of another shape
        raise ModelSourceError(f"its {arch} weights do not fit together ({str(e).splitlines()[0][:200]})") from None
    return net.eval(), net.scale, arch


def unwrap(state: dict) -> dict:
    """The weights of a file that nests them (Real-ESRGAN's "params_ema" / "params", trainers' "state_dict")."""
    for key in ("params_ema", "params-ema", "params", "state_dict", "model", "net"):
        if isinstance(state.get(key), dict):
            return state[key]
    return state


def renamed_old(state: dict) -> dict:
    """The original ESRGAN's names -> BasicSR's. Its sequence: model.0 conv_first, model.1 the body
    (blocks, then the trunk conv at sub.N), then per doubling [upsample, conv, lrelu] at model.2-4,
    5-7, ..., then conv_hr and lrelu, then conv_last."""
    convs = sorted({int(m.group(1)) for k in state if (m := re.fullmatch(r"model\.(\d+)\.weight", k))})
    blocks = max(int(OLD_BLOCK.fullmatch(k).group(1)) for k in state if OLD_BLOCK.fullmatch(k)) + 1
    ups, (hr, last) = convs[1:-2], convs[-2:]  # convs: 0, the upsampling ones, conv_hr, conv_last
    names = {0: "conv_first", hr: "conv_hr", last: "conv_last", **{i: f"conv_up{n}" for n, i in enumerate(ups, 1)}}
    out = {}
    for k, v in state.items():
        if m := OLD_BLOCK.fullmatch(k):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = v
        elif m := re.fullmatch(rf"model\.1\.sub\.{blocks}\.(weight|bias)", k):
            out[f"conv_body.{m[1]}"] = v
        elif (m := re.fullmatch(r"model\.(\d+)\.(weight|bias)", k)) and int(m[1]) in names:
            out[f"{names[int(m[1])]}.{m[2]}"] = v
        else:
            out[k] = v  # left for load_state_dict to refuse
    return out


def renamed_bsrgan(state: dict) -> dict:
    """BSRGAN's / RealSR's names (RRDB_trunk, trunk_conv, upconv1, HRconv) -> BasicSR's."""
    out = {}
    for k, v in state.items():
        if m := BSRGAN_BLOCK.fullmatch(k):
            k = f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"
        k = re.sub(r"^trunk_conv\.", "conv_body.", k)
        k = re.sub(r"^upconv(\d)\.", r"conv_up\1.", k)
        out[re.sub(r"^HRconv\.", "conv_hr.", k)] = v
    return out


def rgb(in_ch: int, out_ch: int) -> None:
    if (in_ch, out_ch) != (3, 3):
        raise ModelSourceError(f"a network of {in_ch} channels in and {out_ch} out; the hires fix upscales RGB "
                               "images (3 and 3)")


def rrdbnet(state: dict):
    """An RRDBNet shaped as the weights say."""
    first = state["conv_first.weight"]  # (nf, in, 3, 3)
    nf, in_ch = first.shape[:2]
    out_ch = state["conv_last.weight"].shape[0]
    blocks = len({k.split(".")[1] for k in state if k.startswith("body.")})
    gc = state["body.0.rdb1.conv1.weight"].shape[0]
    ups = len([k for k in state if re.fullmatch(r"conv_up\d\.weight", k)])
    shuffle = math.isqrt(in_ch // out_ch) if in_ch in (4 * out_ch, 16 * out_ch) else 1  # Real-ESRGAN x2, x1
    rgb(in_ch // shuffle**2, out_ch)
    if 2**ups < shuffle or ups > 3:
        raise ModelSourceError(f"an RRDBNet of {ups} upsampling layers after a {shuffle}x unshuffle: no upscaler")
    return RRDBNet(in_ch, out_ch, nf, blocks, gc, ups, shuffle)


def compact(state: dict):
    """An SRVGGNetCompact shaped as the weights say (body.0 conv, body.1 PReLU, ..., body.last conv)."""
    convs = sorted(int(k.split(".")[1]) for k in state if re.fullmatch(r"body\.\d+\.weight", k)
                   and state[k].ndim == 4)
    first, last = state["body.0.weight"], state[f"body.{convs[-1]}.weight"]
    nf, in_ch = first.shape[:2]
    rgb(in_ch, 3)
    scale = math.isqrt(last.shape[0] // in_ch)
    if scale * scale * in_ch != last.shape[0] or scale < 1:
        raise ModelSourceError(f"an SRVGGNetCompact whose last convolution gives {last.shape[0]} channels, no "
                               f"{in_ch}-channel image at a whole scale")
    return Compact(in_ch, nf, len(convs) - 2, scale)


def lrelu(x):
    return F.leaky_relu(x, 0.2)


class RDB(nn.Module):
    """Residual dense block: five 3x3 convolutions, each seeing the block's input and every earlier output."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        for k in range(1, 6):
            setattr(self, f"conv{k}", nn.Conv2d(nf + (k - 1) * gc, gc if k < 5 else nf, 3, 1, 1))

    def forward(self, x):
        seen = [x]
        for k in range(1, 5):
            seen.append(lrelu(getattr(self, f"conv{k}")(torch.cat(seen, 1))))
        return x + 0.2 * self.conv5(torch.cat(seen, 1))


class RRDB(nn.Module):
    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = RDB(nf, gc), RDB(nf, gc), RDB(nf, gc)

    def forward(self, x):
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """(B, in / shuffle^2, H, W) -> (B, out, H * 2^ups / shuffle, W * 2^ups / shuffle)."""

    def __init__(self, in_ch: int, out_ch: int, nf: int, blocks: int, gc: int, ups: int, shuffle: int = 1):
        super().__init__()
        self.shuffle, self.scale = shuffle, 2**ups // shuffle
        self.conv_first = nn.Conv2d(in_ch, nf, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(nf, gc) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        for n in range(1, ups + 1):
            setattr(self, f"conv_up{n}", nn.Conv2d(nf, nf, 3, 1, 1))
        self.ups = ups
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, out_ch, 3, 1, 1)

    def forward(self, x):
        if self.shuffle > 1:
            x = F.pixel_unshuffle(x, self.shuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for n in range(1, self.ups + 1):
            feat = lrelu(getattr(self, f"conv_up{n}")(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(lrelu(self.conv_hr(feat)))


class Compact(nn.Module):
    """SRVGGNetCompact: (B, C, H, W) -> (B, C, s * H, s * W)."""

    def __init__(self, ch: int, nf: int, inner: int, scale: int):
        super().__init__()
        layers = [nn.Conv2d(ch, nf, 3, 1, 1), nn.PReLU(nf)]
        for _ in range(inner):
            layers += [nn.Conv2d(nf, nf, 3, 1, 1), nn.PReLU(nf)]
        self.body = nn.Sequential(*layers, nn.Conv2d(nf, ch * scale * scale, 3, 1, 1))
        self.scale = scale

    def forward(self, x):
        out = F.pixel_shuffle(self.body(x), self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")
