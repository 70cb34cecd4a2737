"""The micro model family ("zoo"): LLaMA-style ReLU and SiLU models trained on the parallel corpus, with the
PPL-p% activation ratio (Sparsing Law) measured at log-spaced checkpoints of every run.

Three steps, one CLI (`python -m babel_lib.sparsing.zoo prepare|family|train|table --profile P`):
- prepare (CPU, once): train a byte-level BPE on the calibration split and tokenise both splits into flat
  uint16 files under build/zoo-data/<profile>/, with spec.json (the resolved settings). Training reads only
  that folder, so a GPU machine with no corpus, `datasets`, YAML or model cache can run it.
- train: train some runs (`--runs`), `--jobs` at a time, evaluate every checkpoint with `sparsity.ppl_p`, and
  write each run's rows atomically after every checkpoint; a run is finished when its <run>.json is written,
  and a re-run skips finished runs (a run cut off by a time limit restarts from scratch).
- table: merge the finished runs into data/zoo/zoo.csv (profiles default and gpu) or build/<profile>/zoo/zoo.csv
  with PROVENANCE.json (commands, code and data hashes, commit, machine, versions, times).

Design. Models are LLaMA-style (RMSNorm, RoPE, gated FFN with the activation on the gate as in the paper's
models, no biases, tied embeddings, d_ff = 8/3 width) with ReLU or SiLU; "parameters" counts non-embedding
parameters, as the paper does. The default family has three scales at width/depth 32 and four width/depth
ratios at ~4M parameters; every run sees the same tokens (the corpus is small, so several epochs: the held-out
dense loss in the table shows any overfitting). ReLU and SiLU of one shape share initial weights and data order,
so they differ only in the activation. Each checkpoint gets its own PPL-p% bisection (the paper reuses one CETT
value over its last checkpoints), so every row stands alone. No torch.compile: compiling a dozen shapes would
take longer than most runs train.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import importlib.util
import io
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from babel_lib.core.artefacts import atomic_path, params_key, write_json
from babel_lib.errors import BabelError

from babel_lib.core.config import ROOT
ACTIVATIONS = ("relu", "silu")
EOS = "<eos>"
# Rough H100 cost model, used to order parallel jobs and print expected times (not a measurement). Micro models are
# launch-bound: a training step costs ~1 ms per decoder layer (~120 forward, backward and autocast kernels at
# ~8 us of eager overhead each) on top of its FLOPs at ~150 TFLOP/s (bf16, matrices this small). Evaluation runs
# in fp32 (~50 TFLOP/s): PPL-p% takes ~15 bisection steps (8-10 when the 1 % target is reachable, 30 when an
# early checkpoint's FFNs matter too little to reach it); each step runs, per evaluation batch, a dense and a
# sparse forward (~0.3 ms per layer) and per layer an exact threshold search of ~24 CETT evaluations
# (~60 us of overhead each plus a [tokens, d_ff] x [d_ff, width] matmul).
EST_LAYER_STEP_S = 1.0e-3
EST_FLOPS = 150e12
EST_LAYER_FORWARD_S = 0.3e-3
EST_FP32_FLOPS = 50e12
EST_BISECTIONS = 15
EST_CETT_STEPS = 24
EST_CETT_EVAL_S = 60e-6
TABLE_COLUMNS = ("run", "activation", "width", "depth", "width_depth_ratio", "d_ff", "heads", "params", "axes",
                 "step", "tokens", "epochs", "lr", "train_loss", "dense_loss", "sparse_loss", "ppl_ratio", "cett",
                 "activation_ratio", "converged", "bisections")


@dataclass(frozen=True)
class ZooSpec:
    """The family and its training and evaluation settings: the `zoo:` section of a profile plus its seed.

    Shapes are [width, depth] pairs: `scale_shapes` keep one width/depth ratio across parameter scales,
    `ratio_shapes` keep about one parameter count across width/depth ratios (a shape may be on both axes).
    Schedule: warmup-stable-decay (WSD, as the paper): linear warmup over `warmup` of the steps, constant peak
    `lr`, linear decay to zero over the last `decay` of the steps.
    """

    device: str
    languages: tuple[str, ...] | None  # corpus language codes, None = all of them
    paragraphs: int | None  # per split, None = all
    vocab_size: int
    seq_len: int
    head_dim: int
    ffn_multiple: int
    activations: tuple[str, ...]
    scale_shapes: tuple[tuple[int, int], ...]
    ratio_shapes: tuple[tuple[int, int], ...]
    steps: int
    batch_size: int
    checkpoints: int
    first_checkpoint: int  # the step of the first checkpoint; the others are log-spaced up to `steps`
    lr: float
    warmup: float
    decay: float
    weight_decay: float
    grad_clip: float
    eval_windows: int
    eval_batch: int
    ppl_p: float
    tol: float
    threads: int
    seed: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


@dataclass(frozen=True)
class Run:
    """One member of the family: a shape, an activation, and its derived sizes."""

    name: str
    activation: str
    width: int
    depth: int
    d_ff: int
    heads: int
    params: int  # non-embedding parameters (the paper's count): decoder layers + final norm
    axes: tuple[str, ...]  # "scale" and/or "ratio"

    @property
    def width_depth_ratio(self) -> float:
        return self.width / self.depth


# ---------------------------------------------------------------------------------------------- the family


def spec_from_profile(profile: str) -> ZooSpec:
    """The ZooSpec of configs/<profile>.yaml (its `zoo:` section and seed)."""
    from babel_lib.core.config import load_profile

    raw = load_profile(profile)
    if "zoo" not in raw:
        raise BabelError(f"configs/{profile}.yaml has no `zoo:` section; add one (see configs/default.yaml)")
    section = dict(raw["zoo"])
    shapes = section.pop("shapes", None) or {}
    section |= {"seed": raw.get("seed", 0),
                "scale_shapes": shapes.get("scale"), "ratio_shapes": shapes.get("ratio")}
    return make_spec(section)


def make_spec(values: dict[str, Any]) -> ZooSpec:
    """A checked ZooSpec from plain values (a config section or spec.json)."""
    names = {f.name for f in fields(ZooSpec)}
    unknown, missing = sorted(set(values) - names), sorted(names - set(values))
    if unknown or missing:
        raise BabelError(f"zoo settings: unknown {unknown}, missing {missing}; the keys are {sorted(names)}")
    values = dict(values)
    for key in ("activations", "scale_shapes", "ratio_shapes"):
        if not values[key]:
            raise BabelError(f"zoo {key} is empty; list them in the zoo section (see configs/default.yaml)")
    values["activations"] = tuple(values["activations"])
    values["languages"] = None if values["languages"] is None else tuple(values["languages"])
    for key in ("scale_shapes", "ratio_shapes"):
        values[key] = tuple((int(w), int(d)) for w, d in values[key])
    spec = ZooSpec(**values)
    bad = [a for a in spec.activations if a not in ACTIVATIONS]
    if bad:
        raise BabelError(f"zoo activations {bad} are not supported; use some of {ACTIVATIONS}")
    odd = [s for s in spec.scale_shapes + spec.ratio_shapes if s[0] % spec.head_dim or s[1] < 1]
    if odd:
        raise BabelError(f"zoo shapes {odd} need a width divisible by head_dim={spec.head_dim} and depth >= 1")
    checkpoint_steps(spec)
    return spec


def ffn_width(width: int, multiple: int) -> int:
    """LLaMA's FFN width: 8/3 of the model width (gated FFN at ~4x compute), rounded up to `multiple`."""
    return multiple * math.ceil(8 * width / 3 / multiple)


def non_embedding_params(width: int, depth: int, d_ff: int) -> int:
    """Parameters outside the (tied) embedding: per layer q,k,v,o (width^2 each), gate, up, down, two RMSNorms."""
    return depth * (4 * width * width + 3 * width * d_ff + 2 * width) + width


def family(spec: ZooSpec) -> list[Run]:
    """Every run of the family: each distinct shape (scale axis first) with each activation."""
    shapes: dict[tuple[int, int], list[str]] = {}
    for axis, axis_shapes in (("scale", spec.scale_shapes), ("ratio", spec.ratio_shapes)):
        for shape in axis_shapes:
            shapes.setdefault(shape, []).append(axis)
    runs = []
    for activation in spec.activations:
        for (width, depth), axes in shapes.items():
            d_ff = ffn_width(width, spec.ffn_multiple)
            runs.append(Run(f"{activation}-w{width}-d{depth}", activation, width, depth, d_ff,
                            width // spec.head_dim, non_embedding_params(width, depth, d_ff), tuple(axes)))
    return runs


def select(runs: list[Run], patterns: str | None = None) -> list[Run]:
    """The runs whose names match one of the comma-separated glob `patterns` ("relu-*,silu-w128-d4"), in order."""
    if not patterns:
        return runs
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in wanted)]
    if not chosen:
        raise BabelError(f"no zoo run matches {patterns!r}; list them with `python -m babel_lib.sparsing.zoo family`")
    return chosen


def checkpoint_steps(spec: ZooSpec) -> list[int]:
    """`checkpoints` steps log-spaced from `first_checkpoint` to `steps` (the last one ends the run)."""
    n, first, last = spec.checkpoints, spec.first_checkpoint, spec.steps
    if n < 2 or not 1 <= first < last:
        raise BabelError(f"zoo checkpoints={n}, first_checkpoint={first}, steps={last}: need n >= 2 and "
                         f"1 <= first_checkpoint < steps")
    steps = sorted({round(first * (last / first) ** (k / (n - 1))) for k in range(n)})
    if len(steps) < n:
        raise BabelError(f"zoo: {n} log-spaced checkpoints between steps {first} and {last} collide; "
                         f"raise steps or lower first_checkpoint / checkpoints")
    return steps


def lr_factor(step: int, spec: ZooSpec) -> float:
    """The WSD multiplier of the peak learning rate at `step` (1-based)."""
    warm = max(1, round(spec.warmup * spec.steps))
    decay = max(1, round(spec.decay * spec.steps))
    if step <= warm:
        return step / warm
    return min(1.0, (spec.steps - step + 1) / decay)


def step_flops(run: Run, spec: ZooSpec, vocab: int) -> float:
    """Training FLOPs of one step: 6 x (non-embedding + LM-head parameters) per token, plus causal attention."""
    per_token = 6 * (run.params + vocab * run.width) + 6 * run.depth * spec.seq_len * run.width
    return per_token * spec.tokens_per_step


def estimated_seconds(run: Run, spec: ZooSpec) -> float:
    """Expected H100 time of a run (training + PPL-p% at every checkpoint) under the cost model above."""
    step = run.depth * EST_LAYER_STEP_S + step_flops(run, spec, spec.vocab_size) / EST_FLOPS
    tokens = min(spec.eval_batch, spec.eval_windows) * spec.seq_len
    forward = run.depth * EST_LAYER_FORWARD_S + 2 * (run.params + spec.vocab_size * run.width) * tokens / EST_FP32_FLOPS
    search = run.depth * EST_CETT_STEPS * (EST_CETT_EVAL_S + 2 * tokens * run.d_ff * run.width / EST_FP32_FLOPS)
    bisection = math.ceil(spec.eval_windows / spec.eval_batch) * (2 * forward + search)
    return spec.steps * step + spec.checkpoints * EST_BISECTIONS * bisection


def seed_of(run: Run, spec: ZooSpec) -> int:
    """The run's seed: a function of the shape only, so ReLU and SiLU of one shape share init and data order."""
    return int(params_key({"seed": spec.seed, "width": run.width, "depth": run.depth}), 16) % (2**31)


def build_model(run: Run, spec: ZooSpec, vocab: int) -> nn.Module:
    """A randomly initialised LlamaForCausalLM for the run (RMSNorm, RoPE, gated FFN, tied embeddings), fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=run.width, intermediate_size=run.d_ff,
                         num_hidden_layers=run.depth, num_attention_heads=run.heads, num_key_value_heads=run.heads,
                         head_dim=spec.head_dim, hidden_act=run.activation, max_position_embeddings=spec.seq_len,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=0, pad_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(run, spec))
        return LlamaForCausalLM(config).float()


# ------------------------------------------------------------------------------------------------- the data


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


def data_dir(profile: str) -> Path:
    """Where `prepare` writes a profile's tokenised data (an ignored build folder the GPU command carries)."""
    return ROOT / "build" / "zoo-data" / profile


def _sha256(path: Path) -> str:
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
        files[name] = {"file": path.name, "tokens": int(stream.size), "sha256": _sha256(path), "spans": spans,
                       "paragraphs": len(next(iter(splits[split].values())))}
    with atomic_path(out / "tokenizer.json") as tmp:
        tmp.write_text(tokenizer.to_str())
    write_json(meta_path, {"key": key, "profile": profile, "spec": asdict(spec), "corpus_sha256": corpus_sha,
                           "vocab": tokenizer.get_vocab_size(), "eos_id": tokenizer.token_to_id(EOS),
                           "tokenizer_sha256": _sha256(out / "tokenizer.json"), "files": files})
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
        if not path.exists() or _sha256(path) != info["sha256"]:
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


# --------------------------------------------------------------------------------------- training and rows


def measure(model: nn.Module, windows: torch.Tensor, spec: ZooSpec) -> dict[str, float]:
    """The PPL-p% point of a checkpoint (Sparsing Law): bisect the CETT so that sparse perplexity is (1 + p/100)
    x dense, in float32 on the held-out windows; each checkpoint is bisected on its own."""
    from babel_lib.sparsing.sparsity import ppl_p

    result = ppl_p(model, windows, p=spec.ppl_p, tol=spec.tol, batch_size=spec.eval_batch)
    return {"dense_loss": float(result.dense_loss), "sparse_loss": float(result.sparse_loss),
            "ppl_ratio": float(result.ppl_ratio), "cett": float(result.cett),
            "activation_ratio": float(result.activation_ratio), "converged": bool(result.converged),
            "bisections": len(result.trace)}


def machine() -> dict[str, str]:
    """The machine a run used: accelerator (or CPU model), library versions, platform."""
    import transformers

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")] if cpuinfo.exists() else []
        device = f"CPU: {names[0] if names else platform.processor() or platform.machine()}"
    return {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def code_hashes() -> dict[str, str]:
    """sha256 of the modules that define a run's numbers (this file, the sparsity metric)."""
    here = Path(__file__).resolve().parent
    return {name: _sha256(here / name) for name in ("zoo.py", "sparsity.py") if (here / name).exists()}


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as CSV atomically (the whole file each time: a killed run leaves its last complete version)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def _run_row(run: Run) -> dict[str, Any]:
    return {"run": run.name, "activation": run.activation, "width": run.width, "depth": run.depth,
            "width_depth_ratio": round(run.width_depth_ratio, 4), "d_ff": run.d_ff, "heads": run.heads,
            "params": run.params, "axes": ";".join(run.axes)}


def is_finished(run: Run, out: Path, key: str) -> bool:
    """Whether `out` holds a finished run made with the same spec and data (its <run>.json marks it)."""
    marker = out / f"{run.name}.json"
    return marker.exists() and json.loads(marker.read_text()).get("key") == key


def train_run(run: Run, data: ZooData, out: Path, device: str, command: list[str] | None = None) -> list[dict]:
    """Train one run, measuring PPL-p% at every checkpoint; writes <run>.csv after each and <run>.json at the end.

    AdamW (betas 0.9/0.95, weight decay on matrices only), gradient clipping, bf16 autocast on CUDA with fp32
    weights; evaluation in fp32. Training loss is averaged on the device since the previous checkpoint.
    """
    spec, started = data.spec, time.time()
    model = build_model(run, spec, data.vocab).to(device)
    decayed = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": spec.weight_decay},
                                   {"params": others, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.95),
                                  fused=device.startswith("cuda"))
    stream, windows = data.train.to(device), eval_windows(data.heldout, spec.eval_windows, spec.seq_len)
    generator = torch.Generator().manual_seed(seed_of(run, spec))
    checkpoints, rows = set(checkpoint_steps(spec)), []
    loss_sum, loss_steps, eval_seconds = torch.zeros((), device=device), 0, 0.0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    model.train()
    for step in range(1, spec.steps + 1):
        lr = spec.lr * lr_factor(step, spec)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = stream[batch_indices(stream, spec, generator)]
        with autocast:
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        loss_steps += 1
        if step in checkpoints:
            tick = time.time()
            model.eval()
            point = measure(model, windows, spec)
            model.train()
            eval_seconds += time.time() - tick
            tokens = step * spec.tokens_per_step
            rows.append(_run_row(run) | {"step": step, "tokens": tokens, "lr": lr,
                                         "epochs": round(tokens / data.train.numel(), 4),
                                         "train_loss": loss_sum.item() / loss_steps} | point)
            loss_sum.zero_()
            loss_steps = 0
            _write_rows(out / f"{run.name}.csv", rows)
    write_json(out / f"{run.name}.json", {
        "run": run.name, "key": run_key(data.meta), "rows": len(rows), "started": _iso(started),
        "finished": _iso(time.time()), "seconds": round(time.time() - started, 2),
        "eval_seconds": round(eval_seconds, 2),
        "machine": machine(), "command": command or sys.argv, "code_sha256": code_hashes(),
        "data": {"tokenizer_sha256": data.meta["tokenizer_sha256"], "corpus_sha256": data.meta["corpus_sha256"],
                 "files": {k: v["sha256"] for k, v in data.meta["files"].items()}}})
    return rows


def run_key(meta: dict[str, Any]) -> str:
    """What makes finished runs reusable, from spec.json: the spec and the exact data (a change retrains)."""
    return params_key({"spec": asdict(make_spec(meta["spec"])),
                       "files": {k: v["sha256"] for k, v in meta["files"].items()}})


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _train_worker(directory: Path, name: str, out: Path, command: list[str] | None) -> list[dict]:
    """One job of a parallel `train`, in its own process: load the data and train the run called `name`."""
    data = load_data(directory)
    torch.set_num_threads(data.spec.threads)
    run = next(r for r in family(data.spec) if r.name == name)
    return train_run(run, data, out, data.spec.device, command)


def train(directory: Path, out: Path, patterns: str | None = None, jobs: int = 1,
          command: list[str] | None = None, log=print) -> list[str]:
    """Train the selected runs of the data in `directory` that `out` does not hold finished (resume), `jobs` at
    a time; returns the names of the runs trained, in family order.

    jobs > 1 starts that many worker processes, fed longest run first: micro models leave a GPU mostly idle
    between kernel launches, so several processes on one GPU overlap their launch overheads.
    """
    data = load_data(directory)
    spec = data.spec
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise BabelError("this zoo trains on CUDA and no GPU is visible; run it on a GPU (see `make zoo`) "
                         "or use --profile smoke for the toy family on the CPU")
    if jobs < 1:
        raise BabelError(f"jobs must be at least 1, got {jobs}")
    out.mkdir(parents=True, exist_ok=True)
    key, todo = run_key(data.meta), []
    for run in select(family(spec), patterns):
        if is_finished(run, out, key):
            log(f"{run.name}: finished already, skipped")
        else:
            todo.append(run)

    def report(run: Run, rows: list[dict]) -> None:
        last = rows[-1]
        log(f"{run.name}: {run.params:,} params, {last['tokens']:,} tokens; dense loss {last['dense_loss']:.3f}, "
            f"activation ratio {last['activation_ratio']:.3f} at CETT {last['cett']:.3f}")

    if jobs == 1:
        for run in todo:
            report(run, train_run(run, data, out, spec.device, command))
    else:
        longest_first = sorted(todo, key=lambda r: -estimated_seconds(r, spec))
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_train_worker, directory, r.name, out, command): r for r in longest_first}
            for future in as_completed(futures):
                report(futures[future], future.result())
    return [r.name for r in todo]


# ---------------------------------------------------------------------------------------------- the table


def table_dir(profile: str) -> Path:
    """Where `table` writes: data/zoo for the committed family (default, gpu), build/<profile>/zoo otherwise."""
    return ROOT / "data" / "zoo" if profile in ("default", "gpu") else ROOT / "build" / profile / "zoo"


def runs_dir(profile: str) -> Path:
    """Where `train` writes a profile's per-run rows by default."""
    return ROOT / "build" / profile / "zoo" / "runs"


def table_path(profile: str) -> Path:
    """The zoo table a notebook reads for `profile`."""
    return table_dir(profile) / "zoo.csv"


def _git_commit() -> dict[str, Any]:
    """The checkout's commit and whether the zoo's inputs differ from it (read-only git; None without git)."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("diff-index", "--quiet", "HEAD", "--", "babel_lib", "configs")
    except OSError:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip() or None, "dirty": dirty.returncode != 0 if head.returncode == 0 else None}


def collect(spec: ZooSpec, key: str, directories: list[Path]
            ) -> tuple[list[dict[str, str]], dict[str, dict], list[str]]:
    """Rows and run records of every finished run found in `directories` (first found wins), and the missing runs."""
    rows, records, missing = [], {}, []
    for run in family(spec):
        found = next((d for d in directories if is_finished(run, d, key)), None)
        if found is None:
            missing.append(run.name)
            continue
        records[run.name] = json.loads((found / f"{run.name}.json").read_text())
        with open(found / f"{run.name}.csv", newline="") as handle:
            rows.extend(csv.DictReader(handle))
    return rows, records, missing


def write_table(directory: Path, sources: list[Path], dest: Path | None = None,
                command: list[str] | None = None) -> tuple[Path, list[str]]:
    """Merge the finished runs found in `sources` (made from the data in `directory`) into <dest>/zoo.csv and
    PROVENANCE.json (dest defaults to the table folder of the data's profile); returns the table and missing runs."""
    meta = read_meta(directory)
    profile = meta["profile"]
    rows, records, missing = collect(make_spec(meta["spec"]), run_key(meta), sources)
    if not rows:
        raise BabelError(f"no finished zoo run in {', '.join(map(str, sources))}; train first "
                         f"(python -m babel_lib.sparsing.zoo train --profile {profile or '<profile>'})")
    if dest is None and not profile:
        raise BabelError("zoo data made from a spec in code has no profile; pass dest= for the table")
    dest = dest or table_dir(profile)
    _write_rows(dest / "zoo.csv", rows)
    write_json(dest / "PROVENANCE.json", {
        "table": "zoo.csv", "profile": profile, "written": _iso(time.time()),
        "command": " ".join(command or sys.argv), "git": _git_commit(), "spec": meta["spec"],
        "machines": sorted({r["machine"]["device"] for r in records.values()}),
        "data": {"corpus_sha256": meta["corpus_sha256"], "tokenizer_sha256": meta["tokenizer_sha256"],
                 "vocab": meta["vocab"], "tokens": {k: v["tokens"] for k, v in meta["files"].items()}},
        "runs": {name: {k: r[k] for k in ("command", "machine", "started", "finished", "seconds", "eval_seconds",
                                          "code_sha256")} for name, r in records.items()},
        "missing_runs": missing})
    return dest / "zoo.csv", missing


def read_table(path: Path) -> list[dict[str, Any]]:
    """A zoo table (e.g. `table_path(profile)`) as typed rows: ints, floats, booleans, strings."""
    if not path.exists():
        raise BabelError(f"no zoo table at {path}; make it with `make zoo` (PROFILE=smoke for the toy family)")

    def typed(value: str) -> Any:
        if value in ("True", "False"):
            return value == "True"
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return value

    with open(path, newline="") as handle:
        return [{k: typed(v) for k, v in row.items()} for row in csv.DictReader(handle)]


# ------------------------------------------------------------------------------------------------------ CLI


def family_lines(spec: ZooSpec) -> list[str]:
    """One line per run: shape, parameters, tokens and expected H100 time (the cost model above)."""
    lines = [f"{'run':<16} {'axes':<11} {'d_ff':>5} {'w/d':>6} {'params':>11} {'tokens':>12} {'est. s':>7}"]
    total = 0.0
    for run in family(spec):
        seconds = estimated_seconds(run, spec)
        total += seconds
        lines.append(f"{run.name:<16} {';'.join(run.axes):<11} {run.d_ff:>5} {run.width_depth_ratio:>6.1f} "
                     f"{run.params:>11,} {spec.steps * spec.tokens_per_step:>12,} {seconds:>7.1f}")
    lines.append(f"total estimated H100 time {total:.0f}s; checkpoints at steps {checkpoint_steps(spec)}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """`python -m babel_lib.sparsing.zoo prepare|family|train|table --profile P [...]`."""
    parser = argparse.ArgumentParser(prog="python -m babel_lib.sparsing.zoo", description="Train the micro ReLU/SiLU model "
                                     "family on the corpus and tabulate its PPL-p% activation ratios.")
    parser.add_argument("command", choices=["prepare", "family", "train", "table"])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--data", type=Path, help="prepared data folder (default build/zoo-data/<profile>)")
    parser.add_argument("--force", action="store_true", help="prepare: rebuild even if up to date")
    parser.add_argument("--runs", help="train: comma-separated globs of run names, e.g. 'relu-*'")
    parser.add_argument("--jobs", type=int, default=1, help="train: runs trained at a time (processes)")
    parser.add_argument("--out", type=Path, help="train: folder for per-run rows (default build/<profile>/zoo/runs)")
    parser.add_argument("--from", dest="sources", type=Path, nargs="+",
                        help="table: folders holding per-run rows (default build/<profile>/zoo/runs)")
    args = parser.parse_args(argv)
    command = ["python", "-m", "babel_lib.sparsing.zoo", *(sys.argv[1:] if argv is None else argv)]
    directory = args.data or data_dir(args.profile)
    try:
        if args.command == "prepare":
            os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one core for the BPE trainer (same result)
            path = prepare(spec_from_profile(args.profile), directory, args.profile, args.force)
            meta = read_meta(path)
            print(f"zoo data: {path} ({sum(v['tokens'] for v in meta['files'].values()):,} tokens, "
                  f"vocab {meta['vocab']})")
        elif args.command == "family":
            print("\n".join(family_lines(spec_from_profile(args.profile))))
        elif args.command == "train":
            torch.set_num_threads(make_spec(read_meta(directory)["spec"]).threads)
            train(directory, args.out or runs_dir(args.profile), args.runs, args.jobs, command)
        else:
            path, missing = write_table(directory, args.sources or [runs_dir(args.profile)], command=command)
            print(f"zoo table: {path}" + (f"; missing runs: {', '.join(missing)}" if missing else ""))
    except BabelError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
