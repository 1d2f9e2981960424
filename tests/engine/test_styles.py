"""AUTOMATIC1111's saved styles: its styles.csv read, and its merge (modules/styles.py) of each
style into the prompts, checked on the texts it gives; through ldm-run, the image of the merged
prompts."""

import numpy as np
import pytest
from PIL import Image

from ldm_deploy.cli.run import main as run_main
from ldm_deploy.engine import styles
from ldm_deploy.errors import InvalidRequest, UserError

CSV = '''name,prompt,negative_prompt
Cinematic,"cinematic still of {prompt}, film grain","cartoon, painting"
Sharp,"sharp focus, highly detailed",blurry
Plain,,
'''


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(CSV, encoding="utf-8")
    return path


def test_read_and_apply_in_order(saved):
    s = styles.read(saved)
    assert list(s) == ["Cinematic", "Sharp", "Plain"]
    assert s["Sharp"] == styles.Style("Sharp", "sharp focus, highly detailed", "blurry")
    # {prompt} takes the prompt; other texts come after a comma; each style applies to the last result
    assert styles.apply(["Cinematic", "Sharp"], s, "a cat", "ugly") == (
        "cinematic still of a cat, film grain, sharp focus, highly detailed", "ugly, cartoon, painting, blurry")
    assert styles.apply(["Sharp", "Cinematic"], s, "a cat", None) == (
        "cinematic still of a cat, sharp focus, highly detailed, film grain", "blurry, cartoon, painting")
    # empty parts are left out; no negative given and none in the style: still none (SDXL: zeros)
    assert styles.apply(["Sharp"], s, "", None) == ("sharp focus, highly detailed", "blurry")
    assert styles.apply(["Plain"], s, " a dog ", None) == ("a dog", None)
    assert styles.apply(["Plain"], s, "a dog", "") == ("a dog", "")
    assert styles.apply([], s, "a dog", None) == ("a dog", None)


def test_bad_files_and_names(saved, tmp_path):
    with pytest.raises(InvalidRequest, match=r"no style named 'Noir' \(the styles there are: 'Cinematic', 'Sharp', "):
        styles.apply(["Noir"], styles.read(saved), "a cat", None)
    with pytest.raises(InvalidRequest, match="styles is a list of style names"):
        styles.apply("Sharp", styles.read(saved), "a cat", None)
    with pytest.raises(UserError, match="cannot read the styles file"):
        styles.read(tmp_path / "missing.csv")
    other = tmp_path / "other.csv"
    other.write_text("title,text\nA,b\n")
    with pytest.raises(UserError, match="is not an AUTOMATIC1111 styles file"):
        styles.read(other)
    for bad in (5, True, {"Sharp": 1}, "Sharp", [3]):
        with pytest.raises(InvalidRequest, match="styles is a list of style names"):
            styles.apply(bad, styles.read(saved), "a cat", None)
    old = tmp_path / "old.csv"  # its old column name, and a comment row, as its web UI reads them
    old.write_text('name,text\n# notes,x\nOld,"old {prompt}"\n')
    assert styles.read(old) == {"Old": styles.Style("Old", "old {prompt}", "")}
    bom = tmp_path / "bom.csv"  # as spreadsheet programs save it
    bom.write_bytes("\ufeffname,prompt,negative_prompt\nX,x {prompt},\n".encode("utf-8"))
    assert styles.read(bom)["X"].prompt == "x {prompt}"


def test_ldm_run_draws_the_styled_prompts(saved, engine_dirs, pipelines, tmp_path, capsys):
    out = tmp_path / "styled.png"
    common = ["--engine", str(engine_dirs["tiny-sd1"]), "--steps", "2", "--seed", "3", "--width", "64", "--height", "64",
              "-q"]
    assert run_main(["a cat", "--style", "Cinematic", "--style", "Sharp", "--styles-file", str(saved),
                     "--out", str(out), *common]) == 0, capsys.readouterr().err
    im = Image.open(out)
    prompt, negative = "cinematic still of a cat, film grain, sharp focus, highly detailed", "cartoon, painting, blurry"
    assert im.info["parameters"].splitlines()[:2] == [prompt, f"Negative prompt: {negative}"]
    want = pipelines["tiny-sd1"](prompt, negative_prompt=negative, steps=2, seed=3, width=64, height=64,
                                 sampler="dpmpp_2m_karras", guidance=7.5, progress=False)[0]
    assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(want.convert("RGB")))
    # a PNG drawn with styles holds them: drawn again with them, they are not applied twice
    again = tmp_path / "again.png"
    assert run_main(["--from-png", str(out), "--style", "Cinematic", "--style", "Sharp", "--styles-file", str(saved),
                     "--out", str(again), *common]) == 0, capsys.readouterr().err
    assert Image.open(again).info["parameters"].splitlines()[:2] == [prompt, f"Negative prompt: {negative}"]
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), np.asarray(im.convert("RGB")))
    assert styles.unapply(["Sharp"], styles.read(saved), "a dog", "") == ("a dog", "", [])  # not there
    # a side typed on the command line (None here) is neither checked nor changed
    assert styles.unapply(["Sharp"], styles.read(saved), "a dog, sharp focus, highly detailed", None) == (
        "a dog", None, ["Sharp"])
    hires_png = tmp_path / "hires.png"
    assert run_main(["a dog", "--style", "Sharp", "--styles-file", str(saved), "--hires-scale", "1.5",
                     "--hires-prompt", "a black dog", "--out", str(hires_png), *common]) == 0, capsys.readouterr().err
    text = Image.open(hires_png).info["parameters"]
    assert "Hires prompt: \"a black dog, sharp focus, highly detailed\"" in text
    assert run_main(["--from-png", str(hires_png), "--style", "Sharp", "--styles-file", str(saved), "--negative-prompt",
                     "bad hands", "--out", str(again), *common]) == 0, capsys.readouterr().err
    lines = Image.open(again).info["parameters"].splitlines()
    assert lines[:2] == ["a dog, sharp focus, highly detailed", "Negative prompt: bad hands, blurry"]
    assert "Hires prompt: \"a black dog, sharp focus, highly detailed\"" in lines[2]
    assert run_main(["a cat", "--style", "Noir", "--styles-file", str(saved), "--out", str(out), *common]) == 2
    assert "no style named 'Noir'" in capsys.readouterr().err
    assert run_main(["a cat", "--style", "Sharp", "--styles-file", str(tmp_path / "none.csv"), "--out", str(out),
                     *common]) == 2
    assert "cannot read the styles file" in capsys.readouterr().err
