"""Artefacts: files keyed by the parameters that made them, written atomically.

An artefact is a safetensors file of named tensors plus a JSON sidecar with its parameters and any
metadata (tables, fingerprints). The key is a hash of the parameters, so a changed parameter makes a
new file, an unchanged one is reused, and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from babel_lib.errors import BabelError


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


class ArtefactStore:
    """Artefacts under one root folder: <root>/<kind>/<params key>.{safetensors,json}."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

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
        write_json(meta_path, {"kind": kind, "params": dict(params), "meta": dict(meta or {})})
        return tensor_path

    def load(self, kind: str, params: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors and metadata of an artefact; a clear error if it is missing or corrupt."""
        tensor_path, meta_path = self.paths(kind, params)
        if not (tensor_path.exists() and meta_path.exists()):
            raise BabelError(f"no {kind} artefact for these parameters under {self.root}; run the notebook that "
                             f"makes it first (make figures), parameters: {json.dumps(dict(params), default=str)}")
        try:
            tensors = load_file(str(tensor_path))
            meta = json.loads(meta_path.read_text())["meta"]
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            raise BabelError(f"artefact {tensor_path} is corrupt ({err}); delete {tensor_path} and "
                             f"{meta_path.name} and run again to rebuild it") from None
        return tensors, meta

    def cached(self, kind: str, params: Mapping[str, Any],
               compute: Callable[[], tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]]
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Load the artefact if it exists, else compute (tensors, meta), save and return it."""
        if not self.exists(kind, params):
            tensors, meta = compute()
            self.save(kind, params, tensors, meta)
        return self.load(kind, params)
