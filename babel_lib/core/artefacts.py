"""Artefacts: files keyed by the parameters that made them, written atomically.

An artefact is a safetensors file of named tensors plus a JSON sidecar with its parameters and any
metadata (tables, fingerprints). The key is a hash of the parameters, so a changed parameter makes a
new file, an unchanged one is reused, and an interrupted run resumes where it stopped. The sidecar records
the tensor file's sha256 and a digest of its own content, so a garbled file or an edited sidecar is caught on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from babel_lib.errors import BabelError


_TEMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")  # what atomic_path names its temporary files


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (about 1 s a GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a process we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(root: str | Path) -> list[Path]:
    """Delete atomic_path temporaries under `root` left by processes that died (SIGKILL); return them."""
    stale = [p for p in Path(root).rglob(".*.tmp")
             if (m := _TEMP.match(p.name)) and p.is_file() and not pid_alive(int(m.group(1)))]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def params_key(params: Mapping[str, Any]) -> str:
    """A short, stable hash of JSON-serialisable parameters."""
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"  # plain create: honours the umask
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))


def _sidecar_digest(record: Mapping[str, Any]) -> str:
    """The sha256 of a sidecar's content (everything but the digest itself), in canonical JSON."""
    body = {k: v for k, v in record.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def read_artefact(tensor_path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the sidecar record of an artefact file, both checked against the sidecar's hashes."""
    tensor_path = Path(tensor_path)
    meta_path = tensor_path.with_suffix(".json")
    fix = f"delete {tensor_path} and {meta_path.name} and run the notebook that makes it again"
    try:
        record = json.loads(meta_path.read_text())
        expected, digest = record["sha256"], record["digest"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BabelError(f"artefact sidecar {meta_path} is unreadable or has no checksum ({err}); {fix}") from None
    if _sidecar_digest(record) != digest:
        raise BabelError(f"artefact sidecar {meta_path} was edited (its content does not match its digest); {fix}")
    try:
        actual = sha256_file(tensor_path)
    except OSError as err:
        raise BabelError(f"artefact {tensor_path} is unreadable ({err}); {fix}") from None
    if actual != expected:
        raise BabelError(f"artefact {tensor_path} is corrupt: it does not match the sha256 in its sidecar; {fix}")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise BabelError(f"artefact {tensor_path} is corrupt ({err}); {fix}") from None
    return tensors, record


class ArtefactStore:
    """Artefacts under one root folder: <root>/<kind>/<params key>.{safetensors,json}.

    Opening a store removes the temporary files of writers that were killed (see remove_stale_temps).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.is_dir():
            remove_stale_temps(self.root)

    def paths(self, kind: str, params: Mapping[str, Any]) -> tuple[Path, Path]:
        base = self.root / kind / params_key(params)
        return base.with_suffix(".safetensors"), base.with_suffix(".json")

    def exists(self, kind: str, params: Mapping[str, Any]) -> bool:
        tensors, meta = self.paths(kind, params)
        return tensors.exists() and meta.exists()

    def save(self, kind: str, params: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
             meta: Mapping[str, Any] | None = None) -> Path:
        """Write the tensors, then the sidecar (its presence marks the artefact complete)."""
        tensor_path, meta_path = self.paths(kind, params)
        with atomic_path(tensor_path) as tmp:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
            sha256 = sha256_file(tmp)
        # the record goes through JSON once so the digest is taken over exactly what a later load reads back
        record = json.loads(json.dumps({"kind": kind, "params": dict(params), "meta": dict(meta or {}),
                                        "sha256": sha256}, default=str))
        write_json(meta_path, record | {"digest": _sidecar_digest(record)})
        return tensor_path

    def load(self, kind: str, params: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors and metadata of an artefact; a clear error if it is missing or corrupt."""
        tensor_path, meta_path = self.paths(kind, params)
        if not (tensor_path.exists() and meta_path.exists()):
            raise BabelError(f"no {kind} artefact for these parameters under {self.root}; run the notebook that "
                             f"makes it first (make figures), parameters: {json.dumps(dict(params), default=str)}")
        tensors, record = read_artefact(tensor_path)
        return tensors, record["meta"]

    def cached(self, kind: str, params: Mapping[str, Any],
               compute: Callable[[], tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]]
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Load the artefact if it exists, else compute (tensors, meta), save and return it."""
        if not self.exists(kind, params):
            tensors, meta = compute()
            self.save(kind, params, tensors, meta)
        return self.load(kind, params)
