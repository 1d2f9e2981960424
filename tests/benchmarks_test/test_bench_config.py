"""Option combinations, checked in one function before anything slow starts."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from benchmarks.config import BenchConfig, check_config, parse_contender
from benchmarks.peers import SCHEDULERS
from ldm_deploy.engine.samplers import K_DIFFUSION_ONLY, SAMPLERS
from ldm_deploy.errors import UserError


@pytest.fixture
def folders(tmp_path):
    engine, model = tmp_path / "engine", tmp_path / "model"
    engine.mkdir()
    model.mkdir()
    (engine / "manifest.json").write_text(json.dumps({"backend": "onnxruntime"}))
    (model / "model_index.json").write_text("{}")
    return BenchConfig(engine=str(engine), model=str(model))


def test_defaults_pass(folders):
    check_config(folders)


@pytest.mark.parametrize("name,expected", [
    ("ours", ("ours", None)),
    ("diffusers", ("diffusers", None)),
    ("compile", ("diffusers", "max-autotune")),
    ("compile:default", ("diffusers", "default")),
    ("compile:max-autotune-no-cudagraphs", ("diffusers", "max-autotune-no-cudagraphs")),
])
def test_parse_contender(name, expected):
    assert parse_contender(name) == expected


@pytest.mark.parametrize("name", ["optimum", "compile:fast", "compile:", "Ours"])
def test_unknown_contenders_are_refused(name):
    with pytest.raises(UserError, match="unknown contender"):
        parse_contender(name)


@pytest.mark.parametrize("change,message", [
    (dict(contenders=()), "no contenders"),
    (dict(contenders=("ours", "ours", "diffusers")), "named twice"),
    (dict(baseline="compile:default"), "baseline 'compile:default' is not among"),
    (dict(device="tpu"), "unknown device"),
    (dict(engine=None), "needs --engine"),
    (dict(engine="/nonexistent"), "not an engine directory"),
    (dict(model=None), "need --model"),
    (dict(model="/nonexistent"), "not a diffusers model folder"),
    (dict(model=__file__), "is a single file.*python -m ldm_deploy.export.single_file"),
    (dict(width=100), "--width 100 must be a positive multiple of 8"),
    (dict(height=0), "--height 0 must be"),
    (dict(steps=0), "--steps must be at least 1"),
    (dict(repeats=0), "--repeats must be at least 1"),
    (dict(warmup=-1), "--warmup must be at least 0"),
    (dict(warmup_steps=0), "--warmup-steps must be at least 1"),
    (dict(batch=0), "--batch must be at least 1"),
    (dict(threads=0), "--threads must be at least 1"),
    (dict(sampler="plms"), "unknown sampler"),
    (dict(sampler="dpmpp_2s_a_karras"), "no diffusers scheduler runs the dpmpp_2s_a_karras sampler"),
    (dict(guidance=float("nan")), "--guidance must be 0 or more"),
    (dict(time_budget_s=0), "--time-budget must be positive"),
])
def test_bad_combinations_say_how_to_fix(folders, change, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_config(replace(folders, **change))


def test_peers_only_need_no_engine(folders):
    check_config(replace(folders, engine=None, contenders=("diffusers", "compile:default")))


def test_ours_only_needs_no_model(folders):
    check_config(replace(folders, model=None, contenders=("ours",), baseline="ours"))


def test_every_engine_sampler_has_its_diffusers_scheduler(folders):
    """All but k-diffusion's, which ours measures alone."""
    assert set(SCHEDULERS) == set(SAMPLERS) - set(K_DIFFUSION_ONLY) and K_DIFFUSION_ONLY
    check_config(replace(folders, sampler="dpmpp_2s_a", model=None, contenders=("ours",), baseline="ours"))


def test_our_label_says_what_runs():
    """"torch.compile" in our label where exported programs get compiled: asked for, or by
    default on CUDA; never for packages, which AOTInductor compiled already."""
    from benchmarks.ours import label

    def manifest(device, mode):
        return {"precision": "fp16", "build": {"device": device, "modes": {"unet_step": mode}}}

    assert label("torch", {}, manifest("cuda", "exported")) == "ldm-deploy torch fp16 torch.compile"
    assert label("torch", {"compile": False}, manifest("cuda", "exported")) == "ldm-deploy torch fp16"
    assert label("torch", {}, manifest("cpu", "exported")) == "ldm-deploy torch fp16"
    assert label("torch", {"compile": True}, manifest("cpu", "exported")).endswith("torch.compile")
    assert label("torch", {"compile": True}, manifest("cuda", "aoti")) == "ldm-deploy torch fp16"


def test_a_model_of_another_kind_than_the_engines_is_refused(engine_dirs, model_dirs):
    """The ratios would compare two models: an SD 2.x folder against an SD 1.x engine is said."""
    config = BenchConfig(engine=str(engine_dirs["tiny-sd1"]), model=str(model_dirs["tiny-sd1"]))
    check_config(config)
    with pytest.raises(UserError, match=r"is not the model the engine was made from .* text 48 wide and 4 channels, "
                                        r"the engine's 32 and 4"):
        check_config(replace(config, model=str(model_dirs["tiny-sd2"])))
