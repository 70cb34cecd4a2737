"""The zoo's family: its settings (ZooSpec, the `zoo:` section of a profile), its runs (shapes x activations x
seeds), their sizes, data budget and checkpoint steps, and the expected cost of each run."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, fields
from typing import Any

from babel_lib.errors import BabelError

ACTIVATIONS = ("relu", "silu")
# Cost model of one job when `train --jobs J` runs J of them side by side on one GPU (a CPU core each), used to
# order the jobs and print expected times; fitted to the H100 run of the former family (PROVENANCE.json of
# 2026-11-23: 6 jobs, 2000 steps of 16k tokens, 12 checkpoints), not a measurement of this family. Micro models
# are launch-bound in Python: a training step cost each job ~8 ms per decoder layer plus ~5 ms (embedding, loss,
# optimizer) on top of its FLOPs at ~150 TFLOP/s (bf16), and the GPU stayed far from busy, so J jobs take about
# the time of the longest 1/J of the work. Evaluation (fp32): each CETT evaluation (thresholds from a dense pass,
# then a sparse pass, per layer an exact threshold search) cost ~20 ms per layer per 16k-token batch; a PPL-p%
# bisection takes ~12 of them. A run bisects every checkpoint on its own, then once on its last
# `fixed_c_checkpoints` together (each step evaluates all of them), then evaluates every checkpoint at that c.
EST_STEP_S = 5e-3
EST_LAYER_STEP_S = 8e-3
EST_FLOPS = 150e12
EST_LAYER_EVAL_S = 20e-3
EST_EVAL_TOKENS = 16384
EST_BISECTIONS = 12


@dataclass(frozen=True)
class ZooSpec:
    """The family and its training and evaluation settings: the `zoo:` section of a profile plus its seed.

    Shapes are [width, depth] pairs: `scale_shapes` keep one width/depth ratio across parameter scales,
    `ratio_shapes` keep about one parameter count across width/depth ratios (a shape may be on both axes); each
    shape trains with `seeds` seeds. `corpus` is "libreoffice" (the aligned help corpus, tokenised by `prepare`)
    or the folder, relative to the checkout, of a pretraining corpus's token shards (manifest.json).
    Schedule: linear warmup over the first `warmup` of the steps, then the constant peak `lr` to the end (the
    stable phase of the paper's WSD schedule; its decay would come after the last checkpoint, so it is not run).
    Every checkpoint lies in the stable phase. One epoch: a run reads each training window at most once, and
    sees at least `min_tokens_per_param` tokens per non-embedding parameter.
    """

    device: str
    corpus: str
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
    fixed_c_checkpoints: int  # the paper's protocol: c is bisected on the mean over this many last checkpoints
    lr: float
    warmup: float
    weight_decay: float
    grad_clip: float
    min_tokens_per_param: float
    eval_windows: int
    eval_batch: int
    ppl_p: float
    tol: float
    threads: int
    seeds: int
    seed: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def tokens(self) -> int:
        """Training tokens of every run (one epoch over steps x batch_size distinct windows)."""
        return self.steps * self.tokens_per_step

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.warmup * self.steps))


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
    seed: int  # the seed's index within its shape (0 .. seeds - 1)

    @property
    def width_depth_ratio(self) -> float:
        return self.width / self.depth

    @property
    def shape(self) -> str:
        """The shape's name, shared by both activations and every seed: "w128-d4"."""
        return f"w{self.width}-d{self.depth}"


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
    if values["corpus"] != "libreoffice" and not str(values["corpus"]).strip():
        raise BabelError("zoo corpus is empty; use 'libreoffice' or the folder of a pretraining corpus's shards")
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
    if spec.seeds < 1 or not 1 <= spec.fixed_c_checkpoints <= spec.checkpoints:
        raise BabelError(f"zoo seeds={spec.seeds}, fixed_c_checkpoints={spec.fixed_c_checkpoints}: need seeds >= 1 and "
                         f"1 <= fixed_c_checkpoints <= checkpoints ({spec.checkpoints})")
    checkpoint_steps(spec)
    starved = [f"{r.name} ({spec.tokens / r.params:.1f})" for r in family(spec)
               if spec.tokens < spec.min_tokens_per_param * r.params]
    if starved:
        raise BabelError(f"zoo runs see fewer than min_tokens_per_param={spec.min_tokens_per_param:g} tokens per "
                         f"parameter: {', '.join(starved[:4])}; raise steps or batch_size, or use smaller shapes")
    return spec


def ffn_width(width: int, multiple: int) -> int:
    """LLaMA's FFN width: 8/3 of the model width (gated FFN at ~4x compute), rounded up to `multiple`."""
    return multiple * math.ceil(8 * width / 3 / multiple)


def non_embedding_params(width: int, depth: int, d_ff: int) -> int:
    """Parameters outside the (tied) embedding: per layer q,k,v,o (width^2 each), gate, up, down, two RMSNorms."""
    return depth * (4 * width * width + 3 * width * d_ff + 2 * width) + width


def family(spec: ZooSpec) -> list[Run]:
    """Every run of the family: each distinct shape (scale axis first) with each activation and each seed."""
    shapes: dict[tuple[int, int], list[str]] = {}
    for axis, axis_shapes in (("scale", spec.scale_shapes), ("ratio", spec.ratio_shapes)):
        for shape in axis_shapes:
            shapes.setdefault(shape, []).append(axis)
    runs = []
    for activation in spec.activations:
        for (width, depth), axes in shapes.items():
            d_ff = ffn_width(width, spec.ffn_multiple)
            for seed in range(spec.seeds):
                runs.append(Run(f"{activation}-w{width}-d{depth}-s{seed}", activation, width, depth, d_ff,
                                width // spec.head_dim, non_embedding_params(width, depth, d_ff), tuple(axes), seed))
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
    """`checkpoints` steps log-spaced from `first_checkpoint` to `steps` (the last one ends the run), all in the
    stable phase (after the warmup)."""
    n, first, last = spec.checkpoints, spec.first_checkpoint, spec.steps
    if n < 2 or not spec.warmup_steps < first < last:
        raise BabelError(f"zoo checkpoints={n}, first_checkpoint={first}, steps={last}: need n >= 2 and "
                         f"warmup steps ({spec.warmup_steps}) < first_checkpoint < steps (checkpoints in the stable phase)")
    steps = sorted({round(first * (last / first) ** (k / (n - 1))) for k in range(n)})
    if len(steps) < n:
        raise BabelError(f"zoo: {n} log-spaced checkpoints between steps {first} and {last} collide; "
                         f"raise steps or lower first_checkpoint / checkpoints")
    return steps


def step_flops(run: Run, spec: ZooSpec, vocab: int) -> float:
    """Training FLOPs of one step: 6 x (non-embedding + LM-head parameters) per token, plus causal attention."""
    per_token = 6 * (run.params + vocab * run.width) + 6 * run.depth * spec.seq_len * run.width
    return per_token * spec.tokens_per_step


def estimated_seconds(run: Run, spec: ZooSpec) -> float:
    """Expected time of one job (training + the PPL-p% protocol) under the cost model above."""
    step = EST_STEP_S + run.depth * EST_LAYER_STEP_S + step_flops(run, spec, spec.vocab_size) / EST_FLOPS
    batches = math.ceil(spec.eval_windows / spec.eval_batch)
    evaluation = batches * run.depth * EST_LAYER_EVAL_S * max(1.0, spec.eval_batch * spec.seq_len / EST_EVAL_TOKENS)
    evaluations = (spec.checkpoints + spec.fixed_c_checkpoints) * EST_BISECTIONS + spec.checkpoints
    return spec.steps * step + evaluations * evaluation
