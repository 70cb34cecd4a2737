"""The smoke run every acceptance test reads: `make figures PROFILE=smoke`, made once per session."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from babel_lib.core.config import ROOT


def _make(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def make():
    """make(*args, timeout=3600): `make -C <root> args...`, output captured."""
    return _make


@pytest.fixture(scope="session")
def smoke_run():
    """A fresh smoke run of the whole chain (earlier smoke outputs are removed first). BABEL_SMOKE_REUSE=1
    keeps them, so make only redoes what changed (for working on a test)."""
    if os.environ.get("BABEL_SMOKE_REUSE") != "1":
        for folder in (ROOT / "build" / "smoke", ROOT / "figures" / "smoke"):
            shutil.rmtree(folder, ignore_errors=True)
    first = _make("figures", "PROFILE=smoke")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return first
