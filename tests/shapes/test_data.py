"""The synthetic dataset: deterministic, captions that say what is drawn, held-out triples
never drawn in training."""

from __future__ import annotations

import random

import numpy as np

from ldm_deploy.shapes import data


def test_same_seed_same_dataset_other_seed_other():
    a, sa = data.dataset(50, seed=3)
    b, sb = data.dataset(50, seed=3)
    c, _ = data.dataset(50, seed=4)
    assert np.array_equal(a, b) and [s.caption for s in sa] == [s.caption for s in sb]
    assert not np.array_equal(a, c)
    assert a.shape == (50, 64, 64, 3) and a.dtype == np.uint8


def test_held_out_triples_never_drawn_but_their_parts_are():
    rng = random.Random(7)
    scenes = [data.sample_scene(rng) for _ in range(5000)]
    drawn = {(sh.color, sh.shape, sc.background) for sc in scenes for sh in sc.shapes}
    assert not drawn & data.HELD_OUT
    assert len(data.HELD_OUT) == 16
    for fg, shape, bg in data.HELD_OUT:  # each part of a held-out triple is seen in other triples
        assert any(d[0] == fg and d[1] == shape for d in drawn)
        assert any(d[1] == shape and d[2] == bg for d in drawn)
        assert any(d[0] == fg and d[2] == bg for d in drawn)
    assert sum(len(sc.shapes) == 2 for sc in scenes) / len(scenes) > 0.15


def test_captions_name_what_is_drawn():
    rng = random.Random(8)
    for _ in range(2000):
        sc = data.sample_scene(rng)
        words = sc.caption.replace(",", "").split()
        for sh in sc.shapes:
            assert sh.color in words and sh.shape in words, sc
        if "background" in words or " on " + sc.background in sc.caption:
            assert sc.background in words, sc
        # no colour is named that is not drawn (some captions leave the background unsaid)
        assert set(words) & set(data.COLORS) <= {sh.color for sh in sc.shapes} | {sc.background}


def test_render_draws_the_shape_inside_the_frame():
    rng = random.Random(9)
    for _ in range(200):
        sc = data.sample_scene(rng, two_shapes=0)
        im = data.render(sc)
        sh = sc.shapes[0]
        # the centre (a triangle's lower middle) has the shape's colour; the frame the background's
        y = int(sh.cy + (sh.half / 2 if sh.shape == "triangle" else 0))
        assert tuple(im[y, int(sh.cx)]) == data.COLORS[sh.color]
        frame = np.concatenate([im[:2].reshape(-1, 3), im[-2:].reshape(-1, 3), im[:, :2].reshape(-1, 3), im[:, -2:].reshape(-1, 3)])
        assert (frame == data.COLORS[sc.background]).all()


def test_eval_prompts_are_the_held_out_triples():
    prompts = data.eval_prompts()
    assert {t for _, t in prompts} == data.HELD_OUT
    assert all(f"{fg} {shape} on a" in p and f"{bg} background" in p for p, (fg, shape, bg) in prompts)
