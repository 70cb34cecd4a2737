"""Reader of the single-epoch pretraining corpus: token-id shards that `make pretrain` writes to .tokens/pretrain/.

Needs only numpy and the standard library, so it runs on a bare GPU machine. The folder holds
- manifest.json: format, tokenizer sha256/vocab/eos id, and per shard its split, tokens, documents and sha256;
- tokenizer.json: the zoo's byte-level BPE the ids come from;
- train-NNN.u16.xz and heldout-NNN.u16.xz: each an xz file of uint16 little-endian token ids, whole documents
  each followed by <eos>, at most 55 MiB and valid on its own (a machine may carry only some train shards).

    tokens = load_tokens(folder, "heldout")                       # held-out ids, disjoint from training
    for batch in iter_windows(folder, seq_len=257, batch_size=64, seed=0):  # int64 [64, 257], one epoch
        ...

Every shard is checked against the sha256 in manifest.json when it is read.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from babel_lib.errors import BabelError

TOKENS_DIR = Path(__file__).resolve().parents[2] / ".tokens" / "pretrain"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
FORMAT = "uint16-le xz"
SPLITS = ("train", "heldout")


def read_manifest(folder: str | Path = TOKENS_DIR) -> dict[str, Any]:
    """manifest.json of a shard folder (shards listed in order, per split)."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BabelError(f"no {path}: build the pretraining tokens with `make pretrain` (or carry .tokens/)") from None
    except ValueError as err:
        raise BabelError(f"{path} is not valid JSON ({err}); rebuild it with `make pretrain`") from None
    if manifest.get("format") != FORMAT:
        raise BabelError(f"{path} has format {manifest.get('format')!r}, not {FORMAT!r}; rebuild with `make pretrain`")
    return manifest


def _entries(manifest: dict[str, Any], split: str, shards: Sequence[str] | None) -> list[dict[str, Any]]:
    """The manifest entries of the requested shards of a split (all of the split's shards when None)."""
    if split not in SPLITS:
        raise BabelError(f"unknown split {split!r}; use one of {SPLITS}")
    listed = [entry for entry in manifest["shards"] if entry["split"] == split]
    if shards is None:
        return listed
    if isinstance(shards, str):
        raise BabelError(f"shards must be a list of file names, not the string {shards!r}; use [{shards!r}]")
    by_name = {entry["file"]: entry for entry in listed}
    unknown = [name for name in shards if name not in by_name]
    if unknown or len(set(shards)) != len(shards):
        raise BabelError(f"shards {list(shards)} must name distinct {split} shards of the manifest: "
                         f"{', '.join(by_name)}")
    return [by_name[name] for name in shards]


def present_shards(folder: str | Path = TOKENS_DIR, split: str = "train") -> list[str]:
    """The split's shards (manifest order) whose files are in the folder, e.g. the part one device call carried."""
    entries = _entries(read_manifest(folder), split, None)
    return [entry["file"] for entry in entries if (Path(folder) / entry["file"]).is_file()]


def read_shard(folder: str | Path, entry: dict[str, Any]) -> np.ndarray:
    """The uint16 token ids of one shard, after checking its sha256 and token count against the manifest."""
    path = Path(folder) / entry["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BabelError(f"shard {path} is missing: copy it with the others or pass the shards you have "
                         f"(present_shards) as shards=") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise BabelError(f"shard {path} does not match the sha256 in {MANIFEST} (corrupt or from another build); "
                         "copy it again or rebuild with `make pretrain`")
    raw = lzma.decompress(data, format=lzma.FORMAT_XZ)
    if len(raw) != 2 * entry["tokens"]:
        raise BabelError(f"shard {path} holds {len(raw) // 2} tokens, the manifest {entry['tokens']}; rebuild it")
    return np.frombuffer(raw, dtype="<u2")


def load_tokens(folder: str | Path = TOKENS_DIR, split: str = "train",
                shards: Sequence[str] | None = None) -> np.ndarray:
    """The token ids of a split (uint16, shards concatenated in manifest order); `shards` picks some of them."""
    entries = _entries(read_manifest(folder), split, shards)
    if not entries:
        raise BabelError(f"no {split} shards selected in {folder}; pass shard file names listed in {MANIFEST}")
    return np.concatenate([read_shard(folder, entry) for entry in entries])


def window_count(folder: str | Path, seq_len: int, shards: Sequence[str] | None = None, split: str = "train") -> int:
    """How many whole windows of seq_len tokens the selected shards give (from the manifest, nothing decompressed)."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise BabelError(f"seq_len must be a positive int, got {seq_len!r}")
    return sum(entry["tokens"] for entry in _entries(read_manifest(folder), split, shards)) // seq_len


def iter_windows(folder: str | Path = TOKENS_DIR, seq_len: int = 257, batch_size: int = 64, seed: int = 0,
                 shards: Sequence[str] | None = None, skip_batches: int = 0,
                 split: str = "train") -> Iterator[np.ndarray]:
    """One epoch of int64 batches [batch_size, seq_len]: the stream cut into consecutive non-overlapping windows,
    visited in a seeded random order, each window (so each token) at most once; the last partial batch is dropped.
    `skip_batches` resumes an interrupted epoch. Ask for seq_len + 1 to get inputs and shifted targets."""
    count = window_count(folder, seq_len, shards, split)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise BabelError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(skip_batches, int) or skip_batches < 0:
        raise BabelError(f"skip_batches must be a non-negative int (batches already trained), got {skip_batches!r}")
    tokens = load_tokens(folder, split, shards)
    order = np.random.default_rng(seed).permutation(count)
    offsets = np.arange(seq_len)
    for start in range(skip_batches * batch_size, count - batch_size + 1, batch_size):
        windows = order[start:start + batch_size]
        yield tokens[windows[:, None] * seq_len + offsets].astype(np.int64)
