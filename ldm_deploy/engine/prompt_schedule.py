"""AUTOMATIC1111's prompt editing: a prompt that changes during sampling.

    [from:to:when]  "from" until step `when`, then "to" (when < 1: a fraction of the steps)
    [to:when]       nothing, then "to"             [from::when]  "from", then nothing
    [a|b|c]         a, b, c, a, ... one a step (alternation)

They nest, and sit inside emphasis brackets: "a [(dog:1.2):cat:0.5]". `schedule` turns a prompt
into (last step, text) pairs as AUTOMATIC1111's get_learned_conditioning_prompt_schedules
does; `text_at` picks the text of a sampler step, counted from 0 as AUTOMATIC1111's denoiser
counts (so "[a:b:3]" draws "a" for steps 0..3). Brackets that are none of these stay text, for
prompt_weights.py; a "|" outside an alternation makes AUTOMATIC1111's grammar fail, and then the
whole prompt is text, as there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_DEPTH = 50  # brackets nested deeper: the prompt is text (and Python's stack safe)
NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)")
SPECIAL = "[]():|\\"


@dataclass(frozen=True)
class Scheduled:
    before: tuple  # nodes; () for "[to:when]"
    after: tuple
    when: float


@dataclass(frozen=True)
class Alternate:
    options: tuple  # of node tuples


class Unparsed(Exception):
    """The prompt does not follow the grammar: it is all text."""


class Parser:
    """Recursive descent over the prompt; nodes are str (text, brackets kept), Scheduled,
    Alternate. A bracket that opens nothing valid is text, and parsing goes on after it."""

    def __init__(self, text: str):
        self.text = text
        self.memo = {}  # (bracket, pos) -> its parse: a failed bracket is re-read from each enclosing one
        self.depth = 0

    def parse(self) -> tuple:
        nodes, pos = self.sequence(0, stops="")
        if pos != len(self.text):  # a stray "|": AUTOMATIC1111's grammar has no place for it
            raise Unparsed
        return nodes

    def sequence(self, pos: int, stops: str) -> tuple[tuple, int]:
        """Nodes from pos up to (not including) a character in `stops`, or the end."""
        nodes = []
        while pos < len(self.text):
            c = self.text[pos]
            if c in stops or c == "|":
                break
            if c == "\\":
                nodes.append(self.text[pos:pos + 2])
                pos += 2
            elif c == "[":
                node, pos = self.square(pos)
                nodes.append(node)
            elif c == "(":
                node, pos = self.round(pos)
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

    def round(self, pos: int) -> tuple[object, int]:
        """ "(" ... ")" with at most one ":" inside (emphasis): kept as text around its nodes."""
        return self.nested("(", pos, self.read_round)

    def read_round(self, pos: int) -> tuple[object, int]:
        first, p = self.sequence(pos + 1, stops=":)]")
        inner = list(first)
        if p < len(self.text) and self.text[p] == ":":
            second, p = self.sequence(p + 1, stops=":)]")
            inner += [":", *second]
        if p < len(self.text) and self.text[p] == ")":
            return ("(", *inner, ")"), p + 1
        return "(", pos + 1

    def square(self, pos: int) -> tuple[object, int]:
        """ "[" ... "]": a schedule, an alternation, or emphasis (kept as text around its nodes)."""
        return self.nested("[", pos, self.read_square)

    def nested(self, bracket: str, pos: int, read) -> tuple[object, int]:
        if (bracket, pos) not in self.memo:
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise Unparsed
            self.memo[bracket, pos] = read(pos)
            self.depth -= 1
        return self.memo[bracket, pos]

    def read_square(self, pos: int) -> tuple[object, int]:
        first, p = self.sequence(pos + 1, stops=":|])")
        at = self.text[p] if p < len(self.text) else ""
        if at == "|":
            options = [first]
            while p < len(self.text) and self.text[p] == "|":
                option, p = self.sequence(p + 1, stops=":|])")
                options.append(option)
            if p < len(self.text) and self.text[p] == "]":
                return Alternate(tuple(options)), p + 1
        elif at == "]":
            return ("[", *first, "]"), p + 1
        elif at == ":":
            when = self.number(p + 1)  # "[to:when]"
            if when is not None:
                return Scheduled((), first, when[0]), when[1]
            second, q = self.sequence(p + 1, stops=":|])")
            if q < len(self.text) and self.text[q] == ":":
                when = self.number(q + 1)  # "[from:to:when]"
                if when is not None:
                    return Scheduled(first, second, when[0]), when[1]
        return "[", pos + 1

    def number(self, pos: int) -> tuple[float, int] | None:
        """A number (spaces before it allowed) closed by "]", and the position after the "]"."""
        m = NUMBER.match(self.text, pos)
        if m and m.end() < len(self.text) and self.text[m.end()] == "]":
            return float(m.group(1)), m.end() + 1
        return None


def schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """(last step, text) pairs, the last step `steps`: AUTOMATIC1111's prompt schedule."""
    try:
        nodes = Parser(prompt).parse()
    except Unparsed:
        return [(steps, prompt)]
    ends = {steps}

    def collect(nodes):
        for n in nodes:
            if isinstance(n, Scheduled):
                ends.add(min(steps, int(n.when * steps if n.when < 1 else n.when)))
                collect(n.before)
                collect(n.after)
            elif isinstance(n, Alternate):
                ends.update(range(1, steps + 1))
                for option in n.options:
                    collect(option)
            elif isinstance(n, tuple):
                collect(n)

    collect(nodes)
    return [(end, render(nodes, end, steps)) for end in sorted(ends)]


def render(nodes, step: int, steps: int) -> str:
    out = []
    for n in nodes:
        if isinstance(n, str):
            out.append(n)
        elif isinstance(n, Scheduled):
            when = min(steps, int(n.when * steps if n.when < 1 else n.when))
            out.append(render(n.before if step <= when else n.after, step, steps))
        elif isinstance(n, Alternate):
            out.append(render(n.options[(step - 1) % len(n.options)], step, steps))
        else:
            out.append(render(n, step, steps))
    return "".join(out)


def text_at(pairs: list[tuple[int, str]], step: int) -> str:
    """The text sampler step `step` (from 0) uses: the first pair whose last step it has not passed."""
    return next((text for end, text in pairs if step <= end), pairs[-1][1])
