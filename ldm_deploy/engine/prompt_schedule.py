"""AUTOMATIC1111's prompt editing: a prompt that changes during sampling.

    [from:to:when]  "from" until step `when`, then "to"
    [to:when]       nothing, then "to"             [from::when]  "from", then nothing
    [a|b|c]         a, b, c, a, ... one a step (alternation)

`when` as AUTOMATIC1111 reads it since 1.6 (its default "new" timelines): a number with a decimal
point is a fraction of the steps ("0.5", "1.0": all of them), one without a count of steps; in the
hires fix's second pass, fractions count from 1.0 and counts from the first pass's steps, so that
"[a:b:1.5]" switches halfway through the second pass. They nest, and sit inside emphasis brackets:
"a [(dog:1.2):cat:0.5]".

`schedule` turns a prompt into (last step, text) pairs as AUTOMATIC1111's
get_learned_conditioning_prompt_schedules does; `text_at` picks the text of a U-Net evaluation,
counted from 0 as its denoiser counts them (so "[a:b:3]" draws "a" for evaluations 0..3). Brackets
at the top level that open nothing valid stay text, for prompt_weights.py; a broken construct
inside another, a "|" outside an alternation or a backslash that escapes nothing make
AUTOMATIC1111's grammar fail, and then the whole prompt is text, as there.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

MAX_DEPTH = 50  # brackets nested deeper: the prompt is text (and Python's stack safe)
NUMBER = re.compile(r"\s*([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*")
SPECIAL = "[]():|\\"


@dataclass(frozen=True)
class Scheduled:
    before: tuple  # nodes; () for "[to:when]"
    after: tuple
    when: str  # as written: a decimal point makes it a fraction


@dataclass(frozen=True)
class Alternate:
    options: tuple  # of node tuples


class Unparsed(Exception):
    """The prompt does not follow the grammar: it is all text."""


class Parser:
    """Recursive descent over the prompt; nodes are str (text, brackets kept), Scheduled,
    Alternate. At the top level a bracket that opens nothing valid is text and parsing goes on
    after it; inside a construct it breaks the construct (None)."""

    def __init__(self, text: str):
        self.text = text
        self.memo = {}  # (bracket, pos) -> its parse: a failed bracket is re-read from each enclosing one
        self.depth = 0

    def parse(self) -> tuple:
        nodes, pos = self.sequence(0, stops="")
        if pos != len(self.text):  # a stray "|": AUTOMATIC1111's grammar has no place for it
            raise Unparsed
        return nodes

    def sequence(self, pos: int, stops: str) -> tuple[tuple, int] | None:
        """Nodes from pos up to (not including) a character in `stops`, or the end; None where
        a construct inside fails (not at the top level, where stops is "")."""
        nodes = []
        while pos < len(self.text):
            c = self.text[pos]
            if c in stops or c == "|":
                break
            if c == "\\":
                if pos + 1 == len(self.text) or self.text[pos + 1] == "\n":
                    raise Unparsed  # escapes nothing: AUTOMATIC1111's grammar fails
                nodes.append(self.text[pos:pos + 2])
                pos += 2
            elif c in "[(":
                node = (self.square if c == "[" else self.round)(pos)
                if node is None and stops:
                    return None
                node, pos = node or (c, pos + 1)  # top level: a stray bracket is text
                nodes.append(node)
            elif c in "]):" and not stops:  # stray at the top level: text
                nodes.append(c)
                pos += 1
            elif c in "]):":
                break  # ends the enclosing construct (or makes it invalid)
            else:
                end = pos
                while end < len(self.text) and self.text[end] not in SPECIAL:
                    end += 1
                nodes.append(self.text[pos:end])
                pos = end
        return tuple(nodes), pos

    def round(self, pos: int) -> tuple[object, int] | None:
        """ "(" ... ")" with at most one ":" inside (emphasis): kept as text around its nodes."""
        return self.nested("(", pos, self.read_round)

    def read_round(self, pos: int) -> tuple[object, int] | None:
        first = self.sequence(pos + 1, stops=":)]")
        if first is None:
            return None
        inner, p = list(first[0]), first[1]
        if p < len(self.text) and self.text[p] == ":":
            second = self.sequence(p + 1, stops=":)]")
            if second is None:
                return None
            inner, p = inner + [":", *second[0]], second[1]
        if p < len(self.text) and self.text[p] == ")":
            return ("(", *inner, ")"), p + 1
        return None

    def square(self, pos: int) -> tuple[object, int] | None:
        """ "[" ... "]": a schedule, an alternation, or emphasis (kept as text around its nodes)."""
        return self.nested("[", pos, self.read_square)

    def nested(self, bracket: str, pos: int, read):
        if (bracket, pos) not in self.memo:
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise Unparsed
            self.memo[bracket, pos] = read(pos)
            self.depth -= 1
        return self.memo[bracket, pos]

    def read_square(self, pos: int) -> tuple[object, int] | None:
        first = self.sequence(pos + 1, stops=":|])")
        if first is None:
            return None
        first, p = first
        at = self.text[p] if p < len(self.text) else ""
        if at == "|":
            options = [first]
            while p < len(self.text) and self.text[p] == "|":
                option = self.sequence(p + 1, stops=":|])")
                if option is None:
                    return None
                options.append(option[0])
                p = option[1]
            if p < len(self.text) and self.text[p] == "]":
                return Alternate(tuple(options)), p + 1
        elif at == "]":
            return ("[", *first, "]"), p + 1
        elif at == ":":
            when = self.number(p + 1)  # "[to:when]"
            if when is not None:
                return Scheduled((), first, when[0]), when[1]
            second = self.sequence(p + 1, stops=":|])")
            if second is not None and second[1] < len(self.text) and self.text[second[1]] == ":":
                when = self.number(second[1] + 1)  # "[from:to:when]"
                if when is not None:
                    return Scheduled(first, second[0], when[0]), when[1]
        return None

    def number(self, pos: int) -> tuple[str, int] | None:
        """A number (spaces around it allowed) closed by "]", and the position after the "]"."""
        m = NUMBER.match(self.text, pos)
        if m and m.end() < len(self.text) and self.text[m.end()] == "]":
            return m.group(1), m.end() + 1
        return None


def schedule(prompt: str, steps: int, first_pass_steps: int | None = None) -> list[tuple[int, str]]:
    """(last step, text) pairs, the last step `steps`: AUTOMATIC1111's prompt schedule over
    `steps` U-Net evaluations; first_pass_steps: this is the hires fix's second pass, and the
    first pass took that many."""
    try:
        nodes = Parser(prompt).parse()
    except Unparsed:
        return [(steps, prompt)]
    ends = {steps}

    def collect(nodes):
        for n in nodes:
            if isinstance(n, Scheduled):
                end = last_step(n.when, steps, first_pass_steps)
                if end >= 1:
                    ends.add(end)
                collect(n.before)
                collect(n.after)
            elif isinstance(n, Alternate):
                ends.update(range(1, steps + 1))
                for option in n.options:
                    collect(option)
            elif isinstance(n, tuple):
                collect(n)

    collect(nodes)
    return [(end, render(nodes, end, steps, first_pass_steps)) for end in sorted(ends)]


def last_step(when: str, steps: int, first_pass_steps: int | None) -> int:
    """The last step of "from": a fraction of the steps (a decimal point) or a count of them,
    each past the first pass's in a hires pass."""
    v = float(when)
    if "." in when:
        v = (v - (1.0 if first_pass_steps is not None else 0.0)) * steps
    else:
        v -= first_pass_steps or 0
    return int(min(max(v, -1.0), steps)) if math.isfinite(v) else (steps if v > 0 else -1)


def render(nodes, step: int, steps: int, first_pass_steps: int | None) -> str:
    out = []
    for n in nodes:
        if isinstance(n, str):
            out.append(n)
        elif isinstance(n, Scheduled):
            keep = step <= last_step(n.when, steps, first_pass_steps)
            out.append(render(n.before if keep else n.after, step, steps, first_pass_steps))
        elif isinstance(n, Alternate):
            out.append(render(n.options[(step - 1) % len(n.options)], step, steps, first_pass_steps))
        else:
            out.append(render(n, step, steps, first_pass_steps))
    return "".join(out)


def text_at(pairs: list[tuple[int, str]], step: int) -> str:
    """The text U-Net evaluation `step` (from 0) uses: the first pair whose last step it has not passed."""
    return next((text for end, text in pairs if step <= end), pairs[-1][1])
