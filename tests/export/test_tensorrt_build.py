"""Building TensorRT plans, the parts that need no TensorRT: option validation, profiles from the
spec, precisions, the progress estimate, timing-cache names, manifest facts; and the clear
refusal to export here."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from conftest import TEST_CONFIG
from ldm_deploy.engine.backends.tensorrt import RuntimeFacts
from ldm_deploy.engine.spec import DimRange, ModelFacts, component_specs
from ldm_deploy.errors import BackendUnavailable, UserError
from ldm_deploy.export.build import export_engine
from ldm_deploy.export.config import ExportConfig
from ldm_deploy.export.tensorrt_build import (
    BuildProgress,
    TensorRTExporter,
    TensorRTOptions,
    build_facts,
    check_build_options,
    component_precisions,
    format_duration,
    nested_fraction,
    plan_profile,
    progress_line,
    should_report,
    static_dims,
    time_left,
    timing_cache_path,
)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
SPECS = component_specs(ModelFacts(4, 77, 32, long_prompts=True))
DIMS = TEST_CONFIG.dims(16)  # latent sides 8..64 (tuned 16), batch 1..2, cfg 1..2, text chunks 1..4
H100 = RuntimeFacts("10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")


def test_profiles_come_from_the_spec_and_the_engine_ranges():
    unet = plan_profile(SPECS["unet_step"], DIMS)
    assert set(unet) == {"latents", "text_embeddings", "state", "noise"}  # coeffs (9,) is fixed
    assert unet["latents"] == ((1, 4, 8, 8), (1, 4, 16, 16), (2, 4, 64, 64))
    assert unet["text_embeddings"] == ((1, 1, 77, 32), (2, 1, 77, 32), (2, 2, 308, 32))  # 4 chunks of 77
    text = plan_profile(SPECS["text_encoder"], DIMS)  # run once a chunk
    assert text["input_ids"] == ((1, 1, 77), (2, 1, 77), (2, 2, 77))
    vae = plan_profile(SPECS["vae_encoder"], DIMS)
    assert vae["images"] == ((1, 3, 64, 64), (1, 3, 128, 128), (2, 3, 512, 512)) and "start_coeffs" not in vae


def test_sdxl_and_refiner_size_conditioning_profiles():
    """SDXL base's six sizes go with each image, (B, 6); a refiner's aesthetic score differs between
    the guidance halves, so its five numbers are (K, B, 5)."""
    for aesthetic, expected in ((False, ((1, 6), (1, 6), (2, 6))), (True, ((1, 1, 5), (2, 1, 5), (2, 2, 5)))):
        specs = component_specs(ModelFacts(4, 77, 48, long_prompts=True, pooled_width=40, aesthetic=aesthetic))
        unet = plan_profile(specs["unet_step"], DIMS)
        assert unet["time_ids"] == expected
        assert unet["pooled_embeddings"] == ((1, 1, 40), (2, 1, 40), (2, 2, 40))


def test_static_shapes_pin_size_batch_and_prompt_chunks_but_not_guidance():
    pinned = static_dims(DIMS)
    assert pinned["latent_height"] == pinned["latent_width"] == DimRange(16, 16, 16)
    assert pinned["batch"] == pinned["text_chunks"] == DimRange(1, 1, 1) and pinned["cfg"] == DIMS["cfg"]
    unet = plan_profile(SPECS["unet_step"], pinned)
    assert unet["latents"] == ((1, 4, 16, 16),) * 3  # min = opt = max
    assert unet["text_embeddings"] == ((1, 1, 77, 32), (2, 1, 77, 32), (2, 1, 77, 32))


@pytest.mark.parametrize("options,precision,dims,message", [
    (TensorRTOptions(optimization_level=6), "fp16", None, "lies in 0..5"),
    (TensorRTOptions(optimization_level=-1), "fp16", None, "lies in 0..5"),
    (TensorRTOptions(), "bf16", None, "fp16 or fp32"),
    (TensorRTOptions(static_shapes=True), "fp16", DIMS, r"one batch, but the engine was to accept \[1, 2\]"),
    (TensorRTOptions(), "fp16", {"batch": SimpleNamespace(min=1, opt=5, max=4)}, r"5 lies outside \[1, 4\]"),
])
def test_impossible_option_combinations_are_refused(options, precision, dims, message):
    with pytest.raises(UserError, match=message):
        check_build_options(options, precision, dims)


def test_option_caveats_are_returned_for_the_log():
    assert check_build_options(TensorRTOptions(), "fp16", DIMS) == []
    caveats = check_build_options(TensorRTOptions(static_shapes=True, refit=True), "fp32", static_dims(DIMS))
    assert len(caveats) == 3
    assert "only its tuned size and batch" in caveats[0] and "guidance <= 1 still runs" in caveats[0]
    assert "refit weights must be fp16" in caveats[1] and "slower" in caveats[1]
    assert "fp32 plans" in caveats[2]


def test_fp16_engines_keep_the_text_encoder_fp32():
    assert component_precisions("fp16") == {"text_encoder": "fp32", "unet_step": "fp16", "vae_decoder": "fp16",
                                            "vae_encoder": "fp16"}
    assert set(component_precisions("fp32").values()) == {"fp32"}
    # SDXL's VAE overflows in fp16 (force_upcast): it stays fp32, as diffusers runs it
    assert component_precisions("fp16", vae_fp32=True) == {"text_encoder": "fp32", "unet_step": "fp16",
                                                           "vae_decoder": "fp32", "vae_encoder": "fp32"}


def test_progress_of_nested_phases_and_time_left():
    assert nested_fraction([]) == 0.0
    assert nested_fraction([(1, 4)]) == 0.25
    assert nested_fraction([(1, 4), (2, 4)]) == pytest.approx(0.375)  # step 2 of 4 is half done
    assert nested_fraction([(3, 4), (8, 8)]) == 1.0
    assert nested_fraction([(9, 4)]) == 1.0  # clamped
    assert time_left(30.0, 0.375) == pytest.approx(50.0)  # 30 s for 37.5 %: 50 s to go
    assert time_left(120.0, 0.8) == pytest.approx(30.0)
    assert time_left(30.0, 0.01) is None and time_left(1.0, 0.5) is None  # too early to say


def test_build_progress_follows_tensorrt_phase_callbacks():
    p = BuildProgress()
    p.start("Building engine", None, 2)
    p.start("Tactic selection", "Building engine", 10)
    p.step("Tactic selection", 4)  # steps count from 0: five done
    assert p.fraction() == pytest.approx(0.25)
    p.finish("Tactic selection")
    p.step("Building engine", 0)
    p.start("Serialization", "Building engine", 4)
    p.step("Serialization", 1)
    assert p.fraction() == pytest.approx((1 + 2 / 4) / 2)
    p.step("Unknown phase", 3)  # ignored, as after a phase_finish
    p.finish("Serialization")
    p.finish("Building engine")
    assert p.fraction() == 0.0


def test_progress_lines_are_throttled_and_readable():
    assert should_report(None, 0.0, 0.0)
    assert not should_report((100.0, 0.30), 110.0, 0.35)
    assert should_report((100.0, 0.30), 115.0, 0.31) and should_report((100.0, 0.30), 101.0, 0.40)
    assert [format_duration(s) for s in (9.6, 75, 3725)] == ["10s", "1m15s", "1h02m"]
    assert progress_line("unet_step", 0.375, 30.0) == "unet_step: TensorRT build 38% (30s elapsed, about 50s left)"
    assert progress_line("vae_decoder", 0.01, 1.0) == "vae_decoder: TensorRT build 1% (1s elapsed)"


def test_timing_cache_is_one_file_per_tensorrt_version_and_gpu(tmp_path):
    path = timing_cache_path(str(tmp_path), H100)
    assert path == tmp_path / "timing-trt10.8.0.43-sm9.0-NVIDIA_H100_80GB_HBM3.cache"
    assert timing_cache_path(None, H100) is None
    assert timing_cache_path("~/c", H100).parent.is_absolute()


def test_the_timing_cache_lives_in_the_cache_folder(tmp_path, monkeypatch):
    """By default where cached engines go ($LDM_DEPLOY_CACHE, ...), found when a build starts."""
    monkeypatch.setenv("LDM_DEPLOY_CACHE", str(tmp_path / "c"))
    assert timing_cache_path(TensorRTOptions().timing_cache, H100).parent == tmp_path / "c" / "tensorrt"
    monkeypatch.delenv("LDM_DEPLOY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert timing_cache_path(TensorRTOptions().timing_cache, H100).parent == tmp_path / "xdg" / "ldm-deploy" / "tensorrt"


def test_manifest_build_facts_are_enough_to_rebuild():
    options = TensorRTOptions(optimization_level=5, refit=True)
    facts = build_facts(H100, options, component_precisions("fp16"), {"unet_step": 123, "vae_decoder": 45})
    assert facts["tensorrt"] == "10.8.0.43" and facts["compute_capability"] == "9.0"
    assert facts["plans"] == {"unet_step": "unet_step.plan", "vae_decoder": "vae_decoder.plan"}
    assert TensorRTOptions.from_dict(facts["options"] | {"from_a_newer_version": 1}) == options


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the refusal on machines without TensorRT")
def test_export_refuses_before_any_work_without_tensorrt():
    config = SimpleNamespace(tensorrt=TensorRTOptions(), dtype_name="fp16")
    with pytest.raises(BackendUnavailable, match="needs NVIDIA TensorRT"):
        TensorRTExporter(src=None, config=config, dims=DIMS, multiple=8)


def test_export_config_checks_tensorrt_options():
    assert ExportConfig(backend="tensorrt").dtype_name == "fp16"
    assert ExportConfig(backend="tensorrt", precision="fp32").dtype_name == "fp32"
    with pytest.raises(UserError, match="apply to --backend tensorrt"):
        ExportConfig(tensorrt=TensorRTOptions(refit=True))
    with pytest.raises(UserError, match="apply to --backend torch"):
        ExportConfig(backend="tensorrt", channels_last=True)
    with pytest.raises(UserError, match="lies in 0..5"):
        ExportConfig(backend="tensorrt", tensorrt=TensorRTOptions(optimization_level=7))
    static = ExportConfig(backend="tensorrt", tensorrt=TensorRTOptions(static_shapes=True), opt_size=512).dims(64)
    assert static["latent_height"] == static["latent_width"] == DimRange(64, 64, 64)
    assert static["batch"] == DimRange(1, 1, 1) and static["cfg"] == DimRange(1, 2, 2)
    assert check_build_options(TensorRTOptions(static_shapes=True), "fp16", static)  # consistent: a caveat only


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the refusal on machines without TensorRT")
def test_tensorrt_export_without_tensorrt_is_a_clear_error(model_dirs, tmp_path):
    with pytest.raises(BackendUnavailable, match="needs NVIDIA TensorRT"):
        export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "e", ExportConfig(backend="tensorrt"))
    assert not (tmp_path / "e").exists()


def test_max_size_defaults_to_1536_for_1024_px_models():
    """SDXL (drawn at 1024) gets room for its widest trained aspect, 1536 x 640; SD keeps 1024."""
    assert ExportConfig().dims(128)["latent_width"] == DimRange(32, 128, 192)
    assert ExportConfig().dims(64)["latent_width"] == DimRange(32, 64, 128)
    assert ExportConfig(max_size=1024).dims(128)["latent_width"] == DimRange(32, 128, 128)
    with pytest.raises(UserError, match="--opt-size 2048 lies outside"):
        ExportConfig(opt_size=2048).dims(128)
