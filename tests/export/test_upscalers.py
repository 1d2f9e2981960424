"""Upscale models (ldm-export --upscaler): our networks against spandrel's answers, their ONNX graphs,
the names and files refused, and AUTOMATIC1111's tiling and passes (engine/upscale.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from make_upscaler_oracle import OUT as ORACLE
from make_upscaler_oracle import weights
from PIL import Image
from safetensors.torch import save_file

from ldm_deploy.engine import upscale
from ldm_deploy.errors import ModelSourceError
from ldm_deploy.export import upscale_nets, upscalers


def oracle_cases():
    data = np.load(ORACLE)
    names = sorted({k.split("|")[0] for k in data.files if "|" in k})
    return data, names


DATA, CASES = oracle_cases()


def state_of(case: str) -> dict:
    shapes = json.loads(str(DATA[f"{case}|shapes"]))
    return {k: torch.from_numpy(v) for k, v in weights(shapes, int(DATA[f"{case}|seed"])).items()}


@pytest.mark.parametrize("case", CASES)
def test_networks_give_what_spandrel_gives(case):
    """Each layout (the original ESRGAN's names, BasicSR's, BSRGAN's; Real-ESRGAN's unshuffled x2;
    SRVGGNetCompact) rebuilt from its weights' names and shapes gives spandrel's output."""
    state = state_of(case)
    if case.startswith("realesrgan"):
        state = {"params_ema": state}  # as Real-ESRGAN's release files nest them
    net, scale, arch = upscale_nets.build(state)
    assert scale == int(DATA[f"{case}|scale"]) and arch == ("SRVGGNetCompact" if "compact" in case else "ESRGAN")
    with torch.no_grad():
        ours = net(torch.from_numpy(DATA["input"])).numpy()
    want = DATA[f"{case}|output"]
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-5 * np.abs(want).max())


def save(tmp_path: Path, case: str, name: str | None = None) -> Path:
    path = tmp_path / f"{name or case}.safetensors"
    save_file({k: v.contiguous() for k, v in state_of(case).items()}, path)
    return path


def test_onnx_graph_runs_the_network_at_any_size(tmp_path):
    import onnxruntime as ort

    cases = {"4x-Mine": "realesrgan_x2plus", "R-ESRGAN 4x+": "compact_4x"}
    prepared = upscalers.prepare([(str(save(tmp_path, "realesrgan_x2plus", "4x-Mine")), None),
                                  (str(save(tmp_path, "compact_4x")), "R-ESRGAN 4x+")], allow_pickle=False)
    records = upscalers.export(prepared, tmp_path)
    assert records["4x-Mine"]["scale"] == 2 and records["R-ESRGAN 4x+"]["architecture"] == "SRVGGNetCompact"
    assert records["R-ESRGAN 4x+"]["file"] == "upscaler_R-ESRGAN_4x_.onnx"
    for name, record in records.items():
        net, scale, _ = upscale_nets.build(state_of(cases[name]))
        session = ort.InferenceSession(str(tmp_path / record["file"]), providers=["CPUExecutionProvider"])
        for h, w in ((6, 8), (34, 22)):  # not the traced size (even: the x2 layout unshuffles by 2)
            x = np.random.default_rng(h).random((1, 3, h, w), dtype=np.float32)
            got = session.run(None, {"image": x})[0]
            with torch.no_grad():
                want = net(torch.from_numpy(x)).numpy()
            assert got.shape == (1, 3, h * scale, w * scale)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_files_and_names_that_are_refused(tmp_path):
    good = str(save(tmp_path, "esrgan_2x_original_names"))
    for spec, match in (
        ((str(tmp_path / "missing.pth"), None), "no such file"),
        ((good, "Latent"), "'Latent' is a built-in upscaler's name"),
        ((good, "a, b: c"), "would not survive PNG parameters"),
        ((good, "My model "), "would not survive PNG parameters"),  # (PNG values lose end spaces)
    ):
        with pytest.raises(ModelSourceError, match=match):
            upscalers.prepare([spec], allow_pickle=False)
    with pytest.raises(ModelSourceError, match="another --upscaler is named 'x y' or alike"):
        upscalers.prepare([(good, "x_y"), (good, "x y")], allow_pickle=False)
    assert upscalers.parse_spec(f"{good}:4x Sharp") == (good, "4x Sharp")
    assert upscalers.parse_spec(good) == (good, None)
    # Pickles only when asked; a LoRA (or anything else) is no upscaler; an ESRGAN that keeps the size neither.
    pth = tmp_path / "4x-Old.pth"
    torch.save({"params_ema": state_of("realesrgan_x4plus")}, pth)
    with pytest.raises(ModelSourceError, match="pickle"):
        upscalers.prepare([(str(pth), None)], allow_pickle=False)
    assert upscalers.prepare([(str(pth), None)], allow_pickle=True)[0][2]["scale"] == 4
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(4, 4)}, lora)
    with pytest.raises(ModelSourceError, match="not an upscaler network known here"):
        upscalers.prepare([(str(lora), None)], allow_pickle=False)
    one = {k: v for k, v in state_of("realesrgan_x4plus").items()}
    one["conv_first.weight"] = torch.zeros(8, 48, 3, 3)  # unshuffled by 4 then 4x: 1x
    save_file(one, tmp_path / "1x.safetensors")
    with pytest.raises(ModelSourceError, match="a 1x ESRGAN network .* not an upscaler"):
        upscalers.prepare([(str(tmp_path / "1x.safetensors"), None)], allow_pickle=False)
    # damaged or other networks: said, no traceback
    four = dict(state_of("realesrgan_x4plus"))
    four["conv_last.weight"], four["conv_last.bias"] = torch.zeros(4, 8, 3, 3), torch.zeros(4)
    no_last = {k: v for k, v in state_of("realesrgan_x4plus").items() if not k.startswith("conv_last")}
    cut = {k: v for k, v in state_of("esrgan_4x_original_names").items()
           if k.startswith(("model.0.", "model.1.sub.0.RDB1."))}
    plain = {k: v for k, v in state_of("compact_2x").items() if v.ndim == 4}  # ReLUs: no PReLU weights
    wrong = dict(state_of("realesrgan_x4plus"))
    wrong["conv_hr.weight"] = torch.zeros(8, 7, 3, 3)
    for name, state, match in (("rgba", four, "3 channels in and 4 out; the hires fix upscales RGB"),
                               ("no_last", no_last, "do not make a whole network .KeyError: 'conv_last.weight'"),
                               ("cut", cut, "do not make a whole network"),
                               ("relu", plain, "SRVGGNetCompact without PReLU weights"),
                               ("wrong", wrong, "weights do not fit together")):
        save_file(state, tmp_path / f"{name}.safetensors")
        with pytest.raises(ModelSourceError, match=match):
            upscalers.prepare([(str(tmp_path / f"{name}.safetensors"), None)], allow_pickle=False)
    torch.save({0: torch.zeros(1)}, tmp_path / "odd.pth")
    with pytest.raises(ModelSourceError, match="not a file of named weights"):
        upscalers.prepare([(str(tmp_path / "odd.pth"), None)], allow_pickle=True)


class Pixelwise:
    """A model that sees each pixel alone (a colour change, then nearest-neighbour enlargement): its
    tiled result must equal its whole-image result, wherever the tiles fall."""

    name, scale = "pixelwise", 2

    def __call__(self, x):
        y = (1 - x) ** 2
        return y.repeat(self.scale, axis=2).repeat(self.scale, axis=3)


@pytest.mark.parametrize("size", [(61, 45), (20, 12), (32, 32)])
def test_tiles_put_back_together_are_the_whole_image(size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    whole = upscale.one_pass(image, Pixelwise(), tile=0)
    tiled = upscale.one_pass(image, Pixelwise(), tile=24, overlap=6)  # smaller images: a padded tile
    assert tiled.size == whole.size == (size[0] * 2, size[1] * 2)
    np.testing.assert_array_equal(np.asarray(tiled), np.asarray(whole))


class TileMark:
    """A model whose every tile comes out one flat grey of its own (30, 60, 90, ...), so that what
    each output pixel took from which tile shows."""

    name, scale = "marks", 2

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return np.full((1, 3, x.shape[2] * 2, x.shape[3] * 2), self.calls * 30 / 255, np.float32)


def test_overlaps_fade_from_one_tile_into_the_next():
    """Tiles of 24 overlapping by 6 over a 40 x 40 image (x2): starts 0 and 16 each way, so in the
    output the second tile fades in over x (and y) 32..43 on an 8-bit ramp and holds from 44 on."""
    image = Image.new("RGB", (40, 40))
    out = np.asarray(upscale.one_pass(image, TileMark(), tile=24, overlap=6))[..., 0].astype(int)
    ramp = (np.arange(12) * 255 / 12).astype(np.uint8).astype(int)  # the mask over the 12 px overlap
    row = out[0]  # the first row of tiles: 30 then 60
    assert (row[:32] == 30).all() and (row[44:] == 60).all()
    assert np.abs(row[32:44] - (30 + (60 - 30) * ramp / 255)).max() <= 1  # (PIL rounds its blend)
    assert (np.diff(row[32:44]) >= 0).all() and row[32] == 30
    column = out[:, 0]  # down the first column: the first row's 30, then the second row's 90
    assert (column[:32] == 30).all() and (column[44:] == 90).all()
    assert np.abs(column[32:44] - (30 + (90 - 30) * ramp / 255)).max() <= 1


def test_tiles_fall_where_automatic1111_puts_them():
    assert upscale.starts(512, 192, 8) == [0, 160, 320]  # 3 tiles; the last flush with the edge
    assert upscale.starts(192, 192, 8) == [0]
    assert upscale.starts(200, 192, 8) == [0, 8]
    assert upscale.starts(100, 192, 8) == [-92]  # shorter than a tile: padded past its top left
    for side in range(9, 700, 7):
        at = upscale.starts(side, 192, 8)
        assert at[-1] == side - 192 and all(b - a <= 184 for a, b in zip(at, at[1:]))  # overlaps >= 8


def test_passes_reach_the_size_then_lanczos():
    """AUTOMATIC1111's Upscaler.upscale: the model's passes until the image covers the size (a 2x
    model twice for 3x), then Lanczos down to it; resize_image then to the exact target."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    model = Pixelwise()
    twice = upscale.one_pass(upscale.one_pass(image, model, 0), model, 0)
    got = upscale.resize(image, 150, 120, model, tile=0)  # 3x: 150 -> 144 (x8), then 150
    want = twice.resize((144, 120), resample=Image.LANCZOS).resize((150, 120), resample=Image.LANCZOS)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # 81 / 40 = 2.025x: one pass (100x80) covers int(side x 2.025) // 8 * 8 = 96x80, then 100x81
    got = upscale.resize(image, 100, 81, model, tile=0)
    want = upscale.one_pass(image, model, 0).resize((96, 80), resample=Image.LANCZOS).resize((100, 81), Image.LANCZOS)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # 376 x 64 to 384 x 64 (x 1.02): its size cut to 8s, 376, is the image's already: no model pass, Lanczos alone
    wide = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 376, 3), dtype=np.uint8))
    marks = TileMark()
    got = upscale.resize(wide, 384, 64, marks, tile=0)
    assert marks.calls == 0
    np.testing.assert_array_equal(np.asarray(got), np.asarray(wide.resize((384, 64), resample=Image.LANCZOS)))
