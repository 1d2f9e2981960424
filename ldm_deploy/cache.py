"""Engines exported on first use and kept in the user's cache directory.

`ldm-run --model FOLDER` or `--model FILE.safetensors` (and `ldm-run` with nothing named: the
bundled shapes model) exports the model's ONNX Runtime engine once, into

    $LDM_DEPLOY_CACHE, else $XDG_CACHE_HOME/ldm-deploy, else ~/.cache/ldm-deploy
        engines/<model folder or file name, or "shapes">-<identity>/

and later runs load it. One folder per release, model and export settings (identity: the package
version and REVISION, the model's absolute path and the settings, a replacement VAE and LoRAs
among them by absolute path and weight), so that two installed releases never replace each
other's engines. Its RECORD file says what the engine was exported from, with the files of the
model folder (or the checkpoint file), the VAE and the LoRAs by (path, size, modification time):
when they change, the engine is exported again in its place. Once a release has exported a
model's engine, the engines that older releases made of the same model and settings are removed
(an SD 1.5 engine is about 4 GB), as are the folders of releases before RECORD existed (named by
their key). Nothing is ever half-written: the export stages and renames (see engine_dir), the
record inside.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from ldm_deploy import __version__
from ldm_deploy.errors import EngineError, UserError

log = logging.getLogger(__name__)

# The export settings of cached engines: ONNX Runtime on the CPU, the model's native size and
# around it, up to 4 images a call.
CACHE_EXPORT = dict(backend="onnxruntime", max_batch=4)
# Raised when engines of the same package version must be exported again to have a new input
# (3: the text encoder's clip_skip and token_weights; 4: prompts of several chunks; 5: the U-Net
# step's inpainting mask; 6: its state2, for UniPC).
REVISION = 6


def cache_dir() -> Path:
    if os.environ.get("LDM_DEPLOY_CACHE"):
        return Path(os.environ["LDM_DEPLOY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ldm-deploy"


RECORD = "ldm-deploy-cache.json"


def identity(model: Path, settings: dict) -> str:
    """16 hex digits over the release, the model's path and the settings: the engine's folder."""
    text = f"{__version__}.{REVISION}\n{model}\n{sorted(settings.items())}\n"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_key(model: Path, settings: dict, extra: tuple[Path, ...] = ()) -> str:
    """16 hex digits over the package version (and REVISION), the settings and the files of the
    model and of `extra` (what the export merges into it: a VAE file or folder, LoRA files)."""
    h = hashlib.sha256(f"{__version__}.{REVISION}\n{sorted(settings.items())}\n".encode())
    for i, source in enumerate((model, *extra)):
        tag = f"{i}:" if i else ""
        root, files = (source.parent, [source]) if source.is_file() else (source, model_files(source))
        for f in (f for f in files if f.is_file()):
            st = f.stat()
            h.update(f"{tag}{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def model_files(folder: Path) -> list[Path]:
    """The files of a folder that make the model: of a diffusers folder, model_index.json and its
    components' folders (those it names, and those the export reads whatever it says: unet/,
    vae/, ...), so that other files there (an engine exported into it, notes, images) do not
    count; of another folder, all."""
    from ldm_deploy.export.source import SUBFOLDERS, XL_SUBFOLDERS

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return sorted(folder.rglob("*"))
    named = [k for k, v in index.items() if isinstance(v, list)] if isinstance(index, dict) else []
    parts = sorted({folder / k for k in (*named, *SUBFOLDERS, *XL_SUBFOLDERS) if (folder / k).is_dir()})
    return [folder / "model_index.json", *sorted(f for part in parts for f in part.rglob("*"))]


def absolute_path(p: Path) -> Path:
    """Absolute, with ".." resolved as written but symlinks kept (unlike Path.resolve)."""
    return Path(os.path.abspath(p))


def settle_paths(settings: dict) -> tuple[dict, tuple[Path, ...]]:
    """Settings with the VAE, LoRA, embedding, ControlNet, upscaler and config paths made absolute (the key must not
    hang on the working directory), and those that exist, for model_key. Missing ones stay as
    given: the export names them. Symlinks stay links (a hub cache's point to blobs named by
    hash, without the suffix that says what a file is); the key's stat follows them."""
    settings, extra = dict(settings), []

    def absolute(path: str) -> str:
        p = Path(path).expanduser()
        if not p.exists():
            return path
        extra.append(absolute_path(p))
        return str(absolute_path(p))

    for key in ("vae", "model_config"):
        if settings.get(key):
            settings[key] = absolute(settings[key])
    for key in ("loras", "embeddings", "upscalers"):  # (path, weight, trigger word or name) pairs
        if settings.get(key):
            settings[key] = tuple((absolute(path), tail) for path, tail in settings[key])
    if settings.get("controlnets"):
        settings["controlnets"] = tuple(absolute(path) for path in settings["controlnets"])
    return settings, tuple(extra)


def engine_for(model: str | Path, export_settings: dict | None = None, name: str | None = None) -> Path:
    """The cached engine of a diffusers folder or single-file checkpoint, exported now if there
    is none (or a damaged one). `name` (default: the folder's or file's name) starts the engine
    directory's name."""
    model = absolute_path(Path(model).expanduser())
    if not model.exists():
        raise UserError(f"--model {model} does not exist; pass a diffusers folder (with model_index.json) "
                        "or a .safetensors checkpoint, or --engine DIR for an engine made by ldm-export")
    settings, extra = settle_paths({**CACHE_EXPORT, **(export_settings or {})})
    if model.is_file():
        from ldm_deploy.export.single_file import check_pickle

        check_pickle(model, bool(settings.get("allow_pickle")), "--model")
    elif not (model / "model_index.json").is_file():
        raise UserError(f"--model {model}: not a diffusers folder (it has no model_index.json)")
    stem = model.stem if model.is_file() else model.name
    keyed = {k: v for k, v in settings.items() if k != "allow_pickle"}  # consent, not a setting of the engine
    out = cache_dir() / "engines" / f"{name or stem}-{identity(model, keyed)}"
    record = {"version": __version__, "revision": REVISION, "model": str(model),
              "settings": repr(sorted(keyed.items())), "files": model_key(model, keyed, extra)}
    with exporting(out):
        return cached_or_exported(model, out, settings, record, name or stem)


def cached_or_exported(model: Path, out: Path, settings: dict, record: dict, stem: str) -> Path:
    if out.is_dir():
        try:
            from ldm_deploy.engine.manifest import read_manifest, verify_files

            # Sizes only: the pipeline checks every file's SHA-256 when it loads the engine.
            verify_files(out, read_manifest(out), hashes=False)
        except EngineError as e:
            log.warning("the cached engine %s is damaged (%s); exporting it again", out, e)
            remove(out, "damaged")
        else:
            if read_record(out).get("files") == record["files"]:
                return out
            log.warning("the model files of the cached engine %s have changed since it was exported; "
                        "exporting it again in its place", out)
    export(model, out, settings, record)
    prune(out.parent, record, stem, keep=out)
    return out


@contextlib.contextmanager
def exporting(out: Path):
    """Held while one process finds or exports the cached engine `out`: another (a second ldm-run
    started at once, a server's workers) waits for it, then finds the engine there, rather than
    exporting it again beside it (minutes, and gigabytes of disk, each). A lock file in the cache's
    locks/ (kept: removing a lock file races), flock'ed; none where that cannot be (no flock, a
    read-only cache whose engines are there already, a disk that locks nothing)."""
    try:
        import fcntl

        locks = out.parent.parent / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        f = open(locks / f"{out.name}.lock", "a")
    except (ImportError, OSError) as e:
        log.debug("exporting %s without a lock (%s)", out, e)
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is exporting %s", out)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # (ENOLCK, EOPNOTSUPP: some network and FUSE disks)
            log.debug("exporting %s without a lock (%s)", out, e)
        yield  # (closing the file releases the lock)


def read_record(folder: Path) -> dict:
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def remove(folder: Path, what: str) -> None:
    """Remove a cached engine of ours, or say how to."""
    try:
        shutil.rmtree(folder)
    except OSError as err:
        raise UserError(f"cannot remove the {what} cached engine {folder} ({err.strerror}); "
                        "delete it by hand, or point LDM_DEPLOY_CACHE elsewhere") from None


def release(record: dict) -> tuple:
    """(version numbers, revision) of a record, for ordering releases."""
    revision = record.get("revision", 0)
    return (tuple(int(n) for n in re.findall(r"[0-9]+", str(record.get("version", "")))),
            revision if isinstance(revision, int) else 0)


def prune(engines: Path, record: dict, stem: str, keep: Path) -> None:
    """Remove the cached engines `keep` supersedes: those older releases exported of the same
    model and settings (newer releases' stay theirs), and those of releases before RECORD
    (folders named <stem>-<16 hex digits>, ONNX Runtime engines of the same model). Anything
    else, an engine someone exported there with ldm-export among it, stays."""
    from ldm_deploy.engine.manifest import read_manifest

    legacy = re.compile(re.escape(stem) + r"-[0-9a-f]{16}")
    model = Path(record["model"])
    for folder in sorted(engines.iterdir()):
        if folder == keep or folder.name.startswith(".") or not folder.is_dir():
            continue
        other = read_record(folder)
        if other:
            same = (other.get("model"), other.get("settings")) == (record["model"], record["settings"])
            if not same or release(other) >= release(record):
                continue
        else:
            try:
                manifest = read_manifest(folder)
            except EngineError:
                continue
            source = Path(manifest.model.source)
            if not (legacy.fullmatch(folder.name) and manifest.backend == "onnxruntime" and source.is_absolute()
                    and source.resolve() == model.resolve()):
                continue
        freed = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            log.warning("removed %s, the cached engine of %s that an earlier ldm-deploy exported (%.1f GB freed)",
                        folder, model, freed / 1e9)


def export(model: Path, out: Path, settings: dict, record: dict) -> None:
    import importlib.util

    missing = [m for m in ("torch", "diffusers", "transformers", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(
            f"the first run of a model exports its engine, which needs {', '.join(missing)}: "
            "pip install 'ldm-deploy[export]' (CPU PyTorch first: pip install torch --index-url "
            "https://download.pytorch.org/whl/cpu), or pass --engine DIR"
        )
    from ldm_deploy.export.build import export_engine
    from ldm_deploy.export.config import ExportConfig

    log.info("first run of %s: exporting its engine to %s (once; later runs reuse it)", model, out)
    try:
        export_engine(str(model), out, ExportConfig(**settings, force=out.exists()),
                      extra_files={RECORD: json.dumps(record, indent=2)})
    except UserError:
        if not out.is_dir():  # another process may have finished the same export first
            raise
