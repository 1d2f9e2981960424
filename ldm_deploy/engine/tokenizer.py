"""Prompt -> token ids with the `tokenizers` library and the engine's tokenizer.json."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ldm_deploy.errors import EngineError

log = logging.getLogger(__name__)


class PromptTokenizer:
    """Pads to the text encoder's length and truncates longer prompts with a warning, as
    diffusers does (the tokenizer.json carries the padding and truncation settings)."""

    def __init__(self, path: Path, length: int):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise EngineError(f"{path} is not a readable tokenizer ({e}); re-export the engine") from None
        self.length = length

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """(E,) prompts -> (E, length) int64 ids."""
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
