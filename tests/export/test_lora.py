"""LoRA files merged at export: each layer a file names moves by exactly weight * alpha / rank *
up @ down, every other weight stays, in the kohya and the diffusers / PEFT layouts alike; files for
other architectures or of other kinds are refused by name."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from ldm_deploy.cli import export as export_cli
from ldm_deploy.errors import ModelSourceError
from ldm_deploy.export.build import load_model
from ldm_deploy.export.config import ExportConfig
from ldm_deploy.export.lora import parse_spec
from ldm_deploy.export.source import load_source

# (component, layer): a linear attention projection, SD 1.x's 1x1-conv proj_in, a 3x3 resnet
# convolution (a "LoCon" LoRA), and a text encoder projection.
LAYERS = [("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
          ("unet", "down_blocks.0.attentions.0.proj_in"),
          ("unet", "up_blocks.1.resnets.0.conv1"),
          ("text_encoder", "encoder.layers.1.self_attn.v_proj")]
RANK, ALPHA = 4, 2.0


def designed(model) -> dict:
    """(component, layer) -> (down, up) of the right shapes, random."""
    g = torch.Generator().manual_seed(5)
    out = {}
    for component, name in LAYERS:
        w = getattr(model, component).get_submodule(name).weight
        down_shape = (RANK, w.shape[1], *w.shape[2:])
        up_shape = (w.shape[0], RANK, *([1, 1] if w.ndim == 4 else []))
        out[component, name] = (torch.randn(down_shape, generator=g), torch.randn(up_shape, generator=g))
    return out


def kohya_file(path, pairs: dict) -> None:
    state = {}
    for (component, name), (down, up) in pairs.items():
        text_name = "text_model." + name if component == "text_encoder" else name  # as sd-scripts names it
        key = f"lora_{'unet' if component == 'unet' else 'te'}_{text_name.replace('.', '_')}"
        state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)}
    save_file(state, str(path))


def peft_file(path, pairs: dict) -> None:
    state = {}
    for (component, name), (down, up) in pairs.items():
        state |= {f"{component}.{name}.lora_A.weight": down, f"{component}.{name}.lora_B.weight": up,
                  f"{component}.{name}.alpha": torch.tensor(ALPHA)}
    save_file(state, str(path))


def params(src) -> dict:
    return {(m, k): v.clone() for m in ("unet", "text_encoder", "vae") for k, v in getattr(src, m).state_dict().items()}


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_lora_moves_exactly_the_layers_it_names(layout, model_dirs, tmp_path):
    model = str(model_dirs["tiny-sd1"])
    base = load_source(model)
    pairs = designed(base)
    path = tmp_path / "style.safetensors"
    (kohya_file if layout == "kohya" else peft_file)(path, pairs)
    before = params(base)
    src = load_model(model, ExportConfig(loras=((str(path), 0.7),)))
    after = params(src)
    changed = {(c, f"{name}.weight") for c, name in LAYERS}
    for key, value in after.items():
        if key in changed:
            down, up = pairs[key[0], key[1].removesuffix(".weight")]
            delta = (up.reshape(up.shape[0], -1) @ down.reshape(RANK, -1)).reshape(value.shape)
            torch.testing.assert_close(value, before[key] + 0.7 * ALPHA / RANK * delta, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(value, before[key]), key
    assert src.weights_sha256 != base.weights_sha256


def test_two_loras_add_up_and_weights_count(model_dirs, tmp_path):
    model = str(model_dirs["tiny-sd1"])
    base = load_source(model)
    kohya_file(tmp_path / "a.safetensors", designed(base))
    one = params(load_model(model, ExportConfig(loras=((str(tmp_path / "a.safetensors"), 1.0),))))
    twice = load_model(model, ExportConfig(loras=((str(tmp_path / "a.safetensors"), 0.5),) * 2))
    key = ("unet", "down_blocks.0.attentions.0.proj_in.weight")
    torch.testing.assert_close(params(twice)[key], one[key], rtol=1e-5, atol=1e-5)


def test_lora_for_another_architecture_or_of_another_kind(model_dirs, tmp_path):
    model = str(model_dirs["tiny-sd1"])
    pairs = designed(load_source(model))
    sd2 = load_source(str(model_dirs["tiny-sd2"]))  # tiny-sd2's layers have other widths
    kohya_file(tmp_path / "sd1.safetensors", pairs)
    with pytest.raises(ModelSourceError, match="another architecture"):
        lora_merge(sd2, tmp_path / "sd1.safetensors")
    save_file({"lora_unet_input_blocks_9_1_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_input_blocks_9_1_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(tmp_path / "ldm.safetensors"))
    with pytest.raises(ModelSourceError, match="1 of its 1 layers are not in this model"):  # no 9th input block
        lora_merge(load_source(model), tmp_path / "ldm.safetensors")
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(ModelSourceError, match="LoHa"):
        lora_merge(load_source(model), tmp_path / "loha.safetensors")
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4)}, str(tmp_path / "ckpt.safetensors"))
    with pytest.raises(ModelSourceError, match="holds no LoRA weights"):
        lora_merge(load_source(model), tmp_path / "ckpt.safetensors")


def lora_merge(src, path, weight=1.0):
    from ldm_deploy.export import lora

    lora.merge(src, [(str(path), weight)], allow_pickle=False)


def test_lora_spec_and_cli(model_dirs, tmp_path, capsys):
    assert parse_spec("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_spec("style.safetensors:0.6") == ("style.safetensors", 0.6)
    assert parse_spec(r"C:\loras\style.safetensors") == (r"C:\loras\style.safetensors", 1.0)
    model = str(model_dirs["tiny-sd1"])
    kohya_file(tmp_path / "s.safetensors", designed(load_source(model)))
    args = ["--model", model, "--min-size", "64", "--max-size", "64", "--no-img2img"]
    assert export_cli.main(args + ["--out", str(tmp_path / "plain")]) == 0
    assert export_cli.main(args + ["--out", str(tmp_path / "lora"), "--lora", f"{tmp_path / 's.safetensors'}:0.8",
                                   "--vae", str(model_dirs["tiny-sd2"] / "vae")]) == 0
    plain, merged = (json.loads((tmp_path / e / "manifest.json").read_text())["model"] for e in ("plain", "lora"))
    assert plain["weights_sha256"] != merged["weights_sha256"]
    # AUTOMATIC1111's "Model hash" names the model before its LoRAs and VAE: the same for both
    assert merged["checkpoint_sha256"] == plain["checkpoint_sha256"] == plain["weights_sha256"]
    # the manifest says what is baked in; the PNG names the VAE as AUTOMATIC1111 does
    sha = hashlib.sha256((tmp_path / "s.safetensors").read_bytes()).hexdigest()
    assert [{k: v for k, v in lora.items() if k != "a1111_hash"} for lora in merged["loras"]] == [
        {"name": "s", "weight": 0.8, "sha256": sha}] and plain["loras"] == []
    assert (merged["vae"], plain["vae"]) == ("vae", "")
    from ldm_deploy import Pipeline

    png = Pipeline.load(tmp_path / "lora")("a cat", steps=1, width=64, height=64, progress=False)[0]
    assert "VAE: vae" in png.info["parameters"]
    assert f"Model hash: {plain['weights_sha256'][:10]}" in png.info["parameters"]
    code = export_cli.main(args + ["--out", str(tmp_path / "x"), "--lora", str(tmp_path / "none.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "no such file" in err and "Traceback" not in err and not (tmp_path / "x").exists()


def test_kohya_names_reach_the_layers_diffusers_reads_them_as(model_dirs):
    """diffusers' own reading of kohya names (its legacy attention-processor spelling undone) is
    the oracle for ours: both must land on the same layer of the model."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    from ldm_deploy.export.lora import layers

    src = load_source(str(model_dirs["tiny-sd1"]))
    names = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
             "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_up_blocks_1_resnets_0_conv1",
             "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
             "lora_te_text_model_encoder_layers_1_self_attn_v_proj", "lora_te_text_model_encoder_layers_0_mlp_fc1"]
    state = {f"{n}.{side}.weight": torch.zeros(1) for n in names for side in ("lora_down", "lora_up")}
    converted, _ = _convert_non_diffusers_lora_to_diffusers(state)
    theirs = set()
    for key in (k.removesuffix(".down.weight") for k in converted if k.endswith(".down.weight")):
        component, _, name = key.replace(".processor", "").partition(".")
        for q in ("q", "k", "v", "out"):  # the legacy attention-processor spelling
            name = name.replace(f".to_{q}_lora", f".{q}_proj" if component == "text_encoder" else
                                f".to_{q}" + (".0" if q == "out" else ""))
        name = name.removesuffix(".lora_linear_layer").removesuffix(".lora")
        module = getattr(src, component)
        theirs.add((component, module.get_submodule(
            name if hasattr(module, "text_model") else name.removeprefix("text_model."))))
    ours = {("unet" if n.startswith("lora_unet_") else "text_encoder",
             layers(src.unet if n.startswith("lora_unet_") else src.text_encoder)[n.split("_", 2)[2]]) for n in names}
    assert {(c, id(m)) for c, m in ours} == {(c, id(m)) for c, m in theirs} and len(ours) == len(names)


def diffusers_spellings_file(path, pairs: dict, fp16: bool) -> None:
    """The spellings diffusers' training scripts wrote before PEFT, fp16, alphas only in the
    lora_adapter_metadata header (r 4, lora_alpha 2: half strength)."""
    state = {}
    for (component, name), (down, up) in pairs.items():
        if name.endswith("attn1.to_q"):
            stem = f"{component}.{name.removesuffix('.to_q')}.processor.to_q_lora"
        elif name.endswith("self_attn.v_proj"):
            stem = f"{component}.text_model.{name.removesuffix('.v_proj')}.to_v_lora"
        else:
            stem = f"{component}.{name}.lora_linear_layer"
        state |= {f"{stem}.down.weight": down, f"{stem}.up.weight": up}
    if fp16:
        state = {k: v.half() for k, v in state.items()}
    meta = {"unet.r": RANK, "unet.lora_alpha": ALPHA, "text_encoder.r": RANK, "text_encoder.lora_alpha": ALPHA}
    save_file(state, str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})


def test_other_spellings_te1_fp16_and_header_alphas(model_dirs, tmp_path):
    """The same deltas under diffusers' older spellings (fp16, header alphas) and kohya's lora_te1_
    move the layers as the plain kohya file does; a kohya file without alphas merges at full
    strength (alpha = rank)."""
    model = str(model_dirs["tiny-sd1"])
    base = load_source(model)
    pairs = designed(base)
    kohya_file(tmp_path / "k.safetensors", pairs)
    want = params(load_model(model, ExportConfig(loras=((str(tmp_path / "k.safetensors"), 1.0),))))
    half = {k: (d.half().float(), u.half().float()) for k, (d, u) in pairs.items()}
    diffusers_spellings_file(tmp_path / "d.safetensors", half, fp16=True)
    kohya_file(tmp_path / "kh.safetensors", half)
    want_half = params(load_model(model, ExportConfig(loras=((str(tmp_path / "kh.safetensors"), 1.0),))))
    got = params(load_model(model, ExportConfig(loras=((str(tmp_path / "d.safetensors"), 1.0),))))
    assert all(torch.allclose(got[k], want_half[k], rtol=1e-5, atol=1e-5) for k in want_half)
    from safetensors.torch import load_file

    te1 = {k.replace("lora_te_", "lora_te1_"): v for k, v in load_file(tmp_path / "k.safetensors").items()}
    save_file(te1, str(tmp_path / "te1.safetensors"))
    got = params(load_model(model, ExportConfig(loras=((str(tmp_path / "te1.safetensors"), 1.0),))))
    assert all(torch.equal(got[k], want[k]) for k in want)
    no_alpha = {k: v for k, v in load_file(tmp_path / "k.safetensors").items() if not k.endswith(".alpha")}
    save_file(no_alpha, str(tmp_path / "na.safetensors"))
    got = params(load_model(model, ExportConfig(loras=((str(tmp_path / "na.safetensors"), ALPHA / RANK),))))
    assert all(torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-5) for k in want)


@pytest.mark.parametrize("extra,message", [
    ({"lora_unet_x.lora_magnitude_vector": (8,)}, "DoRA"),
    ({"lora_unet_x.lora_mid.weight": (4, 4, 3, 3)}, "Tucker"),
    ({"bundle_emb.style.string_to_param.*": (1, 32)}, "bundled embeddings"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_up.bias": (16,)}, "no LoRA layout we read"),
])
def test_files_holding_more_than_lora_pairs_are_refused(extra, message, model_dirs, tmp_path):
    model = str(model_dirs["tiny-sd1"])
    path = tmp_path / "x.safetensors"
    kohya_file(path, designed(load_source(model)))
    from safetensors.torch import load_file

    save_file({**load_file(path), **{k: torch.zeros(s) for k, s in extra.items()}}, str(path))
    with pytest.raises(ModelSourceError, match=message):
        lora_merge(load_source(model), path)


def test_bad_shapes_and_weights(model_dirs, tmp_path):
    model = str(model_dirs["tiny-sd1"])
    src = load_source(model)
    layer = "down_blocks.0.resnets.0.time_emb_proj"  # [32, 128]: a transposed delta has its numel
    w = src.unet.get_submodule(layer).weight
    key = "lora_unet_" + layer.replace(".", "_")
    save_file({f"{key}.lora_down.weight": torch.ones(RANK, w.shape[0]),
               f"{key}.lora_up.weight": torch.ones(w.shape[1], RANK)}, str(tmp_path / "t.safetensors"))
    with pytest.raises(ModelSourceError, match="another architecture"):
        lora_merge(src, tmp_path / "t.safetensors")
    save_file({f"{key}.lora_down.weight": torch.ones(RANK, w.shape[1]),
               f"{key}.lora_up.weight": torch.ones(w.shape[0], RANK + 1)}, str(tmp_path / "r.safetensors"))
    with pytest.raises(ModelSourceError, match="do not chain"):
        lora_merge(src, tmp_path / "r.safetensors")
    with pytest.raises(ModelSourceError, match="is a folder"):
        lora_merge(src, tmp_path)
    from ldm_deploy.errors import UserError

    with pytest.raises(UserError, match="finite"):
        parse_spec("style.safetensors:inf")
    (tmp_path / "style.safetensors").write_bytes(b"")  # (a file there: "abc" is a weight mistyped)
    with pytest.raises(UserError, match=r"its weight 'abc' is not a number \(FILE:WEIGHT, e.g. .*style.safetensors:0.8\)"):
        parse_spec(f"{tmp_path / 'style.safetensors'}:abc")


def test_ldm_run_model_merges_vae_lora_and_embedding_into_its_cached_engine(model_dirs, tmp_path, monkeypatch,
                                                                          capsys):
    from ldm_deploy.cli import run as run_cli

    monkeypatch.setenv("LDM_DEPLOY_CACHE", str(tmp_path / "cache"))
    model, vae = str(model_dirs["tiny-sd1"]), str(model_dirs["tiny-sd2"] / "vae")
    kohya_file(tmp_path / "s.safetensors", designed(load_source(model)))
    save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "myneg7.safetensors"))
    assert export_cli.main(["--model", model, "--min-size", "64", "--max-size", "64", "--no-img2img",
                            "--out", str(tmp_path / "lora"), "--lora", f"{tmp_path / 's.safetensors'}:0.8",
                            "--vae", vae, "--embedding", str(tmp_path / "myneg7.safetensors")]) == 0
    exported = json.loads((tmp_path / "lora" / "manifest.json").read_text())["model"]

    def run(*flags):
        args = ["a cat", "--model", model, "--steps", "1", "--width", "256", "--height", "256", "-q",
                "--out", str(tmp_path / "x.png"), *flags]
        assert run_cli.main(args) == 0, capsys.readouterr().err
        return sorted(p.name for p in (tmp_path / "cache" / "engines").iterdir())

    engines = run("--lora", f"{tmp_path / 's.safetensors'}:0.8", "--vae", vae, "--embedding",
                  str(tmp_path / "myneg7.safetensors"))
    cached = json.loads((tmp_path / "cache" / "engines" / engines[0] / "manifest.json").read_text())["model"]
    # PNGs carry AUTOMATIC1111's "Lora hashes": of a .safetensors file, the SHA-256 past its header
    data = (tmp_path / "s.safetensors").read_bytes()
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    assert exported["loras"][0]["a1111_hash"] == addnet != exported["loras"][0]["sha256"]
    from PIL import Image

    assert f'Lora hashes: "s: {addnet[:12]}"' in Image.open(tmp_path / "x.png").info["parameters"]
    # the same weights as ldm-export merges, and the manifest says so
    assert (cached["weights_sha256"], cached["loras"], cached["vae"], cached["embeddings"]) == (
        exported["weights_sha256"], exported["loras"], exported["vae"], exported["embeddings"])
    # a relative path to the same files finds the same engine; another weight is another engine
    monkeypatch.chdir(tmp_path)
    assert run("--lora", "s.safetensors:0.8", "--vae", vae, "--embedding", "myneg7.safetensors") == engines
    assert len(run("--lora", "s.safetensors:0.5", "--vae", vae, "--embedding", "myneg7.safetensors")) == 2
    # without --model the flags have nothing to go into
    code = run_cli.main(["a cat", "--engine", str(tmp_path / "lora"), "--lora", "s.safetensors"])
    err = capsys.readouterr().err
    assert code == 2 and "--lora set what --model exports" in err and "ldm-export --lora" in err
    code = run_cli.main(["a cat", "--model", model, "--lora", "missing.safetensors"])
    err = capsys.readouterr().err
    assert code == 2 and "missing.safetensors" in err and "Traceback" not in err


# SDXL: (component, diffusers layer) of every kind the original block names take: attention in a
# down, the mid and an up block, resnet convolutions and their shortcut, the down- and upsampler,
# the added-conditioning MLP (label_emb), and both text encoders.
XL_LAYERS = [("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
             ("unet", "mid_block.attentions.0.proj_in"),
             ("unet", "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj"),
             ("unet", "down_blocks.1.resnets.0.conv_shortcut"),
             ("unet", "up_blocks.1.resnets.1.conv2"),
             ("unet", "mid_block.resnets.1.conv1"),
             ("unet", "down_blocks.0.downsamplers.0.conv"),
             ("unet", "up_blocks.0.upsamplers.0.conv"),
             ("unet", "add_embedding.linear_1"),
             ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
             ("text_encoder_2", "encoder.layers.2.mlp.fc1")]


def test_sdxl_lora_under_the_original_block_names_moves_exactly_its_layers(tmp_path):
    """sd-scripts' SDXL files name U-Net layers as the original checkpoint does
    (lora_unet_input_blocks_4_1_...); the names here come from the inverse of diffusers'
    converter (tests/ldm_checkpoint.py), not from the mapping under test."""
    from ldm_checkpoint import unet_name
    from ldm_deploy.export.random_model import make_random_model

    model = str(make_random_model(tmp_path / "xl", "tiny-sdxl", seed=1))
    base = load_source(model)
    g = torch.Generator().manual_seed(5)
    config = base.unet.config
    up_attention = {i for i, t in enumerate(config.up_block_types) if "CrossAttn" in t}
    state, pairs = {}, {}
    nested = {c: "text_model." if hasattr(getattr(base, c), "text_model") else "" for c in ("text_encoder",
                                                                                           "text_encoder_2")}
    for component, name in XL_LAYERS:
        w = getattr(base, component).get_submodule(nested.get(component, "") + name).weight
        down = torch.randn((RANK, w.shape[1], *w.shape[2:]), generator=g)
        up = torch.randn((w.shape[0], RANK, *([1, 1] if w.ndim == 4 else [])), generator=g)
        pairs[component, name] = (down, up)
        if component == "unet":
            key = "lora_unet_" + unet_name(name + ".weight", config.layers_per_block, up_attention)[:-7].replace(".", "_")
        else:
            key = f"lora_{'te1' if component == 'text_encoder' else 'te2'}_text_model_{name.replace('.', '_')}"
        state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)}
    assert any(k.startswith("lora_unet_input_blocks_") for k in state)
    save_file(state, str(tmp_path / "xl-style.safetensors"))
    before = {(m, k): v.clone() for m in ("unet", "text_encoder", "text_encoder_2")
              for k, v in getattr(base, m).state_dict().items()}
    src = load_model(model, ExportConfig(loras=((str(tmp_path / "xl-style.safetensors"), 0.6),)))
    changed = {(c, f"{nested.get(c, '')}{name}.weight"): (c, name) for c, name in XL_LAYERS}
    for key, old in before.items():
        value = getattr(src, key[0]).state_dict()[key[1]]
        if key in changed:
            down, up = pairs[changed[key]]
            delta = (up.reshape(up.shape[0], -1) @ down.reshape(RANK, -1)).reshape(value.shape)
            torch.testing.assert_close(value, old + 0.6 * ALPHA / RANK * delta, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(value, old), key
    assert src.loras[0]["name"] == "xl-style"


def test_sd_lora_under_the_original_block_names_equals_diffusers_names(model_dirs, tmp_path):
    """Some SD 1.x files name blocks as the original checkpoint does too: merged alike."""
    model = str(model_dirs["tiny-sd1"])
    pairs = designed(load_source(model))
    kohya_file(tmp_path / "diffusers.safetensors", pairs)
    from ldm_checkpoint import unet_name

    base = load_source(model)
    config = base.unet.config
    up_attention = {i for i, t in enumerate(config.up_block_types) if "CrossAttn" in t}
    state = {}
    for (component, name), (down, up) in pairs.items():
        if component == "unet":
            key = "lora_unet_" + unet_name(name + ".weight", config.layers_per_block, up_attention)[:-7].replace(".", "_")
        else:
            key = f"lora_te_text_model_{name.replace('.', '_')}"
        state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)}
    save_file(state, str(tmp_path / "ldm.safetensors"))
    a = params(load_model(model, ExportConfig(loras=((str(tmp_path / "diffusers.safetensors"), 1.0),))))
    b = params(load_model(model, ExportConfig(loras=((str(tmp_path / "ldm.safetensors"), 1.0),))))
    assert all(torch.equal(a[k], b[k]) for k in a)
