"""The zoo's data: a byte-level BPE trained on the calibration split, both splits tokenised into flat uint16
streams with spec.json (`prepare`), or a pretraining corpus's token shards recorded there; read back with their
hashes checked (`load_data`, through `token_streams`, the one place that knows both sources); and the windows cut
from them: evenly spaced held-out windows for evaluation, and one epoch of distinct training windows per run."""

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
    train: torch.Tensor  # int64 [n] (the calibration split, or the pretraining corpus's training split)
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
    """Tokenise the corpus for `spec` into `out` (or record the pretraining shards it names), skipped when up to
    date; `profile` names the config the spec came from (training then checks the data against it; "" for a
    spec made in code)."""
    if spec.corpus != "libreoffice":
        return _prepare_shards(spec, out, profile)
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


def _pretrain_tokens(folder: Path, split: str, shards: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """A split of a pretraining corpus (`babel_lib.data.pretrain`, which checks every shard's sha256): the uint16 ids
    of `shards`, by default of those present in `folder` (a GPU call may carry only some), and their names."""
    try:
        from babel_lib.data.pretrain import load_tokens, present_shards
    except ImportError:
        raise BabelError("the zoo corpus is a pretraining shard folder but this checkout has no reader for it "
                         "(babel_lib/data/pretrain.py); set zoo corpus: libreoffice, or add the pretraining corpus") from None
    shards = present_shards(folder, split) if shards is None else shards
    if not shards:
        raise BabelError(f"no {split} shard of the pretraining corpus is in {folder}; carry some with its manifest")
    return np.asarray(load_tokens(folder, split, shards), dtype=np.uint16), shards


def _prepare_shards(spec: ZooSpec, out: Path, profile: str) -> Path:
    """spec.json for a pretraining corpus: its shard folder (relative to the checkout), the shards present there,
    the manifest's sha256 and the token count of each split; the shards stay where they are."""
    folder = ROOT / spec.corpus
    manifest = folder / "manifest.json"
    if not manifest.exists():
        raise BabelError(f"zoo corpus {spec.corpus!r} has no manifest.json; build the pretraining corpus first "
                         "(make pretrain) or set zoo corpus: libreoffice")
    files = {}
    for split in ("train", "heldout"):
        tokens, shards = _pretrain_tokens(folder, split)
        files[split] = {"shards": spec.corpus, "split": split, "files": shards, "tokens": int(tokens.size),
                        "sha256": sha256_file(manifest)}
    tokenizer = json.loads(manifest.read_text())["tokenizer"]
    if tokenizer["vocab"] != spec.vocab_size:
        raise BabelError(f"the pretraining corpus's tokenizer has {tokenizer['vocab']} tokens but zoo vocab_size is "
                         f"{spec.vocab_size}; rebuild the corpus (make pretrain) or set vocab_size to match")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "spec.json", {"key": params_key({"spec": asdict(spec), "files": files}), "profile": profile,
                                   "spec": asdict(spec), "corpus_sha256": files["train"]["sha256"],
                                   "vocab": tokenizer["vocab"], "eos_id": tokenizer["eos_id"],
                                   "tokenizer_sha256": tokenizer["sha256"], "files": files})
    return out


def token_streams(directory: Path, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """The train and held-out token ids of prepared data, as uint16 arrays: the .npy streams of the LibreOffice
    corpus (sha256 checked here) or the recorded shards of a pretraining corpus (its reader checks them)."""
    streams = {}
    for name, info in meta["files"].items():
        if "shards" in info:
            manifest = ROOT / info["shards"] / "manifest.json"
            if not manifest.exists() or sha256_file(manifest) != info["sha256"]:
                raise BabelError(f"pretraining shards {info['shards']} are missing or changed; carry that folder "
                                 f"or run `python -m babel_lib.sparsing.zoo prepare --profile {meta['profile'] or '<profile>'}`")
            streams[name] = _pretrain_tokens(ROOT / info["shards"], info["split"], info["files"])[0]
            continue
        path = directory / info["file"]
        if not path.exists() or sha256_file(path) != info["sha256"]:
            raise BabelError(f"zoo data file {path} is missing or changed; run "
                             f"`python -m babel_lib.sparsing.zoo prepare --profile {meta['profile'] or '<profile>'} --force`")
        streams[name] = np.load(path)
    return streams


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
    """The prepared token streams of `directory` (`token_streams`), their hashes checked against spec.json."""
    meta = read_meta(directory)
    streams = {k: torch.from_numpy(v.astype(np.int64)) for k, v in token_streams(directory, meta).items()}
    return ZooData(make_spec(meta["spec"]), streams["train"], streams["heldout"], meta)


def eval_windows(stream: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    """`n` windows [n, seq_len] evenly spaced over the held-out stream, so every language is represented."""
    if stream.numel() < seq_len:
        raise BabelError(f"held-out stream has {stream.numel()} tokens, fewer than seq_len={seq_len}; "
                         f"lower zoo seq_len or raise paragraphs")
    starts = torch.linspace(0, stream.numel() - seq_len, n).round().long()
    return stream[starts[:, None] + torch.arange(seq_len)]


def epoch_order(stream: torch.Tensor, spec: ZooSpec, generator: torch.Generator) -> torch.Tensor:
    """The training windows a run reads, [steps, batch_size] window numbers: distinct numbers drawn without
    replacement (on the CPU: the same on any device), so no window is read twice. Window k is the tokens
    [k·seq_len, (k+1)·seq_len] (seq_len + 1, the last one only a target), so every token is predicted at most once."""
    available, needed = (stream.numel() - 1) // spec.seq_len, spec.steps * spec.batch_size
    if needed > available:
        raise BabelError(f"one epoch of {available:,} training windows of {spec.seq_len} tokens cannot feed {spec.steps} "
                         f"steps x {spec.batch_size} windows ({needed:,}); lower zoo steps or batch_size, or use more data")
    return torch.randperm(available, generator=generator)[:needed].view(spec.steps, spec.batch_size)


def batch_indices(windows: torch.Tensor, spec: ZooSpec, device: torch.device | str) -> torch.Tensor:
    """Token indices [len(windows), seq_len + 1] of the numbered training windows (a row of `epoch_order`)."""
    return (windows[:, None] * spec.seq_len + torch.arange(spec.seq_len + 1)).to(device)


def run_key(meta: dict[str, Any]) -> str:
    """What makes finished runs reusable, from spec.json: the spec and the exact data (a change retrains)."""
    return params_key({"spec": asdict(make_spec(meta["spec"])),
                       "files": {k: v["sha256"] for k, v in meta["files"].items()}})
