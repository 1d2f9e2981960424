"""AUTOMATIC1111's saved styles: named prompt and negative prompt texts merged into a request's.

Its styles.csv, as its web UI writes it:

    name,prompt,negative_prompt
    Cinematic,"cinematic still of {prompt}, film grain","cartoon, painting"
    Sharp,"sharp focus, highly detailed",blurry

A style text holding "{prompt}" takes the prompt in that place; any other is appended after a
comma (an empty side is left out). Styles apply in the order named, each to the result of the
last, to the prompt and the negative prompt alike (and to the hires pass's own prompts).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ldm_deploy.errors import InvalidRequest, UserError


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def read(path: str | Path) -> dict[str, Style]:
    """name -> Style from an AUTOMATIC1111 styles.csv; a UserError saying what is wrong."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f, skipinitialspace=True))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read the styles file {path}: {e}") from None
    if rows and "name" not in rows[0]:
        raise UserError(f"{path} is not an AUTOMATIC1111 styles file: its first line must name the columns "
                        "name,prompt,negative_prompt")
    out = {}
    for row in rows:
        name = (row.get("name") or "").strip()
        if name and not name.startswith("#"):  # (its web UI skips "#" rows as comments)
            prompt = row["prompt"] if "prompt" in row else row.get("text")  # "text": its old column name
            out[name] = Style(name, prompt or "", row.get("negative_prompt") or "")
    return out


def merge(style_text: str, prompt: str) -> str:
    """AUTOMATIC1111's merge of one style text into a prompt."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def extract(style_text: str, prompt: str) -> str | None:
    """The prompt without one style's text, where it holds it (as AUTOMATIC1111 finds a pasted
    prompt's styles); None where it does not."""
    prompt, style_text = prompt.strip(), style_text.strip()
    if "{prompt}" in style_text:
        left, _, right = style_text.partition("{prompt}")
        if prompt.startswith(left) and prompt.endswith(right) and len(prompt) >= len(left) + len(right):
            return prompt[len(left):len(prompt) - len(right)]
        return None
    if prompt.endswith(style_text):
        return prompt[:len(prompt) - len(style_text)].removesuffix(", ")
    return None


def unapply(names, styles: dict[str, Style], prompt: str | None, negative_prompt: str | None
            ) -> tuple[str | None, str | None, list]:
    """(prompt, negative prompt, names found): the named styles that a pasted prompt already holds,
    last applied first, taken out of it and its negative prompt, as AUTOMATIC1111 reads a pasted
    prompt's styles: a style counts as there where each side given holds its text (None: a side
    not pasted, neither checked nor changed; "" a pasted side that is empty)."""
    found = []
    for name in reversed(names):
        style = styles.get(name)
        if style is None or (prompt is None and negative_prompt is None):
            continue
        bare = None if prompt is None else extract(style.prompt, prompt)
        bare_negative = None if negative_prompt is None else extract(style.negative_prompt, negative_prompt)
        if (prompt is None or bare is not None) and (negative_prompt is None or bare_negative is not None):
            prompt = prompt if prompt is None else bare
            negative_prompt = negative_prompt if negative_prompt is None else bare_negative
            found = [name, *found]
    return prompt, negative_prompt, found


def apply(names, styles: dict[str, Style], prompt: str, negative_prompt: str | None) -> tuple[str, str | None]:
    """(prompt, negative prompt) with the named styles merged in, in order; an unknown name is an
    InvalidRequest naming those there are. A negative prompt left None stays None unless a style
    gives one."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise InvalidRequest(f"styles is a list of style names, got {names!r}")
    for name in names:
        if name not in styles:
            known = ", ".join(repr(s) for s in styles) or "none: give a styles file"
            raise InvalidRequest(f"no style named {name!r} (the styles there are: {known})")
        style = styles[name]
        prompt = merge(style.prompt, prompt)
        merged = merge(style.negative_prompt, negative_prompt or "")
        negative_prompt = None if negative_prompt is None and not merged else merged
    return prompt, negative_prompt
