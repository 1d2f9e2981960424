"""Prompts longer than 75 tokens, in chunks as AUTOMATIC1111 makes them: the chunking rules
against transformers' tokens, and the image against diffusers' pipeline given the chunks'
embeddings side by side (each chunk through diffusers' text encoder alone)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from transformers import CLIPTokenizer

from conftest import PRESETS, assert_not_saturated

TOL = 2e-3
W, H = 128, 96
# No comma near a chunk's end: 15 tokens a sentence, 105 in all, so 75 + 30 in two chunks.
LONG = "a photo of an astronaut riding a horse on the moon with stars and planets " * 7


def raw(model_dir, text: str) -> list[int]:
    """transformers' tokens of `text`, without start and end."""
    return CLIPTokenizer.from_pretrained(model_dir / "tokenizer")(text, add_special_tokens=False).input_ids


def test_chunks_follow_automatic1111s_rules(pipelines, model_dirs, caplog):
    tok = pipelines["tiny-sd1"].tokenizer
    start, end = tok.start, tok.end

    def chunks(prompt, weighting=False, max_chunks=4):
        ids, weights = tok([prompt], weighting, max_chunks)
        assert np.all(ids[0, :, 0] == start)  # every chunk is start, up to 75 tokens, end, padding
        return [[t for t in row[1:] if t != end] for row in ids[0]], weights[0]

    cats = raw(model_dirs["tiny-sd1"], "cat " * 75)
    assert len(cats) == 75 and len(set(cats)) == 1
    cat, comma, dog = cats[0], raw(model_dirs["tiny-sd1"], ",")[0], raw(model_dirs["tiny-sd1"], "dog")[0]
    assert chunks("cat " * 75)[0] == [cats]  # 75 tokens: one chunk
    assert chunks("cat " * 76)[0] == [cats, [cat]]
    # The whole prompt, in order, whatever the chunks.
    got, _ = chunks(LONG)
    assert [t for c in got for t in c] == raw(model_dirs["tiny-sd1"], LONG) and [len(c) for c in got] == [75, 30]
    # A chunk that would end 20 tokens or fewer after a comma ends at the comma instead.
    assert chunks("cat " * 60 + ", " + "dog " * 30)[0] == [[cat] * 60 + [comma], [dog] * 30]
    assert chunks("cat " * 50 + ", " + "dog " * 30)[0] == [[cat] * 50 + [comma] + [dog] * 24, [dog] * 6]
    # BREAK starts a chunk where emphasis is read; the shorter chunk is padded with end tokens.
    got, weights = chunks("a cat BREAK a (dog:1.5)", weighting=True)
    assert got == [raw(model_dirs["tiny-sd1"], "a cat"), raw(model_dirs["tiny-sd1"], "a dog")]
    assert weights[1, 2] == np.float32(1.5) and np.sum(weights != 1) == 1
    assert chunks("BREAK a cat", weighting=True)[0] == [[], raw(model_dirs["tiny-sd1"], "a cat")]
    assert len(chunks("a cat BREAK a dog")[0]) == 1  # emphasis off: BREAK is a word, as in AUTOMATIC1111
    # Prompts of a call share the count of chunks: a shorter one whose count divides it repeats its
    # own (it then draws as alone); another gets chunks of "", as diffusers encodes "".
    ids, _ = tok(["cat " * 80, "dog", "cat " * 160, "cat " * 80 + "dog"], False, 4)  # 2, 1, 3, 2 chunks
    empty = CLIPTokenizer.from_pretrained(model_dirs["tiny-sd1"] / "tokenizer")("", padding="max_length").input_ids
    assert ids.shape == (4, 3, 77)
    assert (ids[1] == ids[1, 0]).all() and ids[1, 0, 1] == dog
    assert ids[0, 2].tolist() == ids[3, 2].tolist() == empty and ids[3, 1, 6] == dog
    # Past the engine's chunks: cut with a warning; at one chunk, where diffusers cuts.
    with caplog.at_level(logging.WARNING):
        assert chunks("cat " * 60 + ", " + "dog " * 30, max_chunks=1)[0] == [[cat] * 60 + [comma] + [dog] * 14]
        assert "the prompt needs 2 chunks of 75 tokens (BREAK, and commas near a chunk's end, start new ones) and " \
               "this engine takes 1 (ldm-export --max-prompt-tokens sets it;" in caplog.text
        assert "this part was cut off: 'dog dog" in caplog.text
        assert len(chunks("cat " * 400)[0]) == 4
        assert "needs 6 chunks of 75 tokens" in caplog.text and "this engine takes 4" in caplog.text
    # One chunk allowed (engines from before long prompts, static shapes): BREAK only separates, as before.
    assert chunks("a cat BREAK a dog", weighting=True, max_chunks=1)[0] == [raw(model_dirs["tiny-sd1"], "a cat a dog")]
    assert chunks("BREAK a cat", weighting=True, max_chunks=1)[0] == [raw(model_dirs["tiny-sd1"], "a cat")]


def chunked_embeddings(pipe, prompt: str, chunks: int) -> torch.Tensor:
    """(1, chunks * 77, D): the prompt's tokens 75 at a time, each chunk start + tokens + end +
    padding, each through diffusers' text encoder alone."""
    tok = pipe.tokenizer
    ids = tok(prompt, add_special_tokens=False).input_ids
    rows = []
    for i in range(chunks):
        piece = [tok.bos_token_id, *ids[75 * i : 75 * (i + 1)], tok.eos_token_id]
        rows.append(piece + [tok.pad_token_id] * (77 - len(piece)))
    with torch.no_grad():
        return torch.cat([pipe.text_encoder(torch.tensor([r]))[0] for r in rows], dim=1)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_long_prompt_matches_diffusers_given_chunked_embeddings(preset, guidance, model_dirs, pipelines, torch_noise):
    ref = StableDiffusionPipeline.from_pretrained(model_dirs[preset], safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = DPMSolverMultistepScheduler.from_config(ref.scheduler.config, use_karras_sigmas=True)
    negative = "blurry" if guidance > 1 else None
    embeds = {"prompt_embeds": chunked_embeddings(ref, LONG, 2)}
    if negative:  # one chunk, twice over: as alone (attention over a repeated sequence is over it once)
        embeds["negative_prompt_embeds"] = chunked_embeddings(ref, negative, 1).repeat(1, 2, 1)
    latents = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(5))
    want = ref(**embeds, num_inference_steps=4, guidance_scale=guidance, height=H, width=W, latents=latents.clone(),
               generator=torch.Generator().manual_seed(9), output_type="np").images
    kw = dict(negative_prompt=negative, steps=4, guidance=guidance, width=W, height=H, latents=latents.numpy(),
              output_type="np", progress=False)
    got = pipelines[preset](LONG, generator=torch_noise(9), **kw)
    assert_not_saturated(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    # The second chunk is what moved it from the first chunk's image.
    first = ref.tokenizer.decode(ref.tokenizer(LONG, add_special_tokens=False).input_ids[:75])
    assert np.abs(pipelines[preset](first, generator=torch_noise(9), **kw) - got).max() > 10 * TOL


def test_a_repeated_text_is_attended_to_as_once(model_dirs):
    """Why a shorter prompt may repeat its chunks: diffusers' U-Net given a text's embeddings
    twice over predicts what it predicts given them once (softmax weights halve, values repeat)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dirs["tiny-sd1"] / "unet")
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        once = unet(x, 500, encoder_hidden_states=text).sample
        twice = unet(x, 500, encoder_hidden_states=text.repeat(1, 2, 1)).sample
        other = unet(x, 500, encoder_hidden_states=torch.cat([text, torch.zeros_like(text)], 1)).sample
    torch.testing.assert_close(twice, once, rtol=0, atol=1e-5)
    assert (other - once).abs().max() > 1e-3  # padding with anything else is not neutral
