"""Textual inversion embeddings baked in at export: the engine draws what diffusers draws after
load_textual_inversion of the same files, in AUTOMATIC1111's and diffusers' layouts, one vector
or several; files that cannot fit are refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from conftest import assert_not_saturated, diffusers_schedulers
from ldm_deploy import Pipeline
from ldm_deploy.cli import export as export_cli
from ldm_deploy.export.embeddings import parse_spec

TOL = 2e-3
WIDTH = 32  # tiny-sd1's text encoder


def vectors(n, seed, width=WIDTH):
    # Large enough to move the image: the tiny text encoder's own rows are ~N(0, 0.02).
    return torch.randn((n, width), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("embeddings")
    save_file({"emb_params": vectors(3, 1)}, str(d / "easyneg.safetensors"))  # AUTOMATIC1111, 3 vectors
    torch.save({"string_to_param": {"*": vectors(2, 2)}, "name": "something else", "step": 500},
               d / "badhand.pt")  # AUTOMATIC1111's pickle: its name field is not the trigger word
    save_file({"<cat-toy>": vectors(1, 3)[0]}, str(d / "learned_embeds.safetensors"))  # diffusers
    return d


def test_engine_draws_what_diffusers_draws_after_load_textual_inversion(files, model_dirs, tmp_path, capsys):
    model = str(model_dirs["tiny-sd1"])
    args = ["--model", model, "--min-size", "64", "--max-size", "128", "--no-img2img", "--allow-pickle"]
    assert export_cli.main(args + ["--out", str(tmp_path / "ti"),
                                   "--embedding", str(files / "easyneg.safetensors"),
                                   "--embedding", str(files / "badhand.pt"),
                                   "--embedding", str(files / "learned_embeds.safetensors")]) == 0, \
        capsys.readouterr().err
    assert export_cli.main(args + ["--out", str(tmp_path / "plain")]) == 0
    manifests = {e: json.loads((tmp_path / e / "manifest.json").read_text())["model"] for e in ("ti", "plain")}
    assert [(e["name"], e["word"], e["vectors"]) for e in manifests["ti"]["embeddings"]] == [
        ("easyneg", "easyneg", 3), ("badhand", "badhand", 2), ("learned_embeds", "<cat-toy>", 1)]
    assert manifests["ti"]["weights_sha256"] != manifests["plain"]["weights_sha256"]

    ref = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    cls, options = diffusers_schedulers()["dpmpp_2m_karras"]
    ref.scheduler = cls.from_config(ref.scheduler.config, **options)
    ref.load_textual_inversion(str(files / "easyneg.safetensors"), token="easyneg")
    ref.load_textual_inversion(str(files / "badhand.pt"), token="badhand")
    ref.load_textual_inversion(str(files / "learned_embeds.safetensors"))
    prompt, negative = "a <cat-toy> sitting on a chair", "easyneg, badhand, blurry"
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(4))
    want = ref(prompt, negative_prompt=negative, num_inference_steps=4, guidance_scale=7.5, height=128,
               width=128, latents=latents.clone(), output_type="np").images
    kw = dict(negative_prompt=negative, steps=4, guidance=7.5, width=128, height=128, sampler="dpmpp_2m_karras",
              latents=latents.numpy(), output_type="np", progress=False)
    pipe = Pipeline.load(tmp_path / "ti")
    got = pipe(prompt, **kw)
    assert_not_saturated(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    plain = Pipeline.load(tmp_path / "plain")(prompt, **kw)
    assert np.abs(plain - got).max() > 10 * TOL  # the embeddings are what moved the image
    # All three vectors whatever the case the word is written in, as the tokenizer matches it.
    ids = pipe.tokenizer(["EasyNeg", "easyneg"])[0][:, 0]
    np.testing.assert_array_equal(ids[0], ids[1])
    assert list(ids[0][1:5]) == [49408, 49409, 49410, 49407]  # three new tokens, then the end
    # A word's vectors stay together: where they would straddle two chunks, they start the next.
    ids = pipe.tokenizer(["cat " * 73 + "easyneg"], max_chunks=2)[0][0]
    assert ids[0, 74] == ids[0, 75] == 49407 and list(ids[1, 1:5]) == [49408, 49409, 49410, 49407]
    # PNGs name the embeddings a prompt used, with AUTOMATIC1111's hash (SHA-256, 12 digits)
    params = pipe("a <cat-toy>", negative_prompt="EasyNeg", steps=1, width=64, height=64,
                  progress=False)[0].info["parameters"]
    sha = {e["word"]: e["sha256"][:12] for e in manifests["ti"]["embeddings"]}
    assert f'TI hashes: "easyneg: {sha["easyneg"]}, <cat-toy>: {sha["<cat-toy>"]}"' in params


def test_spec_and_refusals(files, model_dirs, tmp_path, capsys):
    assert parse_spec("EasyNegative.safetensors") == ("EasyNegative.safetensors", None)
    assert parse_spec("emb/bad-hands-5.pt:badhand") == ("emb/bad-hands-5.pt", "badhand")
    assert parse_spec(str(files / "badhand.pt")) == (str(files / "badhand.pt"), None)
    save_file({"emb_params": vectors(2, 5, width=768)}, str(tmp_path / "sd15.safetensors"))
    save_file({"clip_l": vectors(2, 5), "clip_g": vectors(2, 6)}, str(tmp_path / "xl.safetensors"))
    save_file({"a": vectors(1, 5), "b": vectors(1, 6)}, str(tmp_path / "two.safetensors"))
    torch.save({"string_to_param": {"*": vectors(1, 7)}}, tmp_path / "blob")  # a hub cache's file: no suffix
    easyneg = str(files / "easyneg.safetensors")
    cases = [
        ([str(tmp_path / "sd15.safetensors")], "was made for SD 1.x text encoders; this model's is 32-wide"),
        ([str(tmp_path / "xl.safetensors")], "is an SDXL embedding"),
        ([str(tmp_path / "two.safetensors")], "is not a textual inversion embedding: it holds 2 tensors"),
        ([str(tmp_path / "none.safetensors")], "no such file"),
        ([easyneg, easyneg], "'easyneg' is already a token of this model"),
        ([easyneg, f"{easyneg}:EasyNeg"], "'EasyNeg' is already a token of this model"),
        ([f"{easyneg}:Style"], "'Style' is already a token of this model"),
        ([f"{easyneg}:two words"], "has spaces"),
        ([str(files / "badhand.pt")], "is a pickle checkpoint"),  # no --allow-pickle
        ([str(tmp_path / "blob")], "blob is a pickle checkpoint; loading a pickle runs code"),  # read as one
    ]
    for embeddings, message in cases:
        out = tmp_path / "e"
        flags = [a for e in embeddings for a in ("--embedding", e)]
        code = export_cli.main(["--model", str(model_dirs["tiny-sd1"]), "--out", str(out), "--min-size", "64",
                                "--max-size", "64", "--no-img2img", *flags])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (message, err)
        assert not out.exists()
        if message == "no such file":  # found before the model is loaded
            assert "loading" not in err
