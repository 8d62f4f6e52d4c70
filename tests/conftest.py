"""Shared test set-up: Taichi runs on the CPU, started once per test session."""
import os

os.environ.setdefault("TAICHI_MPM_ARCH", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ti_arch() -> str:
    from taichi_mpm.runtime import ensure_init

    return ensure_init()
