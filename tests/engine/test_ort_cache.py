"""ONNX Runtime's optimised graphs kept in the cache: saved on the first load, reused (same
images) on later ones, replaced when damaged, never kept when turned off, pruned by age."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest

from ldm_deploy import Pipeline
from ldm_deploy.engine.backends import ort_cache
from ldm_deploy.engine.backends.onnxruntime import OnnxRuntimeBackend

KW = dict(seed=5, steps=3, width=64, height=64, sampler="euler", output_type="np", progress=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_DEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(ort_cache.ENV, raising=False)
    return tmp_path / "cache" / "onnxruntime"


@pytest.fixture
def opened(monkeypatch):
    """The graph file of every session the ONNX Runtime backend creates, in order."""
    paths = []
    real = OnnxRuntimeBackend.session

    def session(self, path, opts):
        paths.append(os.fspath(path))
        return real(self, path, opts)

    monkeypatch.setattr(OnnxRuntimeBackend, "session", session)
    return paths


def test_first_load_saves_later_loads_reuse(engine_dirs, cache, opened, caplog):
    caplog.set_level(logging.INFO, logger=ort_cache.__name__.rsplit(".", 1)[0])
    engine = engine_dirs["tiny-sd1"]
    first = Pipeline.load(engine)("a lighthouse", **KW)
    assert all(p.startswith(str(engine)) for p in opened)  # optimised from the engine's graphs...
    saved = sorted(p.name.rsplit("-", 1)[0] for p in cache.iterdir())
    assert saved == ["text_encoder", "unet_step", "vae_decoder"]  # ...and saved (vae_encoder: on use)
    assert "saved ONNX Runtime's optimised graph" in caplog.text

    opened.clear()
    again = Pipeline.load(engine)("a lighthouse", **KW)
    assert opened and all(p.startswith(str(cache)) for p in opened)
    np.testing.assert_array_equal(again, first)


def test_damaged_saved_graph_is_replaced(engine_dirs, cache, caplog):
    engine = engine_dirs["tiny-sd1"]
    first = Pipeline.load(engine)("a lighthouse", **KW)
    unet = next(cache.glob("unet_step-*"))
    (unet / ort_cache.MODEL).write_bytes(b"not a graph")
    again = Pipeline.load(engine)("a lighthouse", **KW)
    assert "could not be loaded" in caplog.text and "optimising again" in caplog.text
    assert (unet / ort_cache.MODEL).stat().st_size > 1000  # saved afresh
    np.testing.assert_array_equal(again, first)


def test_turned_off_keeps_nothing(engine_dirs, cache, monkeypatch):
    monkeypatch.setenv(ort_cache.ENV, "0")
    Pipeline.load(engine_dirs["tiny-sd1"])("a lighthouse", **KW)
    assert not cache.exists()


def test_key_follows_files_version_cpu_and_level():
    files = {"unet_step.onnx": {"sha256": "a" * 64}, "unet_step.onnx.data": {"sha256": "b" * 64}}
    key = ort_cache.graph_key(files, "1.32.0", "ORT_ENABLE_ALL", "cpu A")
    assert key == ort_cache.graph_key(dict(reversed(files.items())), "1.32.0", "ORT_ENABLE_ALL", "cpu A")
    changed = [
        ort_cache.graph_key(files | {"unet_step.onnx": {"sha256": "c" * 64}}, "1.32.0", "ORT_ENABLE_ALL", "cpu A"),
        ort_cache.graph_key(files, "1.33.0", "ORT_ENABLE_ALL", "cpu A"),
        ort_cache.graph_key(files, "1.32.0", "ORT_ENABLE_EXTENDED", "cpu A"),
        ort_cache.graph_key(files, "1.32.0", "ORT_ENABLE_ALL", "cpu B"),
    ]
    assert len({key, *changed}) == 5
    assert "flags" in ort_cache.cpu_identity() or not os.path.exists("/proc/cpuinfo")


def test_prune_removes_least_recently_used(cache):
    now = time.time()
    for age, name in enumerate(("newest", "middle", "oldest", "kept-old")):
        folder = cache / name
        folder.mkdir(parents=True)
        (folder / ort_cache.MODEL).write_bytes(b"x" * 1000)
        os.utime(folder, (now - 100 * age, now - 100 * age))
    (cache / ".staging-other-123").mkdir()  # another process at work: not ours to remove
    removed = ort_cache.prune(max_bytes=2500, keep=cache / "kept-old")
    assert [p.name for p in removed] == ["oldest", "middle"]
    assert sorted(p.name for p in cache.iterdir()) == [".staging-other-123", "kept-old", "newest"]


def test_unwritable_cache_still_loads(engine_dirs, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")  # the cache path runs through a file: no folder can be made there
    monkeypatch.setenv("LDM_DEPLOY_CACHE", str(blocker / "cache"))
    monkeypatch.delenv(ort_cache.ENV, raising=False)
    got = Pipeline.load(engine_dirs["tiny-sd1"])("a lighthouse", **KW)
    assert "cannot save ONNX Runtime's optimised graph" in caplog.text
    assert got.shape == (1, 64, 64, 3)
