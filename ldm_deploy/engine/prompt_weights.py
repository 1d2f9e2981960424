"""AUTOMATIC1111's prompt emphasis: "(word)", "[word]", "(word:1.3)", as its web UI and ComfyUI read
prompts.

    (text)      weight x 1.1        ((text)) x 1.21, and so on
    [text]      weight / 1.1
    (text:1.3)  weight x 1.3
    \\( \\) \\[ \\]  the characters themselves

    BREAK       starts a new 75-token chunk (tokenizer.py)

Unclosed brackets apply to the end of the prompt. `parse` gives (text, weight) pieces, and
BREAK_PIECE for each BREAK; the tokenizer gives each piece's tokens its weight, and the text encoder multiplies each token's
hidden state by it, then rescales the prompt's hidden states to their unweighted mean
(AUTOMATIC1111's "Original" emphasis).
"""

from __future__ import annotations

import re

# One match per piece: an escape, a bracket, a weight closing a round bracket, a run of text,
# or a lone colon.
PIECE = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
# AUTOMATIC1111 starts a new 75-token chunk at BREAK, with the spaces around it dropped.
BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK_PIECE = ("BREAK", None)  # brackets around it do not weigh it (AUTOMATIC1111's would make it text)
ROUND, SQUARE = 1.1, 1 / 1.1


def parse(text: str) -> list[tuple[str, float | None]]:
    """'an (important) word' -> [('an ', 1.0), ('important', 1.1), (' word', 1.0)];
    'a BREAK b' -> [('a', 1.0), BREAK_PIECE, ('b', 1.0)]."""
    pieces: list[list] = []
    round_open: list[int] = []  # where each open bracket's range starts in `pieces`
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not None:
                piece[1] *= factor

    for m in PIECE.finditer(text):
        s, weight = m.group(0), m.group(1)
        if s.startswith("\\"):
            pieces.append([s[1:], 1.0])
        elif s == "(":
            round_open.append(len(pieces))
        elif s == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open and number(weight) is not None:
            scale(round_open.pop(), number(weight))
        elif s == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif s == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(BREAK.split(s)):
                if i:
                    pieces.append(list(BREAK_PIECE))
                pieces.append([part, 1.0])
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)
    merged: list[list] = []
    for piece in pieces:
        if not piece[0] and piece[1] is not None:
            continue  # the empty text beside a BREAK
        if merged and merged[-1][1] == piece[1] and piece[1] is not None:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged] or [("", 1.0)]


def number(text: str) -> float | None:
    """The weight in "(word:1.3)", or None where it does not parse ("1.2.3", on which AUTOMATIC1111
    fails): the piece then stays text, the bracket open."""
    try:
        return float(text)
    except ValueError:
        return None
