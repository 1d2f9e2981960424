"""Prompt -> token ids with the `tokenizers` library and the engine's tokenizer.json."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from ldm_deploy.errors import EngineError

log = logging.getLogger(__name__)


class PromptTokenizer:
    """Pads to the text encoder's length and truncates longer prompts with a warning, as
    diffusers does (the tokenizer.json carries the padding and truncation settings)."""

    def __init__(self, path: Path, length: int, embeddings: tuple = ()):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise EngineError(f"{path} is not a readable tokenizer ({e}); re-export the engine") from None
        self.length = length
        # For prompts with emphasis: each piece tokenized alone, without padding or specials.
        self.raw = Tokenizer.from_file(str(path))
        self.raw.no_padding()
        self.raw.no_truncation()
        self.start, self.end, self.pad = self.tok.encode("").ids[:3]  # "" -> start, end, padding...
        # Textual inversions of several vectors: the trigger word -> its tokens, written out as
        # diffusers' maybe_convert_prompt does ("word" -> "word word_1 word_2"; the tokenizer
        # knows each of them as an added token). In any case, as the tokenizer (which lowercases)
        # and AUTOMATIC1111 match it; diffusers' case-sensitive replace would leave "Word" one vector.
        self.expand = [(re.compile(re.escape(e["word"]), re.IGNORECASE),
                        " ".join([e["word"]] + [f"{e['word']}_{i}" for i in range(1, e["vectors"])]))
                       for e in embeddings if e["vectors"] > 1]

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """(E,) prompts -> (E, length) int64 ids."""
        prompts = [self.expanded(p) for p in prompts]
        encodings = self.tok.encode_batch(prompts)
        for prompt, enc in zip(prompts, encodings):
            if enc.overflowing:
                tokens = [t for o in enc.overflowing for t in o.tokens if not t.startswith("<|")]
                dropped = "".join(tokens).replace("</w>", " ").strip()
                log.warning(
                    "the prompt is longer than %d tokens; this part was cut off: %r",
                    self.length, dropped,
                )
        return np.array([enc.ids for enc in encodings], dtype=np.int64)

    def weighted(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(E,) prompts with AUTOMATIC1111 emphasis -> (E, length) int64 ids and (E, length)
        float32 weights. Each (text, weight) piece is tokenized alone, as AUTOMATIC1111 does;
        the start, end and padding tokens weigh 1. A prompt without emphasis gets the ids of
        __call__ and weights of 1."""
        from ldm_deploy.engine.prompt_weights import parse

        ids = np.full((len(prompts), self.length), self.pad, np.int64)
        weights = np.ones((len(prompts), self.length), np.float32)
        room = self.length - 2
        for row, prompt in enumerate(prompts):
            tokens, token_weights = [], []
            for text, weight in parse(self.expanded(prompt)):
                piece = self.raw.encode(text, add_special_tokens=False).ids
                tokens += piece
                token_weights += [weight] * len(piece)
            if len(tokens) > room:
                dropped = "".join(self.raw.id_to_token(t) for t in tokens[room:]).replace("</w>", " ").strip()
                log.warning("the prompt is longer than %d tokens; this part was cut off: %r", self.length, dropped)
            tokens, token_weights = tokens[:room], token_weights[:room]
            ids[row, : len(tokens) + 2] = [self.start, *tokens, self.end]
            weights[row, 1 : len(tokens) + 1] = token_weights
        return ids, weights

    def expanded(self, prompt: str) -> str:
        for word, tokens in self.expand:
            prompt = word.sub(lambda _: tokens, prompt)
        return prompt
