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
        if name:  # (its web UI writes an empty "None" row first in old versions)
            out[name] = Style(name, row.get("prompt") or "", row.get("negative_prompt") or "")
    return out


def merge(style_text: str, prompt: str) -> str:
    """AUTOMATIC1111's merge of one style text into a prompt."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply(names, styles: dict[str, Style], prompt: str, negative_prompt: str | None) -> tuple[str, str | None]:
    """(prompt, negative prompt) with the named styles merged in, in order; an unknown name is an
    InvalidRequest naming those there are. A negative prompt left None stays None unless a style
    gives one."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
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
