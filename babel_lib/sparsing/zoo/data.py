"""The zoo's data: a byte-level BPE trained on the calibration split, both splits tokenised into flat uint16
streams with spec.json (`prepare`), read back with their hashes checked (`load_data`), and the windows cut from
them for evaluation and training."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from babel_lib.core.artefacts import atomic_path, params_key, write_json
from babel_lib.core.config import ROOT
from babel_lib.errors import BabelError
from babel_lib.sparsing.zoo.spec import ZooSpec, make_spec, spec_from_profile

EOS = "<eos>"


@dataclass
class ZooData:
    """The prepared data of a profile: spec, calibration and held-out token streams, and their provenance."""

    spec: ZooSpec
    train: torch.Tensor  # int64 [n] (calibration split)
    heldout: torch.Tensor  # int64 [m]
    meta: dict[str, Any]  # contents of spec.json

    @property
    def vocab(self) -> int:
        return int(self.meta["vocab"])


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on `texts` with one special token <eos> (id 0); deterministic for fixed input.

    Why not an embedded model's tokenizer: SmolLM2's 49k vocabulary would put most of a micro model's
    parameters and FLOPs in the embedding and LM head, and it splits non-Latin scripts into many tokens; a BPE
    trained on all the corpus languages gives every language a comparable share of the vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def token_stream(tokenizer, columns: dict[str, list[str]]) -> tuple[np.ndarray, dict[str, list[int]]]:
    """One flat uint16 stream: each language's paragraphs in corpus order, each followed by <eos>; plus the
    [start, end) span of every language (windows stay monolingual except at the 16 language boundaries)."""
    eos = tokenizer.token_to_id(EOS)
    parts, spans, start = [], {}, 0
    for code, texts in columns.items():
        ids = [i for enc in tokenizer.encode_batch(texts) for i in (*enc.ids, eos)]
        parts.append(np.asarray(ids, dtype=np.uint16))
        spans[code] = [start, start + len(ids)]
        start += len(ids)
    return np.concatenate(parts), spans


def prepare(spec: ZooSpec, out: Path, profile: str = "", force: bool = False) -> Path:
    """Tokenise the corpus for `spec` into `out`, skipped when up to date; `profile` names the config the spec
    came from (training then checks the data against it; "" for a spec made in code)."""
    from babel_lib.data.corpus import corpus_info, load_corpus

    info = corpus_info()
    corpus_sha, codes = info["sha256"], list(spec.languages or info["languages"])
    key = params_key({"spec": asdict(spec), "corpus": corpus_sha, "profile": profile})
    meta_path = out / "spec.json"
    if not force and meta_path.exists() and json.loads(meta_path.read_text()).get("key") == key:
        return out
    splits = {}
    for split in ("calibration", "heldout"):
        table = load_corpus(codes, split=split, limit=spec.paragraphs)
        splits[split] = {code: list(table[code]) for code in codes}
    tokenizer = train_tokenizer([t for texts in splits["calibration"].values() for t in texts], spec.vocab_size)
    if tokenizer.get_vocab_size() > 2**16:
        raise BabelError(f"zoo vocab_size {tokenizer.get_vocab_size()} does not fit uint16; use at most 65536")
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, split in (("train", "calibration"), ("heldout", "heldout")):
        stream, spans = token_stream(tokenizer, splits[split])
        path = out / f"{name}.npy"
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, stream)
        files[name] = {"file": path.name, "tokens": int(stream.size), "sha256": sha256_file(path), "spans": spans,
                       "paragraphs": len(next(iter(splits[split].values())))}
    with atomic_path(out / "tokenizer.json") as tmp:
        tmp.write_text(tokenizer.to_str())
    write_json(meta_path, {"key": key, "profile": profile, "spec": asdict(spec), "corpus_sha256": corpus_sha,
                           "vocab": tokenizer.get_vocab_size(), "eos_id": tokenizer.token_to_id(EOS),
                           "tokenizer_sha256": sha256_file(out / "tokenizer.json"), "files": files})
    return out


def read_meta(directory: Path) -> dict[str, Any]:
    """spec.json of prepared data, checked against the config of the profile that made it where YAML can be
    read (a GPU machine without PyYAML trusts spec.json, which `make zoo` rebuilds when the config changes)."""
    path = directory / "spec.json"
    if not path.exists():
        raise BabelError(f"no zoo data in {directory}; run `python -m babel_lib.sparsing.zoo prepare --profile <profile>`")
    meta = json.loads(path.read_text())
    profile = meta["profile"]
    if profile and importlib.util.find_spec("yaml") is not None and (ROOT / "configs" / f"{profile}.yaml").exists():
        if asdict(spec_from_profile(profile)) != asdict(make_spec(meta["spec"])):
            raise BabelError(f"zoo data in {directory} was prepared with other settings than configs/{profile}."
                             f"yaml; run `python -m babel_lib.sparsing.zoo prepare --profile {profile}` again")
    return meta


def load_data(directory: Path) -> ZooData:
    """The prepared token streams in `directory`, their sha256 checked against spec.json."""
    meta = read_meta(directory)
    streams = {}
    for name, info in meta["files"].items():
        path = directory / info["file"]
        if not path.exists() or sha256_file(path) != info["sha256"]:
            raise BabelError(f"zoo data file {path} is missing or changed; run "
                             f"`python -m babel_lib.sparsing.zoo prepare --profile {meta['profile'] or '<profile>'} --force`")
        streams[name] = torch.from_numpy(np.load(path).astype(np.int64))
    return ZooData(make_spec(meta["spec"]), streams["train"], streams["heldout"], meta)


def eval_windows(stream: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    """`n` windows [n, seq_len] evenly spaced over the held-out stream, so every language is represented."""
    if stream.numel() < seq_len:
        raise BabelError(f"held-out stream has {stream.numel()} tokens, fewer than seq_len={seq_len}; "
                         f"lower zoo seq_len or raise paragraphs")
    starts = torch.linspace(0, stream.numel() - seq_len, n).round().long()
    return stream[starts[:, None] + torch.arange(seq_len)]


def batch_indices(stream: torch.Tensor, spec: ZooSpec, generator: torch.Generator) -> torch.Tensor:
    """`batch_size` windows of seq_len + 1 tokens at uniform random offsets (drawn on the CPU: same on any device)."""
    starts = torch.randint(0, stream.numel() - spec.seq_len, (spec.batch_size,), generator=generator)
    return (starts[:, None] + torch.arange(spec.seq_len + 1)).to(stream.device)


def run_key(meta: dict[str, Any]) -> str:
    """What makes finished runs reusable, from spec.json: the spec and the exact data (a change retrains)."""
    return params_key({"spec": asdict(make_spec(meta["spec"])),
                       "files": {k: v["sha256"] for k, v in meta["files"].items()}})
