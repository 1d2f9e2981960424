"""The command lines: the happy paths a user types, and every bad input giving a clear
message, a non-zero exit and no traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_deploy.cli import export as export_cli
from ldm_deploy.cli import run as run_cli


def run(capsys, argv):
    code = run_cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def export(capsys, argv):
    code = export_cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_run_writes_png_with_parameters(engine_dirs, tmp_path, capsys):
    out = tmp_path / "astronaut.png"
    code, err = run(capsys, ["a photo of an astronaut", "--engine", str(engine_dirs["tiny-sd1"]), "--steps", "3",
                             "--seed", "7", "--negative-prompt", "blurry", "--sampler", "euler_a",
                             "--width", "64", "--height", "96", "--out", str(out), "-q", "--clip-skip", "2"])
    assert code == 0, err
    im = Image.open(out)
    assert im.size == (64, 96)
    from ldm_deploy.engine.images import current_umask

    assert out.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # as any file saved here, not 0600
    params = im.info["parameters"].splitlines()
    assert params[0] == "a photo of an astronaut"
    assert params[1] == "Negative prompt: blurry"
    assert "Steps: 3, Sampler: Euler a, CFG scale: 7.5, Seed: 7, Size: 64x96" in params[2]
    assert "Clip skip: 2," in params[2]

    out = tmp_path / "big.png"
    code, err = run(capsys, ["a lighthouse", "--engine", str(engine_dirs["tiny-sd1"]), "--steps", "2", "--width", "64",
                             "--height", "64", "--hires-scale", "2", "--hires-steps", "2", "--out", str(out), "-q"])
    assert code == 0, err
    assert Image.open(out).size == (128, 128) and "Hires upscale: 2.0, Hires steps: 2" in Image.open(out).info["parameters"]
    code, err = run(capsys, ["a lighthouse", "--engine", str(engine_dirs["tiny-sd1"]), "--steps", "2", "--width", "64",
                             "--height", "64", "--hires-scale", "2", "--hires-upscaler", "latent (bicubic)",
                             "--out", str(out), "-q"])
    assert code == 0, err
    assert "Hires upscaler: Latent (bicubic)," in Image.open(out).info["parameters"]


def test_run_several_images_get_numbered_files_and_seeds(engine_dirs, tmp_path, capsys):
    out = tmp_path / "many.png"
    code, err = run(capsys, ["red", "--engine", str(engine_dirs["tiny-sd1"]), "--steps", "2", "--seed", "40",
                             "--num-images", "3", "--width", "64", "--height", "64", "--out", str(out), "-q"])
    assert code == 0, err
    seeds = [Image.open(tmp_path / f"many-{i}.png").info["parameters"].split("Seed: ")[1].split(",")[0] for i in range(3)]
    assert seeds == ["40", "41", "42"]


@pytest.mark.parametrize("extra", [[], ["--variation-seed", "7", "--variation-strength", "0.3"], ["--init-image"]])
def test_run_several_images_are_written_a_batch_at_a_time_as_one_call_draws_them(extra, engine_dirs, pipelines,
                                                                                 tmp_path, capsys):
    """Past the engine's batch (2 here), ldm-run draws a call per batch with the images' own seeds and
    writes each batch as it is drawn: the images of one Python call, pixel for pixel."""
    kwargs = dict(steps=2, width=64, height=64, seed=40, progress=False)
    if extra == ["--init-image"]:
        Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "i.png")
        extra, kwargs["init_image"] = ["--init-image", str(tmp_path / "i.png")], tmp_path / "i.png"
    elif extra:
        kwargs.update(variation_seed=7, variation_strength=0.3)
    assert pipelines["tiny-sd1"].manifest.dims["batch"].max == 2
    code, err = run(capsys, ["red", "--engine", str(engine_dirs["tiny-sd1"]), "--steps", "2", "--seed", "40",
                             "--num-images", "5", "--width", "64", "--height", "64", "--out", str(tmp_path / "o.png"),
                             "--no-prompt-weighting", *extra])
    assert code == 0, err
    assert err.count("wrote ") == 5 and err.index("o-1.png") < err.index("denoising", err.index("o-0.png"))
    one_call = pipelines["tiny-sd1"]("red", num_images=5, **kwargs)
    for i, expected in enumerate(one_call):
        written = Image.open(tmp_path / f"o-{i}.png")
        assert np.array_equal(np.asarray(written), np.asarray(expected)), i
        assert written.info["parameters"] == expected.info["parameters"]


def test_run_img2img(engine_dirs, tmp_path, capsys):
    init = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((72, 100, 3)) * 255).astype(np.uint8)).save(init)
    out = tmp_path / "watercolor.png"
    code, err = run(capsys, ["a watercolor painting", "--engine", str(engine_dirs["tiny-sd1"]), "--init-image", str(init),
                             "--strength", "0.6", "--steps", "4", "--out", str(out), "-q"])
    assert code == 0, err
    im = Image.open(out)
    assert im.size == (96, 72)  # rounded down to multiples of 8, as diffusers does
    assert "Denoising strength: 0.6" in im.info["parameters"] and "Noise multiplier" not in im.info["parameters"]
    code, err = run(capsys, ["a watercolor painting", "--engine", str(engine_dirs["tiny-sd1"]), "--init-image", str(init),
                             "--strength", "0.6", "--steps", "4", "--noise-multiplier", "1.05", "--out", str(out), "-q"])
    assert code == 0, err
    assert "Denoising strength: 0.6, Noise multiplier: 1.05," in Image.open(out).info["parameters"]


@pytest.mark.parametrize("args,message", [
    (["--width", "100"], "not a multiple of 8"),
    (["--height", "1024"], "outside this engine's range [64, 512]"),
    (["--width", "32"], "outside this engine's range"),
    (["--steps", "0"], "steps must be at least 1"),
    (["--guidance", "-1"], "guidance must be a finite number, 0 or more"),
    (["--init-image", "INIT", "--strength", "0"], "strength must lie in (0, 1]"),
    (["--init-image", "INIT", "--strength", "1.5"], "strength must lie in (0, 1]"),
    (["--init-image", "NOTANIMAGE"], "cannot read the init image"),
    (["--init-image", "MISSING"], "cannot read the init image"),
    (["--out", "NOWHERE/x.png"], "does not exist"),
    (["--out", "INIT/x.png"], "init.png is a file, not a folder"),
    (["--out", ""], "--out is empty"),
    (["--out", "/dev/null"], "--out /dev/null is not a file or a folder"),
    (["--torch-compile"], "--torch-compile applies to torch engines (ldm-export --backend torch); this one runs on onnxruntime"),
    (["--no-torch-compile"], "--no-torch-compile applies to torch engines"),
    (["--static-shapes"], "--static-shapes is a choice of the openvino backend"),
    (["--seed", "-2"], "seed must be 0 or more (or -1 for a random one)"),
    (["--num-images", "0"], "--num-images must be at least 1"),
    (["--clip-skip", "0"], "--clip-skip counts from 1 (the last layer: no skip), got 0"),
    (["--hires-scale", "1"], "--hires-scale must be above 1 and at most 8"),
    (["--hires-scale", "2", "--hires-upscaler", "ESRGAN_4x"], "unknown hires upscaler 'ESRGAN_4x'; choose one of"),
    (["--clip-skip", "3"], "--clip-skip 3: this model's text encoder has 2 layers; pass 1 (the last) to 2"),
    (["--width", "0"], "width 0 is outside this engine's range"),
    (["--guidance", "inf"], "guidance must be a finite number"),
    (["--out", "x.jpg"], "ldm-run writes PNG files"),
    (["--backend", "torch"], "this engine was built for onnxruntime and runs on onnxruntime or openvino, not torch"),
    (["--init-image", "BIG"], "the init image is 1200x72, and its width 1200 is outside this engine's range"),
])
def test_run_bad_input(args, message, engine_dirs, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), "red").save(init)
    bad = tmp_path / "bad.png"
    bad.write_text("this is not a PNG")
    Image.new("RGB", (1200, 72), "red").save(tmp_path / "big.png")
    subst = {"INIT": str(init), "NOTANIMAGE": str(bad), "MISSING": str(tmp_path / "missing.png"),
             "BIG": str(tmp_path / "big.png"), "x.jpg": str(tmp_path / "x.jpg"),
             "NOWHERE/x.png": str(tmp_path / "nowhere" / "x.png"), "INIT/x.png": str(init / "x.png")}
    args = [subst.get(a, a) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "o.png")]
    code, err = run(capsys, ["a prompt", "--engine", str(engine_dirs["tiny-sd1"]), *out, "-q", *args])
    assert code == 2
    assert message in err


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="writes into Linux's /proc, which no one can")
def test_an_unwritable_folder_is_refused_before_anything_is_drawn(engine_dirs, model_dirs, tmp_path, capsys):
    """A folder that cannot be written (here /proc, where even root cannot make a file) is said
    before the engine loads or the model is read, not after the drawing or the export."""
    code, err = run(capsys, ["a prompt", "--engine", str(engine_dirs["tiny-sd1"]), "--out", "/proc/x.png"])
    assert code == 2 and "cannot write --out /proc/x.png:" in err and "in the folder /proc" in err
    assert "denoising" not in err and "Traceback" not in err
    code = export_cli.main(["--model", str(model_dirs["tiny-sd1"]), "--out", "/proc/engines/x"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write --out /proc/engines/x:" in err and "loading" not in err


def test_keywords_are_renamed_where_they_are_words_not_in_paths():
    from ldm_deploy.errors import renamed

    names = {"control_start": "--control-start", "control_end": "--control-end", "init_image": "--init-image",
             "negative_prompt": "--negative-prompt", "mask_crop": "--mask-crop"}
    assert renamed("control_start and control_end are fractions (--control-start, --control-end)", names) == \
        "--control-start and --control-end are fractions"
    assert renamed("mask_crop (--mask-crop) cuts", names) == "--mask-crop cuts"
    for kept in ("cannot read the init image /home/u/init_image.png: x", "cannot read control_image.png",
                 "the emphasis of the prompt 'a negative_prompt test'"):
        assert renamed(kept, names) == kept


def test_a_path_named_like_an_option_is_not_renamed(engine_dirs, tmp_path, capsys, monkeypatch):
    """The pipeline's mistakes name ldm-run's flags ("--steps must be ..."); a path that merely
    shares an option's name stays as given."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "steps").mkdir()
    code, err = run(capsys, ["a prompt", "--engine", "steps"])
    assert code == 2 and "error: steps is" in err and "--steps" not in err
    code, err = run(capsys, ["a prompt", "--engine", str(engine_dirs["tiny-sd1"]), "--steps", "0"])
    assert code == 2 and "error: --steps must be at least 1" in err
    with pytest.raises(SystemExit) as exit:  # (argparse's own refusal)
        run_cli.main(["a prompt", "--mask-crop", "wide"])
    assert exit.value.code == 2 and "--mask-crop: give pixels (e.g. 32) or 'none', not 'wide'" in capsys.readouterr().err


def test_run_output_names(engine_dirs, tmp_path, capsys, monkeypatch):
    """No --out: output.png, then output-2.png ... (never overwritten); a folder: written into;
    seed -1: a random seed, as in AUTOMATIC1111; --strength without an init image: a warning."""
    monkeypatch.chdir(tmp_path)
    base = ["a prompt", "--engine", str(engine_dirs["tiny-sd1"]), "--steps", "2", "-q"]
    assert run(capsys, [*base, "--seed", "-1"])[0] == 0
    code, err = run(capsys, [*base, "--strength", "0.5"])
    assert code == 0 and "--strength applies to img2img only" in err
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["output-2.png", "output.png"]
    seeds = {Image.open(p).info["parameters"].split("Seed: ")[1].split(",")[0] for p in tmp_path.glob("*.png")}
    assert len(seeds) == 2  # -1 and no seed: random each
    (tmp_path / "pics").mkdir()
    assert run(capsys, [*base, "--out", "pics", "--num-images", "2"])[0] == 0
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["output-0.png", "output-1.png"]
    code, err = run(capsys, [*base, "--guidance", "1", "--negative-prompt", "red", "--out", "x.png"])
    assert code == 0 and "the negative prompt has no effect with guidance 1.0" in err


def test_run_engine_path_is_a_model_or_a_file(model_dirs, tmp_path, capsys):
    code, err = run(capsys, ["x", "--engine", str(model_dirs["tiny-sd1"])])
    assert code == 2 and "is a diffusers model, not an engine directory: pass it as --model" in err
    assert "--force" not in err  # which would have replaced the model
    (tmp_path / "w.safetensors").write_bytes(b"0")
    code, err = run(capsys, ["x", "--engine", str(tmp_path / "w.safetensors")])
    assert code == 2 and "is a file; an engine is a directory" in err


def test_run_model_takes_the_cached_engines_sides(model_dirs, tmp_path, capsys, monkeypatch):
    """--model's engine takes 256 px and up, as ldm-export's do by default; --min-size / --max-size
    set its sides (and its cache key), and a size out of range says how to get it."""
    monkeypatch.setenv("LDM_DEPLOY_CACHE", str(tmp_path / "cache"))
    small = ["a cat", "--model", str(model_dirs["tiny-sd1"]), "--width", "64", "--height", "64", "--steps", "1", "-q"]
    code, err = run(capsys, [*small, "--out", str(tmp_path / "a.png")])
    assert code == 2 and "width 64 is outside this engine's range [256, 1024]" in err
    assert "--min-size / --max-size (ldm-export, or ldm-run / ldm-serve --model)" in err
    code, err = run(capsys, [*small, "--min-size", "64", "--max-size", "128", "--out", str(tmp_path / "b.png")])
    assert code == 0, err
    assert len(list((tmp_path / "cache" / "engines").iterdir())) == 2  # (each range its own engine)
    code, err = run(capsys, ["a cat", "--engine", "/nonexistent", "--min-size", "64"])
    assert code == 2 and "--min-size set what --model exports into its cached engine" in err


def test_run_output_not_writable(engine_dirs, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if os.access(ro, os.W_OK):  # root ignores permission bits: use a path through a file instead
        target = tmp_path / "file.png"
        target.write_text("x")
        out = str(target / "x.png")
    else:
        out = str(ro / "x.png")
    code, err = run(capsys, ["a prompt", "--engine", str(engine_dirs["tiny-sd1"]), "--steps", "1",
                             "--width", "64", "--height", "64", "--out", out, "-q"])
    assert code != 0 and "cannot write" in err


def copy_engine(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage,message", [
    ("missing_dir", "does not exist"),
    ("no_manifest", "not an engine directory"),
    ("bad_json", "unreadable or corrupted"),
    ("future_version", "format version 99"),
    ("missing_unet", "unet_step.onnx is missing"),
    ("truncated_unet", "truncated"),
    ("corrupted_unet", "corrupted"),
    ("incomplete_manifest", "incomplete or corrupted"),
    ("no_text_chunks", "incomplete or corrupted (KeyError: 'dims.text_chunks')"),
    ("text_length_as_text", "incomplete or corrupted (TypeError: model.text_length must be int, got '77')"),
    ("size_multiple_0", "size_multiple must be whole numbers of at least 1"),
])
def test_run_damaged_engine(damage, message, engine_dirs, tmp_path, capsys):
    eng = copy_engine(engine_dirs["tiny-sd1"], tmp_path / "engine")
    manifest = eng / "manifest.json"
    if damage == "missing_dir":
        shutil.rmtree(eng)
    elif damage == "no_manifest":
        manifest.unlink()
    elif damage == "bad_json":
        manifest.write_text("{ not json")
    elif damage == "future_version":
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 99}))
    elif damage == "incomplete_manifest":
        d = json.loads(manifest.read_text())
        del d["model"]
        manifest.write_text(json.dumps(d))
    elif damage == "no_text_chunks":  # long prompts need the range of chunks
        d = json.loads(manifest.read_text())
        del d["dims"]["text_chunks"]
        manifest.write_text(json.dumps(d))
    elif damage in ("text_length_as_text", "size_multiple_0"):  # edited by hand
        d = json.loads(manifest.read_text())
        if damage == "text_length_as_text":
            d["model"]["text_length"] = "77"
        else:
            d["size_multiple"] = 0
        manifest.write_text(json.dumps(d))
    elif damage == "missing_unet":
        (eng / "unet_step.onnx").unlink()
    elif damage == "truncated_unet":
        data = (eng / "unet_step.onnx").read_bytes()
        (eng / "unet_step.onnx").write_bytes(data[: len(data) // 2])
    elif damage == "corrupted_unet":
        data = bytearray((eng / "unet_step.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (eng / "unet_step.onnx").write_bytes(bytes(data))
    code, err = run(capsys, ["a prompt", "--engine", str(eng), "--out", str(tmp_path / "o.png"), "-q"])
    assert code != 0
    assert message in err


def test_no_verify_skips_hashes_but_still_checks_sizes(engine_dirs, tmp_path, capsys):
    eng = copy_engine(engine_dirs["tiny-sd1"], tmp_path / "engine")
    manifest = json.loads((eng / "manifest.json").read_text())
    # A hash that no longer matches: refused by default, accepted with --no-verify.
    manifest["files"]["vae_decoder"]["vae_decoder.onnx"]["sha256"] = "0" * 64
    (eng / "manifest.json").write_text(json.dumps(manifest))
    args = ["x", "--engine", str(eng), "--steps", "1", "--width", "64", "--height", "64", "-q"]
    code, err = run(capsys, args + ["--out", str(tmp_path / "a.png")])
    assert code != 0 and "corrupted" in err
    code, err = run(capsys, args + ["--out", str(tmp_path / "b.png"), "--no-verify"])
    assert code == 0, err
    data = (eng / "unet_step.onnx").read_bytes()
    (eng / "unet_step.onnx").write_bytes(data[:-10])
    code, err = run(capsys, args + ["--out", str(tmp_path / "c.png"), "--no-verify"])
    assert code != 0 and "truncated" in err


def test_export_bad_model_paths(tmp_path, capsys):
    code, err = export(capsys, ["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "e")])
    assert code != 0 and "does not exist" in err
    (tmp_path / "notsd").mkdir()
    (tmp_path / "notsd" / "README.md").write_text("hello")
    code, err = export(capsys, ["--model", str(tmp_path / "notsd"), "--out", str(tmp_path / "e")])
    assert code != 0 and "not a diffusers Stable Diffusion folder" in err
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"\0" * 16)
    code, err = export(capsys, ["--model", str(single), "--out", str(tmp_path / "e")])
    assert code != 0 and "could not read the checkpoint" in err
    assert not (tmp_path / "e").exists()


def test_export_refuses_pickle_weights_unless_asked(model_dirs, tmp_path, capsys):
    model = tmp_path / "pickled"
    shutil.copytree(model_dirs["tiny-sd1"], model)
    st = model / "unet" / "diffusion_pytorch_model.safetensors"
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(st), model / "unet" / "diffusion_pytorch_model.bin")
    st.unlink()
    code, err = export(capsys, ["--model", str(model), "--out", str(tmp_path / "e")])
    assert code != 0 and "--allow-pickle" in err and not (tmp_path / "e").exists()
    code, err = export(capsys, ["--model", str(model), "--out", str(tmp_path / "e"), "--allow-pickle",
                                "--min-size", "64", "--max-size", "128"])
    assert code == 0, err
    assert (tmp_path / "e" / "manifest.json").is_file()


def test_export_existing_out_needs_force(engine_dirs, model_dirs, capsys):
    code, err = export(capsys, ["--model", str(model_dirs["tiny-sd1"]), "--out", str(engine_dirs["tiny-sd1"])])
    assert code != 0 and "--force" in err


def test_export_force_replaces_only_engine_directories(model_dirs, tmp_path, capsys):
    """--force must never delete the model, a file, or a folder that is not an engine; and these
    are refused before the model is loaded."""
    model = tmp_path / "models" / "m"
    shutil.copytree(model_dirs["tiny-sd1"], model)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"x")
    for out, message in ((model, "is the model's folder or holds it"),
                         (tmp_path / "models", "is the model's folder or holds it"),
                         (tmp_path / "notes.txt", "is not a directory"),
                         (tmp_path / "photos", "is not an engine directory (it has no manifest.json)")):
        code, err = export(capsys, ["--model", str(model), "--out", str(out), "--force"])
        assert code == 2 and message in err, err
        assert "loading" not in err
    assert (model / "model_index.json").is_file() and (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "photos" / "a.png").is_file()
    (tmp_path / "link").symlink_to(tmp_path / "photos")
    code, err = export(capsys, ["--model", str(model), "--out", str(tmp_path / "link"), "--force"])
    assert code == 2 and "is a symbolic link; pass the folder it points to" in err
    other = tmp_path / "other-model"
    shutil.copytree(model, other)
    code, err = export(capsys, ["--model", str(model), "--out", str(other), "--force"])
    assert code == 2 and "is a diffusers model (it has no manifest.json)" in err
    assert (other / "model_index.json").is_file()


@pytest.mark.parametrize("args,message", [
    (["--min-size", "100"], "multiple of 8"),
    (["--min-size", "512", "--max-size", "256"], "larger than --max-size"),
    (["--max-prompt-tokens", "50"], "--max-prompt-tokens must be at least 75 (one chunk, diffusers' limit), got 50"),
    (["--backend", "torch", "--static-shapes", "--max-prompt-tokens", "150"],
     "--static-shapes builds for one chunk of 75 prompt tokens; leave out --max-prompt-tokens"),
    (["--backend", "vulkan"], "unknown backend"),
    (["--refit"], "apply to --backend tensorrt"),
    (["--backend", "tensorrt", "--opt-level", "9"], "lies in 0..5"),
    (["--backend", "tensorrt", "--device", "cuda"], "apply to --backend torch"),
    (["--no-aoti"], "--no-aoti applies to --backend torch"),
])
def test_export_bad_options(args, message, model_dirs, tmp_path, capsys):
    code, err = export(capsys, ["--model", str(model_dirs["tiny-sd1"]), "--out", str(tmp_path / "e"), *args])
    assert code != 0 and message in err


def test_console_scripts_exit_codes(engine_dirs, tmp_path):
    """The installed entry points, as a shell runs them."""
    exe = shutil.which("ldm-run")
    cmd = [exe] if exe else [sys.executable, "-m", "ldm_deploy.cli.run"]
    p = subprocess.run(cmd + ["x", "--engine", str(tmp_path / "none")], capture_output=True, text=True)
    assert p.returncode == 2 and "ldm-run: error:" in p.stderr and "Traceback" not in p.stderr


def test_txt2img_only_engine_refuses_img2img_clearly(model_dirs, tmp_path, capsys):
    eng = tmp_path / "t2i"
    code, err = export(capsys, ["--model", str(model_dirs["tiny-sd1"]), "--out", str(eng), "--no-img2img",
                                "--min-size", "64", "--max-size", "128"])
    assert code == 0, err
    assert not (eng / "vae_encoder.onnx").exists()
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), "red").save(init)
    code, err = run(capsys, ["x", "--engine", str(eng), "--steps", "1", "--out", str(tmp_path / "a.png"), "-q"])
    assert code == 0, err
    code, err = run(capsys, ["x", "--engine", str(eng), "--init-image", str(init), "--out", str(tmp_path / "b.png"), "-q"])
    assert code != 0 and "without the VAE encoder" in err
