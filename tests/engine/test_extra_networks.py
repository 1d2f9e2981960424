"""AUTOMATIC1111's extra-network tags in prompts: taken out of the text where its syntax is read,
with a word where the engine does not hold what a tag asks for."""

from __future__ import annotations

import logging

import numpy as np

from ldm_deploy.engine.extra_networks import advice, strip

LORAS = ({"name": "detail", "weight": 0.8, "sha256": "0" * 64},)


def test_tags_come_out_of_the_text():
    assert strip("a cat, <lora:detail:0.8> <hypernet:x> by a window") == (
        "a cat,   by a window", [("lora", "detail:0.8"), ("hypernet", "x")])
    assert strip("a <b> c <lora:>") == ("a <b> c <lora:>", [])  # not tags


def test_advice_names_what_the_engine_holds():
    assert advice("lora", "detail:0.8", LORAS) is None  # merged at that weight: applied
    assert advice("lyco", "detail:0.8:0.8", LORAS) is None
    assert advice("lora", "detail", ({"name": "detail", "weight": 1.0},)) is None  # default weight 1
    assert advice("lora", "detail:0.5", LORAS) == (
        "the prompt's <lora:detail:0.5> is not applied at 0.5: this engine has detail merged at weight 0.8; "
        "for another weight, export it with --lora detail.safetensors:0.5 (ldm-export, or ldm-run --model)")
    assert advice("lora", "style:1", LORAS) == (
        "the prompt's <lora:style:1> is not applied: LoRAs are merged into an engine when it is exported, and "
        "this one holds only detail; export it with --lora style.safetensors:1 (ldm-export, or ldm-run --model)")
    assert "this one holds none;" in advice("lora", "style:te=1", ())
    # AUTOMATIC1111's named and second weights: te= the text encoder's, unet= (or the second) the U-Net's
    assert advice("lora", "detail:te=0.8", LORAS) is None and advice("lora", "detail:0:0", ()) is None
    assert "its text encoder and U-Net weights differ (0.8, 0.2)" in advice("lora", "detail:0.8:0.2", LORAS)
    assert "weights differ (1, 0)" in advice("lora", "detail:unet=0", LORAS)
    assert "its weights are not numbers" in advice("lora", "detail:abc", LORAS)
    assert advice("hypernet", "x:1", LORAS) == "the prompt's <hypernet:x:1> is not applied: ldm-deploy runs no " \
                                               "hypernet extra networks"


def test_the_pipeline_reads_the_prompt_without_its_tags_and_says_so_once(pipelines, caplog):
    pipe = pipelines["tiny-sd1"]
    kw = dict(negative_prompt="blurry <lora:bad:1>", steps=2, width=64, height=64, seed=3, output_type="np",
              progress=False)
    with caplog.at_level(logging.WARNING):
        tagged = pipe("a cat <lora:style:0.7>", prompt_weighting=True, **kw)
        pipe("a cat <lora:style:0.7>", prompt_weighting=True, **kw)
    plain = pipe("a cat", prompt_weighting=True, **kw)
    np.testing.assert_array_equal(tagged, plain)
    assert caplog.text.count("the prompt's <lora:style:0.7> is not applied") == 1
    # A negative prompt's tags are text, as AUTOMATIC1111 reads them.
    assert "<lora:bad:1>" not in caplog.text
    assert np.abs(pipe("a cat", prompt_weighting=True, **(kw | {"negative_prompt": "blurry"})) - plain).max() > 0
    # AUTOMATIC1111's syntax off (the API's default, as diffusers): the tag is text, read as words.
    assert np.abs(pipe("a cat <lora:style:0.7>", **kw) - plain).max() > 0
