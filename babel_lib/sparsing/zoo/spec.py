"""The zoo's family: its settings (ZooSpec, the `zoo:` section of a profile), its runs (shapes x activations),
their sizes and checkpoint steps, and the expected cost of each run."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, fields
from typing import Any

from babel_lib.errors import BabelError

ACTIVATIONS = ("relu", "silu")
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
