"""The engines one server serves, by name: AUTOMATIC1111's checkpoints.

Each is loaded on its first request and at most `keep` are loaded at once (the one used longest
ago is let go first, as AUTOMATIC1111 keeps its checkpoints: one by default), so that a server
of several models needs the memory of `keep`. Requests name theirs as AUTOMATIC1111's do
(`override_settings.sd_model_checkpoint`: the title "name [hash]", the name or the hash) or
OpenAI's (`model`); the rest go to the default, which `POST /sdapi/v1/options` sets.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from ldm_deploy.engine.infotext import model_name
from ldm_deploy.engine.manifest import TOKENIZER, read_manifest
from ldm_deploy.errors import InvalidRequest

log = logging.getLogger("ldm-serve")


class EngineUnavailable(Exception):
    """An engine that cannot be loaded (damaged, or for another machine): the server's fault, not
    the request's (answered 503)."""


class Engines:
    def __init__(self, manifests: dict[str, object], dirs: dict[str, Path], load: Callable | None = None,
                 keep: int = 1, loaded: dict | None = None, backend: str = "auto"):
        self.manifests, self.dirs, self.load, self.keep, self.backend = manifests, dirs, load, keep, backend
        self.failed: dict[str, str] = {}  # engines that could not be loaded: why
        self.pipes: OrderedDict[str, object] = OrderedDict(loaded or {})  # the loaded, least recent first
        self.verified = set(self.pipes)  # engines whose files' SHA-256 were checked once
        self.default = next(iter(manifests))
        self.tokenizers: dict[str, object] = {}
        self.lock = threading.Lock()

    @classmethod
    def read(cls, dirs: list, load: Callable, keep: int = 1, backend: str = "auto") -> "Engines":
        """Engines from their directories (manifests read and backends checked now, so that a bad one
        is named at once); names are the models' (a second of the same name gets "-2", ...)."""
        from ldm_deploy.engine import backends

        manifests, paths = {}, {}
        for d in dirs:
            manifest = read_manifest(Path(d))
            backends.check_compatible(backends.auto(manifest) if backend == "auto" else backend, manifest)
            name = base = model_name(manifest.model.source)
            k = 1
            while name in manifests:
                k += 1
                name = f"{base}-{k}"
            manifests[name], paths[name] = manifest, Path(d)
        return cls(manifests, paths, load, keep, backend=backend)

    @classmethod
    def of(cls, pipe) -> "Engines":
        """One pipeline, loaded already."""
        name = model_name(pipe.manifest.model.source)
        return cls({name: pipe.manifest}, {name: Path(pipe.engine_dir)}, None, 1, {name: pipe})

    @property
    def names(self) -> list[str]:
        return list(self.manifests)

    def titles(self) -> list[str]:
        return [self.title(n) for n in self.names]

    def title(self, name: str) -> str:
        """AUTOMATIC1111's checkpoint title: "name [hash]"."""
        return f"{name} [{self.manifests[name].model.model_hash}]"

    def find(self, text) -> str:
        """The engine a request names: its title, name, hash (10 digits or the whole), or None: the
        default; as AUTOMATIC1111 writes titles too, the checkpoint's file name with "[hash]"."""
        if text in (None, ""):
            return self.default
        text = str(text)
        stem, _, bracket = text.partition(" [")
        given_hash = bracket[:-1] if bracket.endswith("]") else ""
        for name in self.manifests:  # a name, title or folder first: engines of one checkpoint share its hash
            if text in (name, self.title(name), str(self.dirs[name])):
                return name
        for name, manifest in self.manifests.items():  # (by its checkpoint's hash, or its weights' with merges)
            digests = {manifest.model.model_sha256, manifest.model.weights_sha256}
            source = Path(manifest.model.source).name
            if text in (name, self.title(name), str(self.dirs[name]), source, *digests, *(d[:10] for d in digests)) \
                    or (given_hash and any(d.startswith(given_hash.lower()) for d in digests)) or stem in (name, source):
                return name
        raise InvalidRequest(f"checkpoint {text[:200]!r} is not served here; this server serves "
                             f"{', '.join(self.title(n) for n in self.names)}")

    def default_size(self, name: str) -> tuple[int, int]:
        """(width, height) an engine draws when none is given: its size of best speed."""
        m = self.manifests[name]
        return m.dims["latent_width"].opt * m.model.vae_scale, m.dims["latent_height"].opt * m.model.vae_scale

    def pipeline(self, name: str, log_failure: bool = True):
        """The engine's pipeline, loaded (and the least recent let go) where it is not (worker thread).
        Its files are checked before another is let go of; an engine that fails is EngineUnavailable,
        now and for every later request (it is not checked again)."""
        with self.lock:
            if name in self.pipes:
                self.pipes.move_to_end(name)
                return self.pipes[name]
        if name in self.failed:
            raise EngineUnavailable(self.failed[name])
        start = time.perf_counter()
        try:
            self.check(name)
            with self.lock:
                while len(self.pipes) >= self.keep:
                    gone, _ = self.pipes.popitem(last=False)
                    log.info("let go of %s (ldm-serve --keep-loaded %d)", gone, self.keep)
            pipe = self.load(self.dirs[name], verify=False)  # checked above
        except Exception as e:
            self.failed[name] = f"the engine {name} cannot be loaded: {e}"
            if log_failure:  # (ldm-serve's start says it itself)
                log.error("%s", self.failed[name])
            raise EngineUnavailable(self.failed[name]) from None
        with self.lock:
            self.pipes[name] = pipe
        log.info("loaded %s in %.1f s", name, time.perf_counter() - start)
        return pipe

    def check(self, name: str) -> None:
        """The engine's files against its manifest (their SHA-256 the first time), on its backend."""
        from ldm_deploy.engine import backends
        from ldm_deploy.engine.manifest import verify_files

        manifest = self.manifests[name]
        backends.check_compatible(backends.auto(manifest) if self.backend == "auto" else self.backend, manifest)
        verify_files(self.dirs[name], manifest, hashes=name not in self.verified)
        self.verified.add(name)

    def tokenizer(self, name: str):
        """The engine's prompt tokenizer, for telling requests apart without loading it (any thread)."""
        with self.lock:
            if name not in self.tokenizers:
                loaded = self.pipes.get(name)
                if loaded is not None:
                    self.tokenizers[name] = loaded.tokenizer
                else:
                    from ldm_deploy.engine.tokenizer import PromptTokenizer

                    m = self.manifests[name].model
                    self.tokenizers[name] = PromptTokenizer(self.dirs[name] / TOKENIZER, m.text_length, m.embeddings)
            return self.tokenizers[name]
