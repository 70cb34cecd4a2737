"""Shared fixtures: tiny random models of every supported family, loaded once per session."""

from __future__ import annotations

import functools

import pytest
import torch

from babel_lib.core.models import LoadedModel, load_model

torch.set_num_threads(2)


@functools.cache
def _tiny(model_type: str, dtype: str) -> LoadedModel:
    return load_model(f"tiny:{model_type}", device="cpu", dtype=dtype)


@pytest.fixture
def tiny():
    """tiny(model_type, dtype="float32") -> a LoadedModel (cached; do not modify its weights)."""
    return lambda model_type, dtype="float32": _tiny(model_type, dtype)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: small problems on the shared 2-core machine run far slower on two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def _embedded(alias: str) -> LoadedModel:
    return load_model(alias, device="cpu", dtype="float32")


@pytest.fixture
def embedded():
    """embedded(alias) -> the embedded model in float32 on the CPU (cached for the session)."""
    return _embedded
