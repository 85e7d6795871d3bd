"""Shared fixtures: small deterministic caches made by the real generator and writer."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def small_av(tmp_path_factory) -> Path:
    """The `av` preset at 15% size (about 1000 train+val, 110 test samples)."""
    from cache.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("caches") / "av-small", "av", seed=0, scale=0.15)


@pytest.fixture(scope="session")
def small_avt(tmp_path_factory) -> Path:
    from cache.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("caches") / "avt-small", "avt", seed=0, scale=0.2)
