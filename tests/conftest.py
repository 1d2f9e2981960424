"""Session fixtures: tiny random-weight models (SD 1.x-like and SD 2.x-like), their engines,
and the diffusers pipelines that serve as the oracle."""

from __future__ import annotations

import contextlib
import logging
import os
from unittest import mock

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. triton.jit reads this when a
# kernel is decorated, so it must be set before anything imports ldm_deploy.kernels: here, in the
# first conftest pytest loads. With a GPU the kernel tests run on it instead.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import atexit
import shutil
import tempfile

# Tests never write to the user's cache (exported engines, ONNX Runtime's optimised graphs): one
# fresh cache folder per test session, removed when the session's process exits (a few hundred
# MB of engines otherwise left in /tmp by every run); tests about the cache point it elsewhere.
_TEST_CACHE = tempfile.mkdtemp(prefix="ldm-deploy-test-cache-")
os.environ["LDM_DEPLOY_CACHE"] = _TEST_CACHE


def _remove_test_cache(owner=os.getpid()):
    if os.getpid() == owner:  # not in a forked worker that happens to run exit handlers
        shutil.rmtree(_TEST_CACHE, ignore_errors=True)


atexit.register(_remove_test_cache)

import numpy as np
import pytest

from ldm_deploy.export.build import export_engine
from ldm_deploy.export.config import ExportConfig
from ldm_deploy.export.random_model import make_random_model

PRESETS = ("tiny-sd1", "tiny-sd2")


def diffusers_schedulers() -> dict:
    """Our sampler name -> the diffusers scheduler class (and from_config options) it must equal."""
    import diffusers

    from benchmarks.peers import SCHEDULERS, STEP_OPTIONS, stepped

    return {name: (stepped(getattr(diffusers, cls), STEP_OPTIONS[name]) if name in STEP_OPTIONS
                   else getattr(diffusers, cls), options) for name, (cls, options) in SCHEDULERS.items()}


def k_diffusion_sampling():
    """k-diffusion's sampling module: the samplers AUTOMATIC1111 and ComfyUI run, the oracle of ours
    that diffusers lacks (DPM++ 2S a). Its package's __init__ and utils.py import torchvision,
    whose PyPI builds pin a CUDA torch, so scripts/setup.sh installs k-diffusion without its
    dependencies and this loads sampling.py alone, as a module of a package of its own, beside the
    one function of utils.py that it calls (append_dims), taken from utils.py's own source."""
    import ast
    import importlib.util
    import sys
    import types
    from pathlib import Path

    if "_k_diffusion.sampling" in sys.modules:
        return sys.modules["_k_diffusion.sampling"]
    found = importlib.util.find_spec("k_diffusion")  # (finds the folder; runs no __init__)
    if found is None:
        pytest.fail("k-diffusion is not installed: run scripts/setup.sh (it installs it without its dependencies)")
    folder = Path(found.submodule_search_locations[0])
    package = types.ModuleType("_k_diffusion")
    package.__path__ = [str(folder)]
    utils = types.ModuleType("_k_diffusion.utils")
    tree = ast.parse((folder / "utils.py").read_text())
    kept = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "append_dims"]
    exec(compile(ast.Module(body=kept, type_ignores=[]), str(folder / "utils.py"), "exec"), utils.__dict__)
    package.utils = utils
    sys.modules.update({"_k_diffusion": package, "_k_diffusion.utils": utils})
    spec = importlib.util.spec_from_file_location("_k_diffusion.sampling", folder / "sampling.py")
    sampling = importlib.util.module_from_spec(spec)
    sys.modules["_k_diffusion.sampling"] = sampling
    spec.loader.exec_module(sampling)
    return sampling


# Test engines accept 64..512 px so parity runs can use small images.
TEST_CONFIG = ExportConfig(min_size=64, max_size=512, opt_size=128, max_batch=2)

logging.getLogger("diffusers").setLevel(logging.ERROR)
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {p: make_random_model(root / p, p, seed=1) for p in PRESETS}


@pytest.fixture(scope="session")
def engine_dirs(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    return {p: export_engine(str(model_dirs[p]), root / p, TEST_CONFIG) for p in PRESETS}


@pytest.fixture(scope="session")
def pipelines(engine_dirs):
    from ldm_deploy import Pipeline

    return {p: Pipeline.load(engine_dirs[p]) for p in PRESETS}


class TorchNoise:
    """Draws exactly what diffusers draws from a seeded torch.Generator, in the same order,
    so our pipeline and diffusers' see the same noise (our `generator` protocol)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def standard_normal(self, shape):
        return torch.randn(tuple(shape), generator=self.g, dtype=torch.float32).numpy()


@pytest.fixture(scope="session")
def torch_noise():
    return TorchNoise


def generator_samplers() -> list:
    """Our samplers whose noise the generator draws: all but DPM++ SDE's, whose Brownian tree is
    seeded by the image's seed (each file's sweep leaves them to test_dpmpp_sde_matches_diffusers);
    the `_sgm_uniform`, `_beta` and `_ays` ones apart too: each is another's walk on trailing spacing, at
    Beta's sigmas or at Align Your Steps' timesteps, which test_samplers.py checks step by step
    (test_parity.py's test_other_sigmas_match_diffusers runs a few whole)."""
    return [s for s in diffusers_schedulers()
            if not s.startswith("dpmpp_sde") and not s.endswith(("_sgm_uniform", "_beta", "_ays"))]


@contextlib.contextmanager
def torchs_float32_rounding():
    """Our float32 sqrt, exp and log (samplers/schedule.py's hook) rounded as this machine's torch
    rounds them, where a last bit is amplified: DPM++ SDE's Brownian noise is queried at noise levels rounded to 1e-6, and a
    level an ulp off can move a query point (test_samplers.py's test_dpmpp_sde_with_our_rounding
    bounds what that changes); DPM2 a's s_down cancels all but a few bits of s'^2. torch's are
    SLEEF's or its own, not always correctly rounded, and their last bit depends on the CPU (on an
    AMD EPYC seen here its float32 sqrt is off the correctly rounded one on 14% of values, and 59
    parity tests failed without this; they had passed on other machines). diffusers' side runs
    with torch's own; this puts the same under ours."""
    from ldm_deploy.engine.samplers import schedule

    with mock.patch.object(schedule, "sqrt", lambda x: torch.from_numpy(np.asarray(x, np.float32)).sqrt().numpy()), \
            mock.patch.object(schedule, "log", lambda x: torch.from_numpy(np.asarray(x, np.float32)).log().numpy()), \
            mock.patch.object(schedule, "exp", lambda x: torch.from_numpy(np.asarray(x, np.float32)).exp().numpy()):
        yield


def assert_not_saturated(images: np.ndarray) -> None:
    """A parity check means little if the reference image is flat or clipped to 0 / 1."""
    inside = np.mean((images > 0.01) & (images < 0.99))
    assert inside > 0.5 and images.std() > 0.01, (inside, images.std())


@pytest.fixture(autouse=True)
def own_logging():
    """A command's main() points logging at the test's captured stderr, which closes with the
    test; later tests (and servers' threads) must not log into it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level
