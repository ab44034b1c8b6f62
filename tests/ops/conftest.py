"""Fixtures for the deformable-attention kernel tests: one CPU build per session, backend state reset."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from ops import build
from ops import ms_deform_attn as msda


@pytest.fixture(scope="session")
def cpu_kernels():
    """The CPU kernel, built once per session (or found in the cache)."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx}) on PATH: the CPU kernel cannot be built here")
    start = time.perf_counter()
    kernels = build.load_kernels("cpu")
    print(f"\n[ms_deform_attn] cpu kernel ready in {time.perf_counter() - start:.1f} s (cache {build.cache_root()})")
    return kernels


@pytest.fixture
def backend_state():
    """Restore the backend choice and the build memo after a test that changes them."""
    saved = (msda._requested, dict(msda._kernels), dict(build._loaded), dict(build._failed))
    yield msda
    msda._requested = saved[0]
    for target, source in zip((msda._kernels, build._loaded, build._failed), saved[1:]):
        target.clear()
        target.update(source)
