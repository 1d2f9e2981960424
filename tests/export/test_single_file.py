"""Single-file checkpoints (original Stable Diffusion names, as AUTOMATIC1111 and ComfyUI share
them): read back to exactly the weights they hold, exported to an engine that gives diffusers'
image of the same model, and everything else refused with a message that says what the file is."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_not_saturated
from ldm_checkpoint import ldm_state, write_single_file
from ldm_deploy.cli import export as export_cli
from ldm_deploy.errors import ModelSourceError
from ldm_deploy.export import single_file
from ldm_deploy.export.random_model import make_random_model
from ldm_deploy.export.source import load_source

OPEN_CLIP = {"tiny-sd1": False, "tiny-sd2": True}


@pytest.fixture(scope="module")
def files(model_dirs, tmp_path_factory):
    """preset -> (single file of a seed-3 model, that model's folder). The session's seed-1
    models serve as --config: their configs, not their weights."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for preset, open_clip in OPEN_CLIP.items():
        folder = make_random_model(root / preset, preset, seed=3)
        write_single_file(folder, root / f"{preset}.safetensors", open_clip)
        out[preset] = (root / f"{preset}.safetensors", folder)
    return out


def weights(src) -> dict:
    return {f"{m}.{k}": v for m in ("unet", "vae", "text_encoder") for k, v in getattr(src, m).state_dict().items()}


@pytest.mark.parametrize("preset", list(OPEN_CLIP))
def test_single_file_loads_exactly_the_weights_it_holds(preset, files, model_dirs):
    path, folder = files[preset]
    ours, ref = weights(load_source(str(path), config=str(model_dirs[preset]))), weights(load_source(str(folder)))
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref), [k for k in ref if not torch.equal(ours[k], ref[k])][:3]
    # and not the config folder's (seed 1) weights
    assert not torch.equal(ours["unet.conv_in.weight"], weights(load_source(str(model_dirs[preset])))["unet.conv_in.weight"])


def test_fp16_single_file_and_pickle_checkpoint(files, model_dirs, tmp_path):
    """Most shared checkpoints are fp16; old ones are .ckpt pickles wrapped in {"state_dict": ...}."""
    _, folder = files["tiny-sd1"]
    ref = weights(load_source(str(folder)))
    half = write_single_file(folder, tmp_path / "half.safetensors", False, dtype=torch.float16)
    got = weights(load_source(str(tmp_path / "half.safetensors"), config=str(model_dirs["tiny-sd1"])))
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], ref[k].half().float()) for k in ref)
    torch.save({"state_dict": half, "global_step": 470000}, tmp_path / "old.ckpt")
    with pytest.raises(ModelSourceError, match="--allow-pickle"):
        load_source(str(tmp_path / "old.ckpt"), config=str(model_dirs["tiny-sd1"]))
    got = weights(load_source(str(tmp_path / "old.ckpt"), allow_pickle=True, config=str(model_dirs["tiny-sd1"])))
    assert all(torch.equal(got[k], ref[k].half().float()) for k in ref)


def test_exported_single_file_gives_diffusers_image_of_the_model(files, model_dirs, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from ldm_deploy import Pipeline

    path, folder = files["tiny-sd2"]
    out = tmp_path / "engine"
    code = export_cli.main(["--model", str(path), "--config", str(model_dirs["tiny-sd2"]), "--out", str(out),
                            "--min-size", "64", "--max-size", "128", "--no-img2img"])
    assert code == 0, capsys.readouterr().err
    latents = torch.randn((1, 4, 12, 16), generator=torch.Generator().manual_seed(3))
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    want = ref("a lighthouse at dusk", num_inference_steps=4, guidance_scale=7.5, height=96, width=128,
               latents=latents.clone(), output_type="np").images
    got = Pipeline.load(out)("a lighthouse at dusk", steps=4, guidance=7.5, sampler="ddim", height=96, width=128,
                             latents=latents.numpy(), output_type="np", progress=False)
    assert_not_saturated(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)


def test_export_without_config_names_the_architecture_mismatch(files, tmp_path, capsys):
    """A tiny checkpoint is detected as SD 1.x and built as SD 1.5: the shapes differ, and the
    message says to pass --config."""
    code = export_cli.main(["--model", str(files["tiny-sd1"][0]), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "do not fit the SD 1.x architecture" in err and "give --config" in err
    # the first size mismatch named, not torch's heading ("Error(s) in loading state_dict for ...:")
    assert "size mismatch for conv_in.weight" in err.strip().splitlines()[-1] and "Error(s)" not in err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("preset,family", [("sd15", "sd1"), ("sd21", "sd2")])
def test_bundled_configs_take_a_full_size_checkpoints_every_weight(preset, family, tmp_path):
    """The SD 1.5 / 2.1 architectures we build single files into, checked at full size on the meta
    device (shapes, no memory): the checkpoint's keys pick the family, and diffusers' converters
    map every weight of it onto the modules built from our configs, shape for shape (the text
    encoder's extras aside: ldm_checkpoint.text_extras)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    prediction = "v_prediction" if family == "sd2" else "epsilon"
    single_file.write_configs(tmp_path, family, prediction)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tmp_path, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(tmp_path, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(tmp_path, subfolder="text_encoder"))
    state = ldm_state(unet, vae, text, open_clip=family == "sd2")
    ck = single_file.Checkpoint(tmp_path / "model.safetensors", state, None)
    assert single_file.family(ck) == family
    text_weights = convert_open_clip_checkpoint(text, state) if family == "sd2" else convert_ldm_clip_checkpoint(state)
    for module, converted in ((unet, convert_ldm_unet_checkpoint(state, unet.config)),
                              (vae, convert_ldm_vae_checkpoint(state, vae.config)),
                              (text, {k.removeprefix("text_model."): v for k, v in text_weights.items()})):
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert {k: tuple(converted[k].shape) for k in expected if k in converted} == expected
        # passed over by the loader (single_file.convert): what diffusers' CLIPTextModel has no place for
        assert set(converted) - set(expected) <= {"embeddings.position_ids", "text_projection.weight"}
    assert unet.config.sample_size == (96 if family == "sd2" else 64)
    assert (text.config.hidden_size, text.config.num_hidden_layers) == ((1024, 23) if family == "sd2" else (768, 12))


def checkpoint(shapes: dict) -> single_file.Checkpoint:
    """Real tensors of the given shapes under the given names (zeros: only keys and shapes matter)."""
    return single_file.Checkpoint(single_file.Path("x.safetensors"), {k: torch.zeros(s) for k, s in shapes.items()}, None)


UNET_KEY = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
VAE_KEY = {"first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3)}
CLIP_KEY = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)}
OPEN_CLIP_KEY = {"cond_stage_model.model.ln_final.weight": (1024,)}


@pytest.mark.parametrize("keys,message", [
    ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
      "conditioner.embedders.1.model.ln_final.weight": (1280,), **UNET_KEY}, "holds no VAE"),
    ({"conditioner.embedders.1.model.ln_final.weight": (1280,), **UNET_KEY, **VAE_KEY},
     "no first .CLIP ViT-L. text encoder"),
    ({"model.diffusion_model.label_emb.0.0.weight": (1280, 2816), **UNET_KEY, **VAE_KEY, **CLIP_KEY},
     "SDXL checkpoint without its second text encoder"),
    ({"edm_mean": (1, 4, 1, 1), "conditioner.embedders.1.model.ln_final.weight": (1280,), **UNET_KEY}, "Playground v2.5"),
    ({"model.diffusion_model.label_emb.0.0.weight": (1536, 2560), "conditioner.embedders.0.model.ln_final.weight":
      (1280,), "conditioner.embedders.0.model.text_projection": (1280, 1280), **UNET_KEY},
     "holds no VAE"),  # an SDXL refiner's names, its VAE left out
    ({"model.diffusion_model.label_emb.0.0.weight": (1536, 2560), **UNET_KEY, **VAE_KEY},
     "SDXL refiner checkpoint without its text encoder"),
    ({"model.diffusion_model.label_emb.0.0.weight": (1280, 1024), **UNET_KEY, **VAE_KEY, **OPEN_CLIP_KEY}, "unCLIP"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536)}, "SD3"),
    ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "Flux"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "is a LoRA"),
    ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}, "is a VAE.*--vae"),
    ({"emb_params": (2, 768)}, "not a Stable Diffusion model"),
    ({**UNET_KEY, **CLIP_KEY}, "no VAE weights"),
    ({**UNET_KEY, **VAE_KEY}, "no text encoder weights"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 5, 3, 3), **VAE_KEY, **CLIP_KEY}, "5 input channels .a depth"),
])
def test_what_is_not_a_whole_sd_checkpoint_is_named(keys, message):
    with pytest.raises(ModelSourceError, match=message):
        single_file.family(checkpoint(keys))


def test_family_and_prediction_type(caplog):
    sd1 = checkpoint({**UNET_KEY, **VAE_KEY, **CLIP_KEY})
    assert single_file.family(sd1) == "sd1"
    assert single_file.prediction_type(sd1, "sd1", None) == "epsilon"
    sd2 = checkpoint({**UNET_KEY, **VAE_KEY, **OPEN_CLIP_KEY})
    assert single_file.family(sd2) == "sd2"
    sgm_sd2 = checkpoint({**UNET_KEY, **VAE_KEY, "conditioner.embedders.0.model.ln_final.weight": (1024,)})
    assert single_file.family(sgm_sd2) == "sd2"  # Stability's newer trainer's names: no label_emb
    refiner = checkpoint({**UNET_KEY, **VAE_KEY, "conditioner.embedders.0.model.ln_final.weight": (1280,),
                          "conditioner.embedders.0.model.text_projection": (1280, 1280),
                          "model.diffusion_model.label_emb.0.0.weight": (1536, 2560)})
    assert single_file.family(refiner) == "sdxl-refiner"
    with caplog.at_level(logging.WARNING):
        assert single_file.prediction_type(sd2, "sd2", None) == "v_prediction"
    assert "--prediction-type epsilon" in caplog.text
    assert single_file.prediction_type(sd2, "sd2", "epsilon") == "epsilon"
    sd2.global_step = single_file.SD2_BASE_STEP
    assert single_file.prediction_type(sd2, "sd2", None) == "epsilon"
    sd2.global_step = None
    sd1.metadata = {"modelspec.prediction_type": "v"}  # ModelSpec, as Stability's files carry it
    assert single_file.prediction_type(sd1, "sd1", None) == "v_prediction"
    sd2.metadata = {"modelspec.prediction_type": "epsilon"}
    assert single_file.prediction_type(sd2, "sd2", None) == "epsilon"
    v_pred = checkpoint({**UNET_KEY, **VAE_KEY, **CLIP_KEY, "v_pred": ()})  # ComfyUI's mark
    assert single_file.prediction_type(v_pred, "sd1", None) == "v_prediction"
    sgm = checkpoint({**UNET_KEY, **VAE_KEY, "conditioner.embedders.0.model.ln_final.weight": (1024,)})
    assert single_file.family(sgm) == "sd2"  # SD 2.x as Stability's newer code saves it
    assert single_file.family(checkpoint({**UNET_KEY, **CLIP_KEY}), vae_given=True) == "sd1"
    # SD 2.x inpainting (stable-diffusion-2-inpainting, 512 px) predicts noise
    inpainting = checkpoint({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3), **VAE_KEY,
                             **OPEN_CLIP_KEY})
    assert single_file.family(inpainting) == "sd2" and single_file.inpainting(inpainting)
    assert single_file.prediction_type(inpainting, "sd2", None) == "epsilon"


def test_inpainting_checkpoint_loads_into_the_inpainting_architecture(tmp_path, monkeypatch):
    """An inpainting checkpoint (9 channels into the U-Net) without --config: the bundled
    architecture's inpainting variant is built and takes exactly the file's weights; the engine
    knows it for an inpainting model."""
    import json

    from ldm_deploy.export import random_model
    from ldm_deploy.export.build import model_info

    monkeypatch.setitem(random_model.PRESETS, "sd15", random_model.PRESETS["tiny-sd1"])
    folder = make_random_model(tmp_path / "inpainting", "tiny-sd1", seed=3, inpainting=True)
    write_single_file(folder, tmp_path / "inpainting.safetensors", open_clip=False)
    src, ref = load_source(str(tmp_path / "inpainting.safetensors")), load_source(str(folder))
    assert src.unet.config.in_channels == 9
    ours, want = weights(src), weights(ref)
    assert ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in want)
    info = model_info(src)
    assert info.inpainting and info.masks and info.latent_channels == 4
    single_file.write_configs(tmp_path / "configs", "sd1", "epsilon", inpaint=True)
    assert json.loads((tmp_path / "configs" / "unet" / "config.json").read_text())["in_channels"] == 9
    assert json.loads((tmp_path / "configs" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionInpaintPipeline"


def test_unreadable_and_misnamed_files(tmp_path, model_dirs, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\0" * 16)
    with pytest.raises(ModelSourceError, match="could not read the checkpoint"):
        load_source(str(bad))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelSourceError, match="not a checkpoint"):
        load_source(str(text))
    with pytest.raises(ModelSourceError, match="--config is for single-file checkpoints"):
        load_source(str(model_dirs["tiny-sd1"]), config=str(model_dirs["tiny-sd2"]))
    with pytest.raises(ModelSourceError, match="not a diffusers folder"):
        load_source(str(bad), config=str(tmp_path))


def test_prediction_type_overrides_a_folders_scheduler(model_dirs):
    assert load_source(str(model_dirs["tiny-sd2"]), prediction_type="epsilon").scheduler_config["prediction_type"] \
        == "epsilon"


def test_run_with_a_checkpoint_as_model(files, tmp_path, capsys, monkeypatch):
    """ldm-run --model takes a .safetensors file as it takes a folder; what it cannot export it
    says so (here: a tiny file, which needs ldm-export --config), and pickles go to ldm-export."""
    from ldm_deploy.cli import run as run_cli

    monkeypatch.setenv("LDM_DEPLOY_CACHE", str(tmp_path / "cache"))
    code = run_cli.main(["a cat", "--model", str(files["tiny-sd1"][0]), "--out", str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "give --config" in err
    (tmp_path / "old.ckpt").write_bytes(b"PK\x03\x04")  # torch.save's zip
    code = run_cli.main(["a cat", "--model", str(tmp_path / "old.ckpt"), "--out", str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert code == 2 and "is a pickle checkpoint" in err and "--allow-pickle" in err
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")  # a mistaken path: no pickle advice
    for name in ("photo.png", "photo.ckpt"):
        (tmp_path / name).write_bytes((tmp_path / "photo.png").read_bytes())
        code = run_cli.main(["a cat", "--model", str(tmp_path / name), "--allow-pickle"])
        err = capsys.readouterr().err
        assert code == 2 and f"{name} is a PNG image, not a checkpoint: pass a .safetensors file" in err


def test_files_are_told_by_their_first_bytes(tmp_path):
    """A hub cache's blob has no suffix: a safetensors one is read as one (a LoRA, an embedding);
    a whole model must be named by its suffix, and is told how; an image is said to be one."""
    from safetensors.torch import save_file

    from ldm_deploy.errors import ModelSourceError
    from ldm_deploy.export.single_file import check_pickle, file_kind, read

    save_file({"emb_params": torch.ones(2, 4)}, str(tmp_path / "blob"))
    torch.save({"a": torch.zeros(1)}, tmp_path / "pickled")
    Image.new("RGB", (4, 4)).save(tmp_path / "photo.pt", format="PNG")
    assert [file_kind(tmp_path / n) for n in ("blob", "pickled", "photo.pt")] == ["safetensors", "pickle", "a PNG image"]
    assert read(tmp_path / "blob", allow_pickle=False).state["emb_params"].shape == (2, 4)
    for name, flag, message in [("blob", "--model", "is a safetensors file without its suffix: rename it"),
                                ("pickled", "--lora", "is a pickle checkpoint; loading a pickle runs code"),
                                ("photo.pt", "--vae", "--vae {} is a PNG image, not a checkpoint")]:
        with pytest.raises(ModelSourceError, match=message.format(tmp_path / name).replace(".", "\\.")):
            check_pickle(tmp_path / name, allow_pickle=False, flag=flag)


def test_checkpoint_names_in_cache_and_png():
    from ldm_deploy.engine.infotext import model_name

    assert model_name("/models/dreamshaper_8.safetensors") == "dreamshaper_8"
    assert model_name("/models/v1-5-pruned-emaonly.ckpt") == "v1-5-pruned-emaonly"


def test_cache_key_follows_the_checkpoint_file(files, tmp_path):
    import os
    import shutil

    from ldm_deploy.cache import model_key

    path = tmp_path / "m.safetensors"
    shutil.copy(files["tiny-sd1"][0], path)
    key = model_key(path, {})
    assert model_key(path, {}) == key
    os.utime(path, ns=(1, 1))
    assert model_key(path, {}) != key


def test_replacement_vae_from_a_file_or_a_folder(files, model_dirs, tmp_path):
    """--vae (AUTOMATIC1111's "SD VAE"): the VAE's weights come from it, everything else from the
    model, and the engine's weight hash covers it."""
    from ldm_checkpoint import write_vae_file

    model, other = str(model_dirs["tiny-sd1"]), files["tiny-sd1"][1]
    base, want = load_source(model), weights(load_source(str(other)))
    kept = weights(base)
    for source in ("bare", "prefixed", "folder"):
        if source == "folder":
            vae = other / "vae"
        else:
            vae = tmp_path / f"{source}.safetensors"
            write_vae_file(other, vae, prefix="first_stage_model." if source == "prefixed" else "")
        src = load_source(model, vae_source=str(vae))
        got = weights(src)
        for k, v in got.items():
            expected = want[k] if k.startswith("vae.") else kept[k]
            assert torch.equal(v, expected), (source, k)
        assert src.weights_sha256 != base.weights_sha256


def test_replacement_vae_that_does_not_fit(files, model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    from ldm_checkpoint import write_vae_file

    model = str(model_dirs["tiny-sd1"])
    with pytest.raises(ModelSourceError, match="does not exist"):
        load_source(model, vae_source=str(tmp_path / "nope.safetensors"))
    vae = tmp_path / "vae.safetensors"
    write_vae_file(files["tiny-sd1"][1], vae)
    state = load_file(vae)
    save_file({k: v for k, v in state.items() if not k.startswith("decoder.")}, str(vae))
    with pytest.raises(ModelSourceError, match="does not fit the model's VAE.*lacks"):
        load_source(model, vae_source=str(vae))
    with pytest.raises(ModelSourceError, match="not a diffusers VAE folder"):
        load_source(model, vae_source=str(tmp_path))


def test_without_config_the_bundled_architecture_is_built(files, monkeypatch):
    """The path every real checkpoint takes (configs written by us, fast tokenizer, no folder of
    the model's own), run on a tiny file by making the tiny architectures the bundled ones."""
    from ldm_deploy.export import random_model

    for family, tiny in (("sd15", "tiny-sd1"), ("sd21", "tiny-sd2")):
        monkeypatch.setitem(random_model.PRESETS, family, random_model.PRESETS[tiny])
    for preset in OPEN_CLIP:
        path, folder = files[preset]
        src, ref = load_source(str(path)), load_source(str(folder))
        assert src.tokenizer.backend_tokenizer is not None
        assert src.scheduler_config["prediction_type"] == ref.scheduler_config["prediction_type"]
        ours, want = weights(src), weights(ref)
        assert ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in want)


def test_bundled_configs_are_the_published_ones(tmp_path):
    """What the weights' shapes cannot check: activations, head counts, the noise schedule,
    against stable-diffusion-v1-5's and stable-diffusion-2-1's published configs."""
    import json

    for family, pred in (("sd1", "epsilon"), ("sd2", "v_prediction")):
        folder = tmp_path / family
        single_file.write_configs(folder, family, pred)
        unet = json.loads((folder / "unet" / "config.json").read_text())
        text = json.loads((folder / "text_encoder" / "config.json").read_text())
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"], sched["prediction_type"]) == \
            (0.00085, 0.012, "scaled_linear", pred)
        if family == "sd1":
            assert (unet["attention_head_dim"], unet["cross_attention_dim"], unet["sample_size"]) == (8, 768, 64)
            assert (text["hidden_act"], text["num_attention_heads"], text["num_hidden_layers"]) == ("quick_gelu", 12, 12)
        else:
            assert (list(unet["attention_head_dim"]), unet["use_linear_projection"], unet["sample_size"]) == \
                ([5, 10, 20, 20], True, 96)
            assert (text["hidden_act"], text["num_attention_heads"], text["num_hidden_layers"]) == ("gelu", 16, 23)
        tokenizer = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
        assert tokenizer["pad_token"] == ("!" if family == "sd2" else "<|endoftext|>")


def test_vae_given_for_a_checkpoint_without_one_and_diffusers_vae_file(files, model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    path, other = files["tiny-sd1"]
    no_vae = tmp_path / "no-vae.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("first_stage_model.")}, str(no_vae))
    with pytest.raises(ModelSourceError, match="no VAE"):
        load_source(str(no_vae), config=str(model_dirs["tiny-sd1"]))
    # the VAE's own diffusers weight file (as sd-vae-ft-mse ships it), not its folder
    vae_file = next((other / "vae").glob("*.safetensors"))
    got = weights(load_source(str(no_vae), config=str(model_dirs["tiny-sd1"]), vae_source=str(vae_file)))
    want = weights(load_source(str(other)))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_broken_config_folder(files, model_dirs, tmp_path):
    import shutil

    config = tmp_path / "config"
    shutil.copytree(model_dirs["tiny-sd1"], config)
    (config / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ModelSourceError, match="unreadable scheduler"):
        load_source(str(files["tiny-sd1"][0]), config=str(config))


def test_checkpoint_written_as_a_diffusers_folder(files, model_dirs, tmp_path, capsys):
    """python -m ldm_deploy.export.single_file: diffusers' own pipeline loads the folder, with the
    file's weights; an existing --out is left alone."""
    from diffusers import StableDiffusionPipeline

    path, folder = files["tiny-sd2"]
    args = [str(path), "--out", str(tmp_path / "m"), "--config", str(model_dirs["tiny-sd2"])]
    assert single_file.main(args) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "m", safety_checker=None, requires_safety_checker=False)
    want = weights(load_source(str(folder)))
    got = {f"{m}.{k}": v for m in ("unet", "vae", "text_encoder") for k, v in getattr(pipe, m).state_dict().items()}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert single_file.main(args) == 2 and "already exists" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*partial*"))


def test_model_hash_of_a_checkpoint_is_its_plain_sha256(files):
    """So a PNG's "Model hash" (its first 10 digits) is the one AUTOMATIC1111 and CivitAI show."""
    import hashlib

    path = files["tiny-sd1"][0]
    src = load_source(str(path), config=str(files["tiny-sd1"][1]))
    assert src.weights_sha256 == src.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # with another VAE the engine's weights are others, but the checkpoint is the same (its "Model hash")
    vae = load_source(str(path), config=str(files["tiny-sd1"][1]), vae_source=str(files["tiny-sd1"][1] / "vae"))
    assert vae.checkpoint_sha256 == src.checkpoint_sha256 != vae.weights_sha256


def file_and_folders(root, preset: str):
    """(single file of a seed-3 tiny model of the preset, its folder, a seed-1 one's folder for --config)."""
    folder = make_random_model(root / "model", preset, seed=3)
    write_single_file(folder, root / "model.safetensors", open_clip=False)
    return root / "model.safetensors", folder, make_random_model(root / "config", preset, seed=1)


def same_weights(ours, ref, modules) -> None:
    for name in modules:
        a, b = getattr(ours, name).state_dict(), getattr(ref, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), name


def export_file_and_folder(model_files, tmp_path, capsys, *flags) -> dict:
    """{"file": its engine (exported with --config), "folder": the folder's}."""
    path, folder, config = model_files
    engines = {}
    for name, model, extra in (("file", path, ["--config", str(config)]), ("folder", folder, [])):
        engines[name] = tmp_path / name
        code = export_cli.main(["--model", str(model), *extra, "--out", str(engines[name]), "--min-size", "64",
                                "--max-size", "128", *flags])
        assert code == 0, capsys.readouterr().err
    return engines


@pytest.fixture(scope="module")
def xl_file(tmp_path_factory):
    return file_and_folders(tmp_path_factory.mktemp("single-xl"), "tiny-sdxl")


def test_sdxl_single_file_loads_its_weights_and_draws_the_folders_image(xl_file, tmp_path, capsys):
    """SDXL's release layout (sgm's conditioner.embedders.0 / .1 and label_emb) read back to the
    very weights of its diffusers folder, both text encoders; the engine draws that folder's image."""
    from ldm_deploy import Pipeline

    path, folder, config = xl_file
    ours, ref = load_source(str(path), config=str(config)), load_source(str(folder))
    assert ours.family == "sdxl" and ours.zero_negative
    same_weights(ours, ref, ("unet", "vae", "text_encoder", "text_encoder_2"))
    engines = export_file_and_folder(xl_file, tmp_path, capsys, "--no-img2img")
    kwargs = dict(prompt="a lighthouse", steps=3, width=96, height=64, seed=2, output_type="np", progress=False)
    got, want = (Pipeline.load(engines[n])(**kwargs) for n in ("file", "folder"))
    assert_not_saturated(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_bundled_sdxl_configs_take_a_full_size_checkpoints_every_weight(tmp_path):
    """As for SD 1.5 / 2.1 above: SDXL base at full size on the meta device, its keys named as
    the release names them, every weight mapped shape for shape onto the modules of our configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    single_file.write_configs(tmp_path, "sdxl", "epsilon")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNET2D := UNet2DConditionModel.load_config(tmp_path, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(tmp_path, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(tmp_path, subfolder="text_encoder"))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(tmp_path, subfolder="text_encoder_2"))
    state = ldm_state(unet, vae, text, False, text_2)
    ck = single_file.Checkpoint(tmp_path / "model.safetensors", state, None)
    assert single_file.family(ck) == "sdxl" and single_file.prediction_type(ck, "sdxl", None) == "epsilon"
    strip = lambda w: {k.removeprefix("text_model."): v for k, v in w.items()}  # noqa: E731
    for module, converted in ((unet, convert_ldm_unet_checkpoint(state, unet.config)),
                              (vae, convert_ldm_vae_checkpoint(state, vae.config)),
                              (text, strip(convert_ldm_clip_checkpoint(state))),
                              (text_2, strip(convert_open_clip_checkpoint(text_2, state, single_file.XL_OPEN_CLIP)))):
        expected = {k.removeprefix("text_model."): tuple(v.shape) for k, v in module.state_dict().items()}
        assert {k: tuple(converted[k].shape) for k in expected if k in converted} == expected
        assert set(converted) - set(expected) <= {"logit_scale"}
    assert UNET2D["sample_size"] == 128 and UNET2D["cross_attention_dim"] == 2048
    assert sum(p.numel() for p in unet.parameters()) > 2.5e9  # SDXL's 2.6B U-Net
    assert (text_2.config.hidden_size, text_2.config.num_hidden_layers, text_2.config.projection_dim) == (1280, 32, 1280)


@pytest.fixture(scope="module")
def refiner_file(tmp_path_factory):
    return file_and_folders(tmp_path_factory.mktemp("single-refiner"), "tiny-sdxl-refiner")


def test_sdxl_refiner_single_file_loads_its_weights_and_draws_the_folders_image(refiner_file, tmp_path, capsys):
    """The refiner's release layout (OpenCLIP ViT-bigG alone as conditioner.embedders.0, label_emb
    of the pooled text and five numbers) read back to the weights of its folder."""
    from ldm_deploy import Pipeline

    path, folder, config = refiner_file
    ours, ref = load_source(str(path), config=str(config)), load_source(str(folder))
    assert ours.family == "sdxl" and ours.refiner and not ours.zero_negative and ours.text_encoder is None
    same_weights(ours, ref, ("unet", "vae", "text_encoder_2"))
    engines = export_file_and_folder(refiner_file, tmp_path, capsys)
    image = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    kwargs = dict(prompt="a lighthouse", init_image=image, strength=0.6, steps=4, seed=2, output_type="np",
                  progress=False)
    got, want = (Pipeline.load(engines[n])(**kwargs) for n in ("file", "folder"))
    assert_not_saturated(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_bundled_sdxl_refiner_configs_take_a_full_size_checkpoints_every_weight(tmp_path):
    """stable-diffusion-xl-refiner-1.0's architecture on the meta device, named as its release
    names it: the file is told from SDXL base and every weight maps onto our configs' modules."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    single_file.write_configs(tmp_path, "sdxl-refiner", "epsilon")
    assert not (tmp_path / "text_encoder").exists() and (tmp_path / "tokenizer_2").is_dir()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tmp_path, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(tmp_path, subfolder="vae"))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(tmp_path, subfolder="text_encoder_2"))
    state = ldm_state(unet, vae, None, False, text_2)
    ck = single_file.Checkpoint(tmp_path / "refiner.safetensors", state, None)
    assert single_file.family(ck) == "sdxl-refiner" and single_file.prediction_type(ck, "sdxl-refiner", None) == "epsilon"
    assert tuple(state[single_file.LABEL_EMB].shape) == (1536, 2560)  # (4 x 384 time embedding, 1280 + 5 x 256)
    strip = lambda w: {k.removeprefix("text_model."): v for k, v in w.items()}  # noqa: E731
    for module, converted in ((unet, convert_ldm_unet_checkpoint(state, unet.config)),
                              (text_2, strip(convert_open_clip_checkpoint(text_2, state, single_file.SGM_OPEN_CLIP)))):
        expected = {k.removeprefix("text_model."): tuple(v.shape) for k, v in module.state_dict().items()}
        assert {k: tuple(converted[k].shape) for k in expected if k in converted} == expected
        assert set(converted) - set(expected) <= {"logit_scale"}
    assert 2.2e9 < sum(p.numel() for p in unet.parameters()) < 2.5e9  # the refiner's 2.3B U-Net
