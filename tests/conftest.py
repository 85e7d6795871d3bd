"""Shared fixtures: small deterministic caches made by the real generator and writer."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The fast head tests (`pytest -m heads_fast`, what `make test-fast` and mutation testing run): every
# test of these files except those that train on a synthetic cache (they take a cache fixture, or
# are marked `trains` when they load a built-in one).
HEADS_FAST_FILES = {"test_pins.py", "test_metrics.py", "test_edm.py", "test_mla.py", "test_ccat.py", "test_heads.py",
                    "test_numbers.py", "test_baselines_a.py", "test_baselines_b.py", "test_device.py",
                    "test_objective_methods.py", "test_modulation_methods.py",
                    "test_hooks.py", "test_epoch_methods.py",
                    "test_domains.py", "test_progress.py"}
CACHE_FIXTURES = {"small_av", "small_avt"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        slow = CACHE_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("trains")
        if item.path.name in HEADS_FAST_FILES and not slow:
            item.add_marker(pytest.mark.heads_fast)


@pytest.fixture(scope="module")
def one_thread():
    """Small models train much faster on one thread than with the CPU's threads contended."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_av(tmp_path_factory) -> Path:
    """The `av-saturated` preset (the `av` before issue 25) at 15% size (about 1000 train+val, 110 test samples)."""
    from cache.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("caches") / "av-small", "av-saturated", seed=0, scale=0.15)


@pytest.fixture(scope="session")
def small_avt(tmp_path_factory) -> Path:
    from cache.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("caches") / "avt-small", "avt-saturated", seed=0, scale=0.2)
