"""AUTOMATIC1111's prompt emphasis: the parser against the examples AUTOMATIC1111 documents for
its own, the tokens against transformers' tokenizer piece by piece, and the image against
diffusers' pipeline given embeddings weighted the way AUTOMATIC1111 weighs them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from conftest import assert_not_saturated, diffusers_schedulers
from ldm_deploy.engine.prompt_weights import BREAK_PIECE, parse

TOL = 2e-3
W, H = 128, 128


@pytest.mark.parametrize("text, pieces", [
    # The docstring of AUTOMATIC1111's modules/prompt_parser.py parse_prompt_attention.
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    # and ours
    ("", [("", 1.0)]),
    ("a [[dog]] and a (cat:0.8), 1:2", [("a ", 1.0), ("dog", 1 / 1.1 / 1.1), (" and a ", 1.0), ("cat", 0.8),
                                        (", 1:2", 1.0)]),
    ("masterpiece BREAK a tree", [("masterpiece", 1.0), BREAK_PIECE, ("a tree", 1.0)]),
    ("(a BREAK b:1.2) BREAK", [("a", 1.2), BREAK_PIECE, ("b", 1.2), BREAK_PIECE]),  # brackets do not weigh it
    ("(a:1.2.3) b", [("a:1.2.3) b", 1.1)]),  # a weight that does not parse is text; the bracket stays open
])
def test_parse(text, pieces):
    assert parse(text) == pieces


def a1111_embeddings(pipe, prompt, clip_skip=0):
    """AUTOMATIC1111's weighting, in torch: each piece tokenized alone, 75 tokens a chunk (the
    prompts here have no comma near a chunk's end), each chunk start + tokens + end, padded;
    its hidden states (clip_skip layers below the last, through the final layer norm) times
    their token's weight, rescaled to the unweighted mean; the chunks side by side."""
    tok = pipe.tokenizer
    ids, weights = [], []
    for text, weight in parse(prompt):
        piece = tok(text, add_special_tokens=False).input_ids
        ids, weights = ids + piece, weights + [weight] * len(piece)
    chunks = []
    for i in range(0, max(len(ids), 1), 75):
        chunk = [tok.bos_token_id, *ids[i : i + 75], tok.eos_token_id]
        chunk_weights = [1.0, *weights[i : i + 75]] + [1.0] * (77 - len(chunk) + 1)
        chunk += [tok.pad_token_id] * (77 - len(chunk))
        with torch.no_grad():
            text = pipe.text_encoder
            states = text(torch.tensor([chunk]), output_hidden_states=True).hidden_states
            z = text.final_layer_norm(states[-1 - clip_skip])
            mean = z.mean()
            z = z * torch.tensor(chunk_weights)[None, :, None]
            chunks.append(z * (mean / z.mean()))
    return torch.cat(chunks, dim=1)


@pytest.fixture(scope="module")
def biased(model_dirs, tmp_path_factory):
    """tiny-sd1 with a final layer norm bias like a trained CLIP's. The random model's is zero, so
    its hidden states average ~1e-8, and the mean rescaling divides rounding noise by rounding
    noise; a trained CLIP's average is far from zero (AUTOMATIC1111 relies on that)."""
    import shutil

    from transformers import CLIPTextModel

    from ldm_deploy.export.build import export_engine
    from ldm_deploy.export.config import ExportConfig

    model = tmp_path_factory.mktemp("biased") / "model"
    shutil.copytree(model_dirs["tiny-sd1"], model)
    text = CLIPTextModel.from_pretrained(model / "text_encoder")
    norm = getattr(text, "text_model", text).final_layer_norm
    with torch.no_grad():
        norm.bias.copy_(0.1 + 0.3 * torch.randn(norm.bias.shape, generator=torch.Generator().manual_seed(0)))
    text.save_pretrained(model / "text_encoder")
    engine = export_engine(str(model), model.parent / "engine", ExportConfig(min_size=64, max_size=128,
                                                                              img2img=False))
    return model, engine


@pytest.mark.parametrize("clip_skip, prompt", [
    (0, "a (red:1.4) house on a [[green]] hill, ((sunset))"),
    (1, "a (red:1.4) house on a [[green]] hill, ((sunset))"),
    # 98 tokens: two chunks, the second weighted too
    (1, "a (red:1.4) house on a [[green]] hill with trees and a river by it " * 7),
])
def test_weighted_prompt_matches_diffusers_given_a1111_embeddings(biased, clip_skip, prompt):
    from ldm_deploy import Pipeline

    model, engine = biased
    negative = "(blurry:1.3), [text]"
    ref = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    cls, options = diffusers_schedulers()["euler"]
    ref.scheduler = cls.from_config(ref.scheduler.config, **options)
    latents = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(2))
    embeds = a1111_embeddings(ref, prompt, clip_skip)
    negative_embeds = a1111_embeddings(ref, negative, clip_skip)
    if embeds.shape[1] > 77:  # the one-chunk negative prompt twice over, as alone (test_long_prompts.py)
        negative_embeds = negative_embeds.repeat(1, 2, 1)
    want = ref(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds,
               num_inference_steps=4, guidance_scale=7.5, height=H, width=W, latents=latents.clone(),
               output_type="np").images
    kw = dict(negative_prompt=negative, steps=4, guidance=7.5, sampler="euler", width=W, height=H,
              latents=latents.numpy(), output_type="np", progress=False)
    pipe = Pipeline.load(engine)
    got = pipe(prompt, prompt_weighting=True, clip_skip=clip_skip, **kw)
    assert_not_saturated(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    assert np.abs(pipe(prompt, clip_skip=clip_skip, **kw) - got).max() > 10 * TOL  # off: brackets are text


def test_plain_prompts_are_untouched_and_pngs_say_how_brackets_were_read(pipelines):
    # SD 2.x's tokenizer pads with id 0 after the end token, SD 1.x's with the end token itself.
    for preset in ("tiny-sd2", "tiny-sd1"):
        tok = pipelines[preset].tokenizer
        ids, weights = tok(["a (cat)", "a cat"], weighting=True)
        np.testing.assert_array_equal(ids[0], tok(["a cat"])[0][0])
        assert weights[0, 0, 2] == np.float32(1.1) and weights[1, 0, 2] == 1 and ids[0, 0, -1] == tok.pad
    pipe = pipelines["tiny-sd1"]
    kw = dict(negative_prompt="blurry", steps=2, width=64, height=64, seed=5, progress=False)
    # No emphasis: the same ids, weights of exactly 1, the same image to the bit.
    prompt = "a photo of a cat, 4k"
    ids, weights = pipe.tokenizer([prompt], weighting=True)
    np.testing.assert_array_equal(ids, pipe.tokenizer([prompt])[0])
    assert np.all(weights == 1)
    np.testing.assert_array_equal(pipe(prompt, prompt_weighting=True, output_type="np", **kw),
                                  pipe(prompt, output_type="np", **kw))
    assert "Emphasis" not in pipe("a (cat)", prompt_weighting=True, **kw)[0].info["parameters"]
    assert "Emphasis: None" in pipe("a (cat)", **kw)[0].info["parameters"]  # AUTOMATIC1111's literal mode


def test_long_weighted_prompts_are_cut_with_a_warning(pipelines, caplog):
    import logging

    tok = pipelines["tiny-sd1"].tokenizer
    with caplog.at_level(logging.WARNING):
        ids, weights = tok(["(red:1.2) " + "cat " * 80 + "(dog:1.5)"], weighting=True)  # one chunk allowed
    assert ids.shape == weights.shape == (1, 1, 77)
    ids, weights = ids[0, 0], weights[0, 0]
    assert ids[-1] == tok.end and weights[1] == np.float32(1.2) and np.all(weights[2:76] == 1)
    assert "this part was cut off: 'cat cat" in caplog.text and "dog'" in caplog.text and "</w>" not in caplog.text
