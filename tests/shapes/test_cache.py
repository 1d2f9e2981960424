"""The engine cache behind `ldm-run --model` and the bundled model: keys, location, repairs."""

from __future__ import annotations

import os
import shutil

import pytest

from ldm_deploy import cache
from ldm_deploy.cli import run
from ldm_deploy.errors import UserError


def test_cache_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LDM_DEPLOY_CACHE", str(tmp_path / "a"))
    assert cache.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("LDM_DEPLOY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "ldm-deploy"


def test_key_changes_with_the_model_and_the_settings(tmp_path):
    m = tmp_path / "model"
    (m / "unet").mkdir(parents=True)
    (m / "unet" / "w.safetensors").write_bytes(b"1234")
    key = cache.model_key(m, {"max_batch": 4})
    assert cache.model_key(m, {"max_batch": 4}) == key
    assert cache.model_key(m, {"max_batch": 2}) != key
    (m / "unet" / "w.safetensors").write_bytes(b"12345")
    assert cache.model_key(m, {"max_batch": 4}) != key


def test_key_of_a_diffusers_folder_is_its_components_files(tmp_path):
    """Its model_index.json and the folders it names: an engine exported into the folder, or notes
    beside the model, change nothing; a component's file does."""
    m = tmp_path / "model"
    (m / "unet").mkdir(parents=True)
    (m / "unet" / "w.safetensors").write_bytes(b"1234")
    (m / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "U"], '
                                        '"safety_checker": [null, null]}')
    key = cache.model_key(m, {})
    (m / "engine").mkdir()
    (m / "engine" / "manifest.json").write_text("{}")
    (m / "notes.txt").write_text("my model")
    assert cache.model_key(m, {}) == key
    (m / "unet" / "config.json").write_text("{}")
    assert cache.model_key(m, {}) != key
    key = cache.model_key(m, {})
    (m / "model_index.json").write_text('{"unet": ["diffusers", "U"]}')
    assert cache.model_key(m, {}) != key
    key = cache.model_key(m, {})
    (m / "scheduler").mkdir()  # (read by the export whatever the index names)
    (m / "scheduler" / "scheduler_config.json").write_text("{}")
    assert cache.model_key(m, {}) != key


def test_key_follows_the_vae_lora_and_upscaler_files(tmp_path, monkeypatch):
    m = tmp_path / "model"
    m.mkdir()
    (m / "model_index.json").write_text("{}")
    (tmp_path / "style.safetensors").write_bytes(b"1234")
    monkeypatch.chdir(tmp_path)

    def key(settings):
        return cache.model_key(m, *cache.settle_paths(settings))

    lora = {"loras": (("style.safetensors", 0.8),)}
    first = key(lora)
    assert key({"loras": ((str(tmp_path / "style.safetensors"), 0.8),)}) == first  # any spelling of the path
    assert key({"loras": (("style.safetensors", 0.5),)}) != first
    ti = key({"embeddings": (("style.safetensors", None),)})
    assert ti == key({"embeddings": ((str(tmp_path / "style.safetensors"), None),)}) != first
    assert key({}) == cache.model_key(m, {}) != first
    up = key({"upscalers": (("style.safetensors", None),)})
    assert up == key({"upscalers": ((str(tmp_path / "style.safetensors"), None),)}) not in (first, ti)
    (tmp_path / "style.safetensors").write_bytes(b"12345")  # retrained: same name, new contents
    assert key(lora) != first and key({"upscalers": (("style.safetensors", None),)}) != up


def test_paths_keep_their_symlinks_and_pickles_need_consent(tmp_path, monkeypatch):
    # A hub cache: snapshots/<rev>/x.safetensors -> blobs/<sha256>, a name without suffix.
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "0123abcd").write_bytes(b"1234")
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "EasyNegative.safetensors").symlink_to(tmp_path / "blobs" / "0123abcd")
    monkeypatch.chdir(tmp_path / "snap")
    settings, extra = cache.settle_paths({"embeddings": (("../snap/EasyNegative.safetensors", None),)})
    assert settings["embeddings"] == ((str(tmp_path / "snap" / "EasyNegative.safetensors"), None),)
    assert extra == (tmp_path / "snap" / "EasyNegative.safetensors",)
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04not read")  # a pickle's protocol byte
    with pytest.raises(UserError, match="pass --allow-pickle if you trust its source"):
        cache.engine_for(tmp_path / "model.ckpt")


def test_not_a_diffusers_folder(tmp_path, capsys):
    assert run.main(["x", "--model", str(tmp_path)]) == 2
    assert "not a diffusers folder" in capsys.readouterr().err
    with pytest.raises(UserError, match="does not exist"):
        cache.engine_for(tmp_path / "missing")


@pytest.mark.slow
def test_model_flag_exports_once_and_repairs_a_damaged_engine(model_dirs, monkeypatch, tmp_path):
    monkeypatch.setenv("LDM_DEPLOY_CACHE", str(tmp_path / "cache"))
    settings = dict(min_size=64, max_size=128, img2img=False)
    engine = cache.engine_for(model_dirs["tiny-sd1"], settings)
    assert engine.parent == tmp_path / "cache" / "engines" and engine.name.startswith("tiny-sd1-")
    stamp = os.stat(engine / "manifest.json").st_mtime_ns
    assert cache.engine_for(model_dirs["tiny-sd1"], settings) == engine
    assert os.stat(engine / "manifest.json").st_mtime_ns == stamp
    (engine / "manifest.json").write_text("{not json")
    assert cache.engine_for(model_dirs["tiny-sd1"], settings) == engine
    assert os.stat(engine / "manifest.json").st_mtime_ns != stamp
    assert [p.name for p in engine.parent.iterdir()] == [engine.name]  # no staging left behind
    # A truncated component file (the manifest intact) is found by its size and exported again.
    unet = engine / "unet_step.onnx"
    size = unet.stat().st_size
    os.truncate(unet, 100)
    assert cache.engine_for(model_dirs["tiny-sd1"], settings) == engine
    assert unet.stat().st_size == size
    # So is one whose manifest is gone (no longer an engine directory: replaced, not refused).
    (engine / "manifest.json").unlink()
    assert cache.engine_for(model_dirs["tiny-sd1"], settings) == engine
    assert (engine / "manifest.json").is_file()
    shutil.rmtree(engine)
    out = tmp_path / "x.png"
    # through the CLI: --model exports with the cache's default settings (sizes 256..1024)
    assert run.main(["a cat", "--model", str(model_dirs["tiny-sd1"]), "--steps", "2", "--width", "256",
                     "--height", "256", "-q", "--out", str(out)]) == 0
    assert out.is_file()


@pytest.mark.skipif(os.name != "posix", reason="the cache's lock is POSIX's flock")
def test_a_second_process_waits_for_the_first_export_and_takes_its_engine(model_dirs, monkeypatch, tmp_path, caplog):
    """Two ldm-run --model started at once: the second waits while the first holds the engine's
    lock (here this test, which then puts the first's engine in place), and takes that engine
    instead of exporting it again."""
    import fcntl
    import logging
    import threading

    monkeypatch.setenv("LDM_DEPLOY_CACHE", str(tmp_path / "cache"))
    settings = dict(min_size=64, max_size=128, img2img=False)
    engine = cache.engine_for(model_dirs["tiny-sd1"], settings)
    shutil.copytree(engine, tmp_path / "first")  # (copy2: the files keep their times)
    shutil.rmtree(engine)
    found = []
    with open(tmp_path / "cache" / "locks" / f"{engine.name}.lock", "a") as held, caplog.at_level(logging.INFO):
        fcntl.flock(held, fcntl.LOCK_EX)  # the first process, exporting
        second = threading.Thread(target=lambda: found.append(cache.engine_for(model_dirs["tiny-sd1"], settings)))
        second.start()
        second.join(2)
        assert second.is_alive() and not engine.exists()  # waiting
        assert "waiting for another process that is exporting" in caplog.text
        shutil.copytree(tmp_path / "first", engine)  # the first's export lands
    second.join(120)
    assert found == [engine]
    stamp = os.stat(tmp_path / "first" / "manifest.json").st_mtime_ns
    assert os.stat(engine / "manifest.json").st_mtime_ns == stamp  # taken, not exported again
    # a cache whose locks cannot be made (read-only, say) still gives the engines it holds
    shutil.rmtree(tmp_path / "cache" / "locks")
    (tmp_path / "cache" / "locks").write_text("not a folder")
    assert cache.engine_for(model_dirs["tiny-sd1"], settings) == engine
    assert os.stat(engine / "manifest.json").st_mtime_ns == stamp


def test_a_model_keeps_one_engine_per_release_and_settings(model_dirs, monkeypatch, tmp_path, caplog):
    """Changed model files export the engine again in its folder; another release exports its own
    (two installed releases never replace each other's), and a newer one removes the older's of
    the same model and settings, and the key-named folders of releases before the record, but
    nothing else: other models' engines, other settings', newer releases', ldm-export's."""
    import json
    import logging

    from ldm_deploy.export.build import export_engine
    from ldm_deploy.export.config import ExportConfig

    monkeypatch.setenv("LDM_DEPLOY_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.WARNING)
    model = shutil.copytree(model_dirs["tiny-sd1"], tmp_path / "tiny-sd1")
    settings = dict(min_size=64, max_size=128, img2img=False)
    engine = cache.engine_for(model, settings)
    engines = engine.parent
    assert json.loads((engine / cache.RECORD).read_text())["model"] == str(model)
    # Changed model files: exported again, in place.
    stamp = os.stat(engine / "manifest.json").st_mtime_ns
    os.utime(model / "model_index.json", ns=(1, 1))
    assert cache.engine_for(model, settings) == engine
    assert os.stat(engine / "manifest.json").st_mtime_ns != stamp and "have changed since" in caplog.text
    # What the next release must leave: a key-named folder of an earlier release of another model,
    # an engine ldm-export wrote there, another settings' engine; and one it must remove.
    other = shutil.copytree(cache.engine_for(model_dirs["tiny-sd2"], settings), engines / "tiny-sd2-0123456789abcdef")
    (other / cache.RECORD).unlink()
    mine = export_engine(str(model), engines / "mine", ExportConfig(min_size=64, max_size=128, img2img=False))
    wider = cache.engine_for(model, settings | {"max_size": 192})
    legacy = shutil.copytree(engine, engines / "tiny-sd1-0123456789abcdef")
    (legacy / cache.RECORD).unlink()
    monkeypatch.setattr(cache, "REVISION", cache.REVISION + 1)  # the next release
    newer = cache.engine_for(model, settings)
    assert newer != engine and not engine.exists() and not legacy.exists()
    assert f"removed {engine}, the cached engine of {model} that an earlier ldm-deploy exported" in caplog.text
    assert other.is_dir() and mine.is_dir() and wider.is_dir()
    # The older release, run again, exports its own once and leaves the newer's alone.
    monkeypatch.setattr(cache, "REVISION", cache.REVISION - 1)
    assert cache.engine_for(model, settings) == engine and newer.is_dir()
    stamp = os.stat(engine / "manifest.json").st_mtime_ns
    assert cache.engine_for(model, settings) == engine and os.stat(engine / "manifest.json").st_mtime_ns == stamp
