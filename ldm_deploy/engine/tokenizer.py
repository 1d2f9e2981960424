"""Prompt -> token ids with the `tokenizers` library and the engine's tokenizer.json, in chunks
of 77 as AUTOMATIC1111 makes them: start, 75 tokens of prompt, end (padded with the end token
then the model's pad token). A prompt of up to 75 tokens is one chunk, diffusers' ids exactly;
a longer one takes as many chunks as it needs, each encoded alone by the text encoder, and the
U-Net attends to them all. Where a chunk would end within COMMA_BACKTRACK tokens of a comma,
the words after the comma move to the next chunk; BREAK (with emphasis on) starts one; a
textual inversion's vectors never straddle two."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from ldm_deploy.engine.prompt_weights import BREAK_PIECE, parse
from ldm_deploy.errors import EngineError, InvalidRequest

log = logging.getLogger(__name__)

# AUTOMATIC1111's default "comma padding backtrack": at most this many tokens move.
COMMA_BACKTRACK = 20


class PromptTokenizer:
    """Calls give (E, n, 77) ids and weights for E prompts, n chunks: as many as the longest
    prompt needs, at most the engine's. A shorter prompt whose chunk count divides n repeats its
    own chunks: attention over a sequence repeated k times is attention over it once, so it
    draws as though alone, as AUTOMATIC1111 (which then runs prompt and negative prompt apart)
    and ComfyUI (which repeats them so) draw it. Otherwise it is padded with chunks of "", as
    AUTOMATIC1111's "Pad prompt/negative prompt to be same length" option does."""

    def __init__(self, path: Path, length: int, embeddings: tuple = ()):
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise EngineError(f"{path} is not a readable tokenizer ({e}); re-export the engine") from None
        self.length = length
        self.room = length - 2  # prompt tokens in a chunk: 75
        self.start, self.end, self.pad = tok.encode("").ids[:3]  # "" -> start, end, padding...
        # Each piece of prompt is tokenized alone, without padding or specials.
        tok.no_padding()
        tok.no_truncation()
        self.raw = tok
        self.comma = tok.token_to_id(",</w>")
        # Textual inversions of several vectors: the trigger word -> its tokens, written out as
        # diffusers' maybe_convert_prompt does ("word" -> "word word_1 word_2"; the tokenizer
        # knows each of them as an added token). In any case, as the tokenizer (which lowercases)
        # and AUTOMATIC1111 match it; diffusers' case-sensitive replace would leave "Word" one vector.
        self.expand = [(re.compile(re.escape(e["word"]), re.IGNORECASE),
                        " ".join([e["word"]] + [f"{e['word']}_{i}" for i in range(1, e["vectors"])]))
                       for e in embeddings if e["vectors"] > 1]
        # Their first token -> their vector count: they never straddle two chunks.
        self.vectors = {tok.token_to_id(e["word"]): e["vectors"] for e in embeddings if e["vectors"] > 1}

    def __call__(self, prompts: list[str], weighting: bool = False, max_chunks: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(E,) prompts -> (E, n, length) int64 ids and float32 weights (1 but where emphasis
        weighs a token: `weighting` reads AUTOMATIC1111's, prompt_weights.py)."""
        chunked = [self.chunks(p, weighting, max_chunks) for p in prompts]
        n = max(len(c) for c in chunked)
        ids = np.full((len(prompts), n, self.length), self.pad, np.int64)
        weights = np.ones((len(prompts), n, self.length), np.float32)
        for row, chunks in enumerate(chunked):
            if n % len(chunks) == 0:
                chunks = chunks * (n // len(chunks))
            for i in range(n):
                tokens, token_weights = chunks[i] if i < len(chunks) else ([], [])
                ids[row, i, : len(tokens) + 2] = [self.start, *tokens, self.end]
                with np.errstate(over="ignore"):  # (said below)
                    weights[row, i, 1 : len(tokens) + 1] = token_weights
        if not np.isfinite(weights).all():  # ((((...)))) thousands deep: 1.1 ** n overflows
            row = int(np.argwhere(~np.isfinite(weights))[0][0])
            raise InvalidRequest(f"the emphasis of the prompt {prompts[row][:60]!r}... weighs a word past what a "
                                 "float can hold (brackets nested hundreds deep?); use fewer brackets, or "
                                 "(word:weight)")
        return ids, weights

    def chunks(self, prompt: str, weighting: bool, max_chunks: int) -> list[tuple[list[int], list[float]]]:
        """One prompt -> its chunks' (tokens, weights), without start, end and padding; those
        past max_chunks are cut off with a warning. With one chunk allowed, as before long
        prompts: the cut falls where diffusers' does, after 75 tokens (no comma backtrack, no
        embedding moved whole), and BREAK only separates."""
        pieces = parse(self.expanded(prompt)) if weighting else [(self.expanded(prompt), 1.0)]
        backtrack = COMMA_BACKTRACK if max_chunks > 1 else 0
        chunks: list[tuple[list[int], list[float]]] = []
        tokens: list[int] = []
        weights: list[float] = []
        comma = -1  # where the current chunk's last comma is

        def close(keep: int | None = None) -> None:
            """End the current chunk after `keep` tokens (all); the rest start the next."""
            nonlocal tokens, weights, comma
            keep = len(tokens) if keep is None else keep
            chunks.append((tokens[:keep], weights[:keep]))
            tokens, weights, comma = tokens[keep:], weights[keep:], -1

        for text, weight in pieces:
            if (text, weight) == BREAK_PIECE:
                if max_chunks > 1:
                    close()
                continue
            ids = self.raw.encode(text, add_special_tokens=False).ids
            i = 0
            while i < len(ids):
                if ids[i] == self.comma:
                    comma = len(tokens)
                elif len(tokens) == self.room and comma >= 0 and len(tokens) - comma <= backtrack:
                    close(comma + 1)  # the words after the comma go on in the next chunk
                if len(tokens) == self.room:
                    close()
                n = self.vectors.get(ids[i], 1) if max_chunks > 1 else 1
                if len(tokens) + n > self.room:
                    close()
                tokens += ids[i : i + n]
                weights += [weight] * n
                i += n
        if tokens or not chunks:
            close()
        if len(chunks) > max_chunks:
            dropped = [t for c in chunks[max_chunks:] for t in c[0]]
            text = "".join(self.raw.id_to_token(t) for t in dropped).replace("</w>", " ").strip()
            log.warning("the prompt needs %d chunks of %d tokens (BREAK, and commas near a chunk's end, start "
                        "new ones) and this engine takes %d (ldm-export --max-prompt-tokens sets it; engines "
                        "with --static-shapes or from before long prompts take one); this part was cut off: %r%s",
                        len(chunks), self.room, max_chunks, text[:200], f" (and {len(text) - 200} characters more)"
                        if len(text) > 200 else "")
        return chunks[:max_chunks]

    def expanded(self, prompt: str) -> str:
        for word, tokens in self.expand:
            prompt = word.sub(lambda _: tokens, prompt)
        return prompt
