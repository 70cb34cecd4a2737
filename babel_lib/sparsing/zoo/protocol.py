"""Sparsing Law's checkpoint protocol on a run's saved checkpoint series: one CETT value c, bisected so that the
mean perplexity ratio over the last `fixed_c_checkpoints` checkpoints is 1 + p/100, then applied to every
checkpoint; beside it, each checkpoint's own PPL-p% bisection (the variant the zoo used before), so the effect
of the protocol is itself a result.

Why both: an early checkpoint uses its FFN little, so its own bisection lands at a large c and a low activation
ratio; the paper's single c measures every checkpoint at the same tolerance for skipped-neuron error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from babel_lib.errors import BabelError
from babel_lib.sparsing.sparsity import SparseEvaluator


@dataclass(frozen=True)
class SharedCett:
    """The one c of a run: the mean perplexity ratio it gives on the checkpoints it was bisected on."""

    cett: float
    mean_ratio: float
    converged: bool  # mean_ratio is within tol of 1 + p/100
    bisections: int
    steps: tuple[int, ...]  # the checkpoints c was bisected on


def shared_cett(evaluators: Sequence[SparseEvaluator], steps: Sequence[int], p: float, tol: float,
                max_iter: int = 30) -> SharedCett:
    """Bisect c in [0, 1] until the mean over `evaluators` of exp(L_sparse(c) − L_dense) is within `tol` of
    1 + p/100 (thresholds re-derived per batch at each c); the closest c visited if it never gets there."""
    if not evaluators or len(evaluators) != len(steps):
        raise BabelError(f"the shared CETT value needs one evaluator per checkpoint (got {len(evaluators)} for "
                         f"{len(steps)} steps)")
    target, lo, hi = 1.0 + p / 100.0, 0.0, 1.0
    best: tuple[float, float] | None = None
    for i in range(1, max_iter + 1):
        c = (lo + hi) / 2
        ratio = sum(e.ratio(e.evaluate("cett", c)) for e in evaluators) / len(evaluators)
        if best is None or abs(ratio - target) < abs(best[1] - target):
            best = (c, ratio)
        if abs(ratio - target) <= tol:
            break
        lo, hi = (c, hi) if ratio < target else (lo, c)
    return SharedCett(best[0], best[1], abs(best[1] - target) <= tol, i, tuple(steps))


def at_cett(evaluator: SparseEvaluator, c: float) -> dict[str, float]:
    """A checkpoint at the CETT value c: activation ratio, sparse loss and perplexity ratio."""
    run = evaluator.evaluate("cett", c)
    return {"cett": c, "activation_ratio": run.activation_ratio, "sparse_loss": run.loss.mean,
            "ppl_ratio": evaluator.ratio(run)}


def own_cett(evaluator: SparseEvaluator, p: float, tol: float) -> dict[str, float | bool | int]:
    """A checkpoint's own PPL-p% bisection (the per-checkpoint variant), as `own_*` columns."""
    result = evaluator.ppl_p(p, tol)
    return {"own_cett": result.cett, "own_activation_ratio": result.activation_ratio,
            "own_ppl_ratio": result.ppl_ratio, "own_converged": result.converged, "own_bisections": len(result.trace)}


def measure_series(models: Sequence[tuple[int, nn.Module]], windows: torch.Tensor, p: float, tol: float,
                   fixed_last: int, batch_size: int) -> tuple[list[dict], SharedCett]:
    """The protocol on a run's checkpoints [(step, model), ...] in step order: per checkpoint its dense loss, the
    shared c's numbers and its own c's numbers (one dict per checkpoint), and the shared c."""
    steps = [s for s, _ in models]
    if steps != sorted(steps) or len(set(steps)) != len(steps):
        raise BabelError(f"checkpoint steps {steps} must be distinct and in training order")
    evaluators = [SparseEvaluator(m, windows, batch_size=batch_size) for _, m in models]
    shared = shared_cett(evaluators[-fixed_last:], steps[-fixed_last:], p, tol)
    points = []
    for step, evaluator in zip(steps, evaluators):
        fixed = at_cett(evaluator, shared.cett)
        points.append({"step": step, "dense_loss": evaluator.dense.mean, **fixed,
                       "cett_converged": shared.converged, "in_fixed_c": step in shared.steps,
                       **own_cett(evaluator, p, tol)})
    return points, shared

