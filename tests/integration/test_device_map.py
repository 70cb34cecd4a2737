"""A model spread by an accelerate device map counts exactly what the same model on one device counts.

The CPU is a single torch device, so the map here places every block on "cpu" but goes through accelerate's
dispatch with its hooks (AlignDevicesHook on every module) — the path a multi-GPU map takes; moving counts
between real devices is checked on two H200s by benchmarks/distributed.py (identical count hashes).
"""

from __future__ import annotations

import pytest
import torch
from samples import TEXTS

from babel_lib.babel.conversion import partition_model
from babel_lib.babel.profiler import profile_languages
from babel_lib.core.models import load_model
from babel_lib.errors import BabelError

pytest.importorskip("accelerate")


def test_device_map_gives_the_single_device_counts(tiny):
    single = tiny("llama")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "cpu" for i in range(3)}
    split = load_model("tiny:llama", dtype="float32", device_map=device_map)
    assert hasattr(split.model.model.layers[1], "_hf_hook")  # accelerate's hooks are in place
    assert split.fingerprint == single.fingerprint
    experts = partition_model(single, 8, "random", seed=3)
    texts = {"a": TEXTS, "b": TEXTS[::-1]}
    one = profile_languages(single, experts, texts, batch_tokens=64, progress=False)
    two = profile_languages(split, experts, texts, batch_tokens=64, progress=False)
    for key in one:
        assert torch.equal(one[key], two[key]), key


def test_a_device_map_with_offloaded_weights_is_refused():
    with pytest.raises(BabelError, match="disk/meta"):
        load_model("tiny:llama", dtype="float32", device_map={"model": "disk", "lm_head": "cpu"})
