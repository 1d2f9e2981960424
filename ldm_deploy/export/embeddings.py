"""Textual inversion embeddings (AUTOMATIC1111's embeddings/ folder: EasyNegative, bad-hands-5,
...), added to the tokenizer and the text encoder at export, as diffusers' load_textual_inversion
adds them.

An embedding is n learned token vectors. Its trigger word becomes a new token whose row of the
text encoder's token table is the first vector; vectors 2..n become the tokens `word_1` ...
`word_{n-1}`, and the runtime writes "word" in a prompt as "word word_1 ... word_{n-1}"
(diffusers' maybe_convert_prompt), so the n vectors sit where the word was.

File layouts (one embedding per file):
    AUTOMATIC1111 .pt       {"string_to_param": {"*": (n, D)}, "name": ...}   (pickle)
    AUTOMATIC1111 .safetensors  {"emb_params": (n, D)}
    diffusers               {"<token>": (D,) or (n, D)}  (learned_embeds.safetensors / .bin)
    SDXL                    {"clip_l": (n, 768), "clip_g": (n, 1280)}: one set of vectors per text encoder
The trigger word is the file's name without its suffix, as AUTOMATIC1111 uses it, except for the
diffusers layout, whose one key is its token; `FILE:WORD` names another.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ldm_deploy.errors import ModelSourceError
from ldm_deploy.export import single_file
from ldm_deploy.export.source import hash_files

log = logging.getLogger(__name__)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """"EasyNegative.safetensors" -> (file, None); "file.pt:badhand" -> (file, "badhand")."""
    if Path(spec).expanduser().exists():
        return spec, None
    path, _, word = spec.rpartition(":")
    if not path or not word or "/" in word or "\\" in word:
        return spec, None
    return path, word


def vectors(ck, path: Path):
    """(n, D) float32 vectors of the file's one embedding, the token its layout names (or None),
    and for an SDXL file the (n, D2) vectors of the second text encoder (else None)."""
    state = ck.state
    if {"clip_l", "clip_g"} <= set(state):
        first, _ = one_vectors({"emb_params": state["clip_l"]}, path)
        second, _ = one_vectors({"emb_params": state["clip_g"]}, path)
        if len(first) != len(second):
            raise ModelSourceError(f"--embedding {path}: its clip_l and clip_g hold {len(first)} and {len(second)} "
                                   "vectors; an SDXL embedding has as many for each text encoder")
        return first, None, second
    return (*one_vectors(state, path), None)


def one_vectors(state: dict, path: Path):
    """(n, D) float32 vectors of an SD file's one embedding, and the token its layout names (or None)."""
    import torch

    if "string_to_param" in state:
        found, token = state["string_to_param"].get("*"), None
    elif set(state) == {"emb_params"}:
        found, token = state["emb_params"], None
    elif len(state) == 1:
        token, found = next(iter(state.items()))
    else:
        raise ModelSourceError(
            f"--embedding {path} is not a textual inversion embedding: it holds {len(state)} tensors "
            f"({', '.join(list(state)[:3])}, ...); expected AUTOMATIC1111's string_to_param / emb_params or "
            "diffusers' one {token: vectors}")
    if not isinstance(found, torch.Tensor) or found.ndim not in (1, 2) or found.numel() == 0:
        raise ModelSourceError(f"--embedding {path}: its vectors are not a (vectors, width) tensor")
    return found.reshape(-1, found.shape[-1]).float(), token


def add(src, embeddings, allow_pickle: bool) -> None:
    """Add each (file, word or None) embedding to `src`'s tokenizer and text encoder(s) in place,
    record it in src.embeddings and fold it into the weight hash. SDXL: the two text encoders
    take the same new tokens (both tokenizers hold the same vocabulary), clip_l's vectors the
    first, clip_g's the second, as diffusers loads them into each."""
    import hashlib

    import torch

    from ldm_deploy.export.source import fast_tokenizer

    tokenizer = src.tokenizer = fast_tokenizer(src)
    text = src.text_encoder
    width = text.get_input_embeddings().weight.shape[1]
    digest = hashlib.sha256()
    for spec, word in embeddings:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelSourceError(f"--embedding {spec}: no such file")
        vecs, token, vecs_2 = vectors(single_file.read(path, allow_pickle), path)
        if (vecs_2 is None) != (src.text_encoder_2 is None):
            raise ModelSourceError(
                f"--embedding {path} is an SDXL embedding (clip_l / clip_g); this model is SD 1.x / 2.x"
                if vecs_2 is not None else
                f"--embedding {path} was made for SD 1.x / 2.x (one set of vectors); SDXL embeddings hold clip_l "
                "and clip_g")
        word = word or token or path.stem
        if any(c.isspace() for c in word) or not word:
            raise ModelSourceError(f"--embedding {spec}: its trigger word {word!r} has spaces; name one with "
                                   f"--embedding {spec}:WORD")
        if vecs.shape[1] != width:
            kind = {768: "SD 1.x", 1024: "SD 2.x"}.get(vecs.shape[1], f"{vecs.shape[1]}-wide")
            raise ModelSourceError(f"--embedding {path} was made for {kind} text encoders; this model's is "
                                   f"{width}-wide")
        if vecs_2 is not None and vecs_2.shape[1] != src.text_encoder_2.get_input_embeddings().weight.shape[1]:
            raise ModelSourceError(f"--embedding {path}: its clip_g vectors are {vecs_2.shape[1]} wide, this model's "
                                   f"second text encoder {src.text_encoder_2.get_input_embeddings().weight.shape[1]}")
        tokens = [word] + [f"{word}_{i}" for i in range(1, len(vecs))]
        # The tokenizer lowercases the text and finds added tokens inside words, so a word of the
        # vocabulary, or of another embedding, in any case, would take over the words that hold it.
        vocab = {t.lower() for t in tokenizer.get_vocab()}
        taken = [t for t in tokens if t.lower() in vocab or f"{t.lower()}</w>" in vocab]
        if taken:
            raise ModelSourceError(f"--embedding {spec}: {taken[0]!r} is already a token of this model (a word "
                                   f"of its vocabulary or another embedding); name it with --embedding {spec}:WORD")
        # As load_textual_inversion: grow the table(s), then one new token (and row) per vector.
        tables = []
        for encoder in (text, src.text_encoder_2) if vecs_2 is not None else (text,):
            encoder.resize_token_embeddings(len(tokenizer) + len(tokens))
            tables.append(encoder.get_input_embeddings().weight)
        with torch.no_grad():
            for i, t in enumerate(tokens):
                tokenizer.add_tokens(t)
                for table, v in zip(tables, (vecs, vecs_2)):
                    table[tokenizer.convert_tokens_to_ids(t)] = v[i]
        sha = hash_files([path])
        digest.update(f"{sha}:{word}\n".encode())
        src.embeddings.append({"name": path.stem, "word": word, "vectors": len(vecs), "sha256": sha})
        log.info("added the embedding %s as %r (%d vectors)", path.name, word, len(vecs))
    src.weights_sha256 = hashlib.sha256(f"{src.weights_sha256}\nti\n{digest.hexdigest()}".encode()).hexdigest()
