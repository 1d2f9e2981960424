"""AUTOMATIC1111's prompt editing: the schedules against the examples AUTOMATIC1111 documents for
its own parser, and the image against diffusers' pipeline given each step's embeddings (swapped
by its step-end callback)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

from conftest import assert_not_saturated
from ldm_deploy.engine.prompt_schedule import schedule, text_at

TOL = 2e-3


@pytest.mark.parametrize("prompt, pairs", [
    # The docstring of AUTOMATIC1111's get_learned_conditioning_prompt_schedules, 10 steps. (Its
    # "a [{b|d{:.5] c", which it marks as not handled, is left out.)
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]),
    # Its timelines since 1.6: a decimal point makes a fraction (1.0: all the steps), none a
    # count; a step before the first (0, or a fraction that rounds to 0) is "to" throughout.
    ("[a:b:1.0]", [(10, "a")]),
    ("[a:b:1.5]", [(10, "a")]),
    ("[a:b:0]", [(10, "b")]),
    ("[a:b:0.05]", [(10, "b")]),
    ("[a:b:5e-1]", [(10, "b")]),
    ("x [a:b:1e0]", [(1, "x a"), (10, "x b")]),
    ("[a:b:30] c", [(10, "a c")]),
    ("[a:b:1e999]", [(10, "a")]),  # (AUTOMATIC1111 fails on it)
    # Spaces around the number.
    ("portrait, [cat:dog:0.5 ]", [(5, "portrait, cat"), (10, "portrait, dog")]),
    ("[ cat : dog : 0.5 ]", [(5, " cat "), (10, " dog ")]),
    # Its grammar fails, and all is text: a broken construct inside another, a "|" outside an
    # alternation, a backslash escaping nothing, non-ASCII digits; and brackets nested past sense.
    ("a [(cat:dog:0.5] house", [(10, "a [(cat:dog:0.5] house")]),
    ("a [cat (small|dog] house", [(10, "a [cat (small|dog] house")]),
    ("[(16:9]", [(10, "[(16:9]")]),
    ("a | b [c:d:3]", [(10, "a | b [c:d:3]")]),
    ("[a:b:3] \\\\", [(3, "a \\\\"), (10, "b \\\\")]),  # an escaped backslash
    ("[a:b:3] \\", [(10, "[a:b:3] \\")]),  # a backslash escaping nothing
    ("[a:b:3] \\\n", [(10, "[a:b:3] \\\n")]),
    ("[a:b:\u0663]", [(10, "[a:b:\u0663]")]),
    ("(" * 80 + "[a:b:3]", [(10, "(" * 80 + "[a:b:3]")]),
    # Stray brackets at the top level are text, colons in words too.
    ("ratio 16:9, (a:1.2) [b:c:2]", [(2, "ratio 16:9, (a:1.2) b"), (10, "ratio 16:9, (a:1.2) c")]),
])
def test_schedule_matches_automatic1111s_examples(prompt, pairs):
    assert schedule(prompt, 10) == pairs


def test_automatic1111s_header_example_at_100_steps():
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
              "[ in background:0.25] [shoddy:masterful:0.5]")
    assert schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_the_hires_pass_counts_past_the_first():
    """In the hires fix's second pass (20 steps after 20), fractions count from 1.0 and counts
    from the first pass's 20, as AUTOMATIC1111's new timelines do."""
    assert schedule("[sketch:photo:0.5]", 20, 20) == [(20, "photo")]
    assert schedule("[a:b:1.5]", 20, 20) == [(10, "a"), (20, "b")]
    assert schedule("[a:b:25]", 20, 20) == [(5, "a"), (20, "b")]


def test_evaluations_are_scheduled_as_automatic1111_counts_them():
    from dataclasses import replace

    from ldm_deploy.engine.text import step_texts
    from ldm_deploy.engine.request import Request

    req = Request(prompts=("[a:b:0.5]",), negative_prompts=("",), seeds=(1,), steps=4, guidance=7.5,
                  sampler="euler", width=64, height=64, strength=1.0, prompt_weighting=True)
    assert [t[1] for t in step_texts(["", "[a:b:0.5]"], req, 4)] == ["a", "a", "a", "b"]
    # Heun: 7 evaluations of a schedule over 2 x 4 (AUTOMATIC1111's total_steps).
    heun = step_texts(["", "[a:b:0.5]"], replace(req, sampler="heun"), 7)
    assert [t[1] for t in heun] == ["a"] * 5 + ["b"] * 2
    # The hires pass: 3 steps after 4, its evaluations counted afresh.
    hires = replace(req, prompts=("[a:b:1.5]",), steps=9, edit_steps=3, first_pass_steps=4)
    assert [t[1] for t in step_texts(["", "[a:b:1.5]"], hires, 3)] == ["a", "a", "b"]
    # After a Heun first pass of 10 steps (20 evaluations: first_pass_steps counts them, as
    # hires.second_pass passes them), an Euler hires pass: step 15 lies in the first pass.
    after_heun = replace(req, prompts=("[a:b:15]",), steps=10, edit_steps=10, first_pass_steps=20)
    assert [t[1] for t in step_texts(["", "[a:b:15]"], after_heun, 3)] == ["b"] * 3
    # Without prompt weighting, nothing is read.
    assert step_texts(["", "[a:b:0.5]"], replace(req, prompt_weighting=False), 2) == [("", "[a:b:0.5]")] * 2


def test_steps_count_from_zero_as_automatic1111s_denoiser_does():
    pairs = schedule("a [red:blue:2] house", 4)
    assert [text_at(pairs, i) for i in range(5)] == ["a red house"] * 3 + ["a blue house"] * 2
    pairs = schedule("[red|blue]", 4)
    assert [text_at(pairs, i) for i in range(4)] == ["red", "red", "blue", "red"]


def embeddings(pipe, text):
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


A, B = "a red lighthouse", "a photo of a cat on the moon, highly detailed"


@pytest.mark.parametrize("prompt, texts", [
    (f"[{A}:{B}:1]", [A, A, B, B, B]),  # steps 0 and 1, then the rest
    (f"[{A}:{B}:0.5]", [A, A, A, B, B]),  # int(0.5 * 5) = 2
    (f"[{A}|{B}]", [A, A, B, A, B]),
])
def test_edited_prompt_matches_diffusers_given_each_steps_embeddings(prompt, texts, model_dirs, pipelines):
    ref = StableDiffusionPipeline.from_pretrained(model_dirs["tiny-sd1"], safety_checker=None,
                                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    negative = embeddings(ref, "blurry")

    def swap(pipe, i, t, kwargs):  # after step i: step i + 1's [uncond, cond]
        nxt = texts[min(i + 1, len(texts) - 1)]
        return {"prompt_embeds": torch.cat([negative, embeddings(ref, nxt)])}

    latents = torch.randn((1, 4, 12, 16), generator=torch.Generator().manual_seed(4))
    want = ref(prompt_embeds=embeddings(ref, texts[0]), negative_prompt_embeds=negative, num_inference_steps=5,
               guidance_scale=7.5, height=96, width=128, latents=latents.clone(), output_type="np",
               callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
    kw = dict(negative_prompt="blurry", steps=5, sampler="euler", width=128, height=96, latents=latents.numpy(),
              output_type="np", progress=False)
    got = pipelines["tiny-sd1"](prompt, prompt_weighting=True, **kw)
    assert_not_saturated(want)
    # Tighter than the other parity tests (seen: 2.4e-6), so that an edit of the last few steps,
    # which moves this tiny model's image by ~3e-3, cannot pass unseen.
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL / 20)
    for text in (A, B):  # either text all through gives another image
        assert np.abs(pipelines["tiny-sd1"](text, **kw) - got).max() > TOL / 2
    # Prompt weighting off (the API's default, as diffusers): the brackets are text, nothing is edited.
    plain = pipelines["tiny-sd1"](prompt, **kw)
    np.testing.assert_array_equal(plain, pipelines["tiny-sd1"](prompt.replace("[", "\\[").replace("]", "\\]"),
                                                                prompt_weighting=True, **kw))


def test_edits_of_different_lengths_share_one_chunk_count(pipelines):
    """Texts of one, then two chunks: every step's embeddings get two (the short one's chunk
    twice over), so the loop keeps one shape."""
    from ldm_deploy.engine import text
    from ldm_deploy.engine.request import Request

    long = "a dog on the moon " * 20
    req = Request(prompts=(f"[a cat:{long}:1]",), negative_prompts=("",), seeds=(1,), steps=3, guidance=7.5,
                  sampler="euler", width=64, height=64, strength=1.0, prompt_weighting=True)
    per_step = text.step_texts(["", req.prompts[0]], req, 3)
    assert per_step == [("", "a cat"), ("", "a cat"), ("", long)]
    pipe = pipelines["tiny-sd1"]
    embs = text.encode(pipe, list(dict.fromkeys(per_step)), 2, req)
    assert [pipe.backend.download(e["text_embeddings"]).shape for e in embs] == [(2, 1, 154, 32)] * 2
    alone = pipe.backend.download(text.encode(pipe, [("", "a cat")], 2, req)[0]["text_embeddings"])
    short = pipe.backend.download(embs[0]["text_embeddings"])
    np.testing.assert_array_equal(short[:, :, :77], alone)
    np.testing.assert_array_equal(short[:, :, 77:], alone)
    image = pipe(req.prompts[0], prompt_weighting=True, steps=3, width=64, height=64, output_type="np", progress=False)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
