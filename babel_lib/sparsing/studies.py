"""Notebook 04's study of a model: PPL-p% on the full window set, CETT against top-k and FAT-ε on the Pareto curve
of the sweep set, per layer and (read from the same full-set run) per language, every number with a bootstrap
interval over windows. One call, cached under a key derived from every parameter, the model's fingerprint and
the corpus sha256 (`StudyParams.key`); the results' `findings()` are the sentences the notebook prints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from babel_lib.core import bootstrap
from babel_lib.core.artefacts import ArtefactStore
from babel_lib.core.batches import windows
from babel_lib.core.models import LoadedModel
from babel_lib.core.study import StudyParams, param
from babel_lib.errors import BabelError
from babel_lib.sparsing.sparsity import SparseEval, SparseEvaluator, ratio_gap

_CODE = ("babel_lib.sparsing.studies", "babel_lib.sparsing.sparsity", "babel_lib.core.batches",
         "babel_lib.core.evaluation", "babel_lib.core.hooks", "babel_lib.core.bootstrap")
BASELINES = ("topk", "fat")


@dataclass(frozen=True)
class EvalParams(StudyParams):
    """The evaluation text both studies share: held-out windows of `seq_len` tokens, `batch_size` per batch."""

    KIND: ClassVar[str] = "sparsity-evaluation"  # enters the studies' keys; no artefact of its own
    CODE: ClassVar[tuple[str, ...]] = ("babel_lib.core.batches",)

    seq_len: int = param(128, ge=2)  # tokens per evaluation window: perplexities compare only at this length
    paragraphs: int = param(40, ge=1)  # held-out paragraphs per language to cut windows from
    batch_size: int = param(4, ge=1)  # windows per batch; CETT thresholds are derived per batch


@dataclass(frozen=True)
class ParetoParams(StudyParams):
    """The Pareto study: its languages, the two window sets (a sweep set for every method's curve, the full set for
    PPL-p% and the per-language numbers), the PPL-p% search, the baseline sweeps and the bootstrap."""

    KIND: ClassVar[str] = "sparsity-pareto"
    CODE: ClassVar[tuple[str, ...]] = _CODE

    pareto_languages: tuple[str, ...] = ("en", "ru", "ja", "tr")  # the pooled set for Pareto curves and PPL-p%
    windows_per_language: int = param(5, ge=1)  # the full set: PPL-p%, per layer and per language
    sweep_windows: int = param(1, ge=1)  # the sweep set: the first windows of each language, every method's curve
    p: float = param(1.0, gt=0)  # PPL-p%: perplexity ratio target 1 + p/100
    tol: float = param(1e-3, gt=0)
    max_iter: int = param(12, ge=1)  # CETT evaluations of the search on the sweep set
    refine_iter: int = param(4, ge=1)  # CETT evaluations of the search on the full set, from the sweep set's c
    start: float = param(0.125, gt=0, le=1)  # the sweep set's first c
    cett_values: tuple[float, ...] = ()
    topk_ratios: tuple[float, ...] = (0.3, 0.5, 0.65, 0.8, 0.9, 0.95)
    fat_quantiles: tuple[float, ...] = (0.05, 0.1, 0.2, 0.35, 0.5, 0.7)
    keep_activations: bool = True  # keep the dense pass's h for the thresholds (memory: tokens x d_ff x layers)
    replicates: int = param(1000, ge=10)  # bootstrap resamples of windows for every interval

    def check(self) -> None:
        for name in ("topk_ratios", "fat_quantiles", "cett_values"):
            bad = [v for v in getattr(self, name) if not 0 < v <= 1]
            if bad:
                raise self.invalid(name, f"{bad} must lie in (0, 1]")
        if not self.pareto_languages:
            raise self.invalid("pareto_languages", "the list is empty")
        if self.sweep_windows > self.windows_per_language:
            raise self.invalid("sweep_windows", f"{self.sweep_windows} is more than windows_per_language "
                                                f"({self.windows_per_language}); the sweep set is part of the full set")


@dataclass(frozen=True)
class LanguageParams(StudyParams):
    """The per-language view of the full set at PPL-p%: the share below which a neuron counts as rare."""

    KIND: ClassVar[str] = "sparsity-languages"  # no artefact of its own: read from the Pareto study's full set
    CODE: ClassVar[tuple[str, ...]] = _CODE

    rare: float = param(0.01, gt=0, lt=1)  # a neuron kept on fewer than this share of tokens is "rare"


def eval_windows(lm: LoadedModel, texts: Mapping[str, Sequence[str]], languages: Sequence[str], per_language: int,
                 evaluation: EvalParams) -> torch.Tensor:
    """`per_language` windows of each language's first `paragraphs` held-out paragraphs, stacked [n, seq_len]."""
    missing = [lang for lang in languages if lang not in texts]
    if missing:
        raise BabelError(f"no held-out text for {missing}; load them with load_corpus(languages, split='heldout')")
    parts = []
    for lang in languages:
        cut = windows(lm.tokenizer, list(texts[lang])[: evaluation.paragraphs], evaluation.seq_len, per_language)
        if cut.shape[0] < per_language:
            raise BabelError(f"{lang}'s first {evaluation.paragraphs} held-out paragraphs give {cut.shape[0]} windows "
                             f"of {evaluation.seq_len} tokens, fewer than the {per_language} asked for; raise "
                             "`paragraphs` or lower `windows_per_language`")
        parts.append(cut)
    return torch.cat(parts)


# --- per-window sums and their bootstrap ----------------------------------------------------------------


@dataclass
class WindowSums:
    """Per-window sums of a window set under K evaluations, from which every ratio and its bootstrap follow.

    Resampling windows with replacement (the same resamples for every evaluation, so comparisons are paired)
    gives each statistic's replicates; thresholds stay as derived per batch.
    """

    dense: np.ndarray  # [n] dense NLL per window
    nll: np.ndarray  # [K, n] sparse NLL per window
    active: np.ndarray  # [K, n, L] kept (token, neuron) pairs per window and layer
    counted: np.ndarray  # [n] counted tokens per window
    widths: np.ndarray  # [L] d_ff per layer
    predicted: int  # predicted tokens per window

    def draws(self, replicates: int, seed: int = 0, windows: np.ndarray | None = None) -> np.ndarray:
        """Index rows [1 + replicates, m] of `windows` (default all): row 0 the windows themselves, then resamples."""
        pool = np.arange(len(self.dense)) if windows is None else np.asarray(windows)
        return np.vstack([pool, pool[bootstrap.resamples(len(pool), replicates, seed)]])

    @classmethod
    def of(cls, evaluator: SparseEvaluator, runs: Sequence[SparseEval]) -> WindowSums:
        """The per-window sums of `runs` on the evaluator's windows."""
        return cls(evaluator.dense_window_nll.numpy(), torch.stack([r.window_nll for r in runs]).numpy(),
                   torch.stack([r.window_active for r in runs]).numpy(), evaluator.window_counted.numpy(),
                   np.array([f.width for f in evaluator.layers]), evaluator.windows.shape[1] - 1)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The arrays as tensors for an artefact (see `load`)."""
        return {f"{prefix}_{k}": torch.as_tensor(np.asarray(getattr(self, k)))
                for k in ("dense", "nll", "active", "counted", "widths")}

    @classmethod
    def load(cls, tensors: Mapping[str, torch.Tensor], prefix: str, predicted: int) -> WindowSums:
        return cls(*(tensors[f"{prefix}_{k}"].numpy() for k in ("dense", "nll", "active", "counted", "widths")),
                   predicted)

    def ppl_ratio(self, index: np.ndarray) -> np.ndarray:
        """[K, rows] perplexity ratio of each evaluation on each index row [rows, m] of windows."""
        diff = self.nll[:, index].sum(-1) - self.dense[index].sum(-1)
        return np.exp(diff / (self.predicted * index.shape[-1]))

    def layer_ratio(self, index: np.ndarray) -> np.ndarray:
        """[K, rows, L] activation ratio per layer."""
        return self.active[:, index].sum(2) / (self.counted[index].sum(-1)[None, :, None] * self.widths)

    def activation_ratio(self, index: np.ndarray) -> np.ndarray:
        """[K, rows] model-level activation ratio (the unweighted mean over layers)."""
        return self.layer_ratio(index).mean(-1)


def _band(values: np.ndarray) -> tuple[float, float]:
    """The 95 % percentile interval of replicate values (row 0, the sample itself, left out)."""
    return bootstrap.interval(values[1:])


def at_target(ratios: np.ndarray, values: np.ndarray, target: float, slope: float = 0.0) -> np.ndarray:
    """Per column (a replicate), `values` at the perplexity ratio `target`, on the line through the closest
    evaluation at or below the target and the closest above it (or, where all lie on one side, the two closest:
    an extrapolation); the closest one alone where their ratios tie. ratios, values: [K, rows] over K evaluations.
    With one evaluation, the line through it with `slope` (d value / d ratio, e.g. from another window set).
    """
    if ratios.shape[0] == 1:
        return values[0] + slope * (target - ratios[0])
    distance = np.abs(ratios - target)
    below = ratios <= target
    cols = np.arange(ratios.shape[1])
    order = np.argsort(distance, axis=0)
    lower = np.argmin(np.where(below, distance, np.inf), axis=0)
    upper = np.argmin(np.where(below, np.inf, distance), axis=0)
    both = below.any(axis=0) & (~below).any(axis=0)
    first, second = np.where(both, lower, order[0]), np.where(both, upper, order[1])
    r1, r2 = ratios[first, cols], ratios[second, cols]
    v1, v2 = values[first, cols], values[second, cols]
    same = np.isclose(r1, r2, rtol=0, atol=1e-12)
    slope = np.where(same, 0.0, (v2 - v1) / np.where(same, 1.0, r2 - r1))
    return v1 + slope * (target - r1)


# --- the Pareto study ----------------------------------------------------------------------------------


@dataclass
class ParetoResult:
    """PPL-p% on the full set (with bootstrap intervals), the Pareto points of every method on the sweep set, and
    the per-window sums behind them. Intervals: 95 % percentile bootstrap over windows."""

    model: str
    p: float
    tol: float
    cett: float  # the full set's PPL-p% CETT value (the closest one visited if the search did not converge)
    ppl_ratio: float  # the full set's perplexity ratio at that c
    converged: bool
    evaluations: int  # CETT evaluations on the full set
    sweep_evaluations: int  # CETT evaluations of the search on the sweep set
    dense_loss: float  # full set
    points: pd.DataFrame  # sweep set: method, value (one row per evaluation, in the order of `sweep`)
    full: WindowSums  # the full set under each of its CETT evaluations (in `full_cett` order)
    full_cett: list[float]
    sweep: WindowSums  # the sweep set under each evaluation of `points`
    languages: list[str]  # the full set's window groups, in order
    frequency: np.ndarray  # [languages, layers, d_ff] neuron activation frequency at the PPL-p% c
    thresholds: np.ndarray  # [n_layers] per-batch thresholds at the PPL-p% c, averaged over batches
    replicates: int

    def __post_init__(self) -> None:
        target = 1 + self.p / 100
        self.best = self.full_cett.index(self.cett)  # the reported evaluation among the full set's
        sweep_draws = self.sweep.draws(self.replicates)
        self._sweep_ratio, self._sweep_act = self.sweep.ppl_ratio(sweep_draws), self.sweep.activation_ratio(sweep_draws)
        draws = self.full.draws(self.replicates)
        ratios, acts = self.full.ppl_ratio(draws), self.full.activation_ratio(draws)
        self.activation_ratio = float(acts[self.best, 0])
        # where PPL-p% lies moves with the resampled windows: one full-set evaluation borrows the sweep set's slope
        acts_at = at_target(ratios, acts, target, self.sweep_slope())
        self.activation_ci = _band(np.clip(acts_at, 0.0, 1.0))  # extrapolations stay ratios
        self.ppl_ci = _band(ratios[self.best])
        layers = self.full.layer_ratio(draws)[self.best]  # [rows, L]
        self.layer_ratio, self.layer_ci = layers[0], np.percentile(layers[1:], [2.5, 97.5], axis=0).T
        self.points = self.points.assign(activation_ratio=self._sweep_act[:, 0], ppl_ratio=self._sweep_ratio[:, 0])
        for name, values in (("activation", self._sweep_act), ("ppl", self._sweep_ratio)):
            bands = np.array([_band(v) for v in values])
            self.points[f"{name}_lo"], self.points[f"{name}_hi"] = bands[:, 0], bands[:, 1]
        self.points["perplexity"] = self.points["ppl_ratio"] * math.exp(self.sweep_dense_loss)

    def sweep_slope(self) -> float:
        """d activation ratio / d perplexity ratio of CETT on the sweep set, between its two evaluations closest to
        the target (0 with fewer than two)."""
        cett = (self.points["method"] == "cett").to_numpy()
        ratios, acts = self._sweep_ratio[cett, 0], self._sweep_act[cett, 0]
        near = _closest_two(ratios, 1 + self.p / 100)
        if near is None or ratios[near[0]] == ratios[near[1]]:
            return 0.0
        (r1, r2), (a1, a2) = ratios[near], acts[near]
        return float((a2 - a1) / (r2 - r1))

    @property
    def tokens(self) -> int:
        """Predicted tokens of the full set."""
        return self.full.predicted * len(self.full.dense)

    @property
    def sweep_tokens(self) -> int:
        return self.sweep.predicted * len(self.sweep.dense)

    @property
    def sweep_dense_loss(self) -> float:
        return float(self.sweep.dense.sum()) / self.sweep_tokens

    @property
    def dense_perplexity(self) -> float:
        return math.exp(self.dense_loss)

    @property
    def perplexity(self) -> float:
        """The sparse perplexity at the PPL-p% point (full set)."""
        return self.ppl_ratio * self.dense_perplexity

    def comparison(self, method: str) -> tuple[float, float, float] | None:
        """On the sweep set: `method`'s perplexity ratio interpolated at CETT's PPL-p% activation ratio, over
        CETT's perplexity ratio there (1 + p/100), with its interval; None where the sweep does not reach."""
        target = 1 + self.p / 100
        cett = (self.points["method"] == "cett").to_numpy()
        base = (self.points["method"] == method).to_numpy()
        if base.sum() < 2:
            return None
        at = at_target(self._sweep_ratio[cett], self._sweep_act[cett], target)  # [rows]
        acts, ratios = self._sweep_act[base], self._sweep_ratio[base]
        values = []
        for row, a in enumerate(at):
            order = np.argsort(acts[:, row])
            x, y = acts[order, row], ratios[order, row]
            values.append(np.interp(a, x, y) / target if x[0] <= a <= x[-1] else np.nan)
        values = np.array(values)
        if np.isnan(values[0]):
            return None
        low, high = _band(values)
        return float(values[0]), low, high

    def warning(self) -> str | None:
        """A visible warning when the full set's PPL-p% search did not reach its target."""
        if self.converged:
            return None
        return (f"WARNING {self.model}: the PPL-{self.p:g}% search did not converge in {self.evaluations} evaluations "
                f"on the full set: the closest perplexity ratio is {self.ppl_ratio:.4f} (target {1 + self.p / 100:g} "
                f"± {self.tol:g}); every number at PPL-{self.p:g}% below is at that closest c = {self.cett:.4f}.")

    def summary(self) -> dict[str, float | bool | int | str]:
        """The PPL-p% point in one row."""
        lo, hi = self.activation_ci
        return {"PPL-p% CETT value c": self.cett, "activation ratio": self.activation_ratio,
                "activation ratio 95% CI": f"[{lo:.3f}, {hi:.3f}]", "perplexity ratio": self.ppl_ratio,
                "converged": self.converged, "dense perplexity": self.dense_perplexity,
                "predicted tokens": self.tokens, "windows": len(self.full.dense),
                "search evaluations (sweep set + full set)": f"{self.sweep_evaluations} + {self.evaluations}"}

    def findings(self) -> list[str]:
        """The non-convergence warning (if any), PPL-p% with its interval, and CETT against the baselines."""
        parts = []
        for method in BASELINES:
            cmp = self.comparison(method)
            parts.append(f"{method}: its sweep does not reach that activation ratio" if cmp is None
                         else f"{method} {cmp[0]:.3f}x [{cmp[1]:.3f}, {cmp[2]:.3f}]")
        lo, hi = self.activation_ci
        warning = self.warning()
        return ([warning] if warning else []) + [
            f"{self.model}: PPL-{self.p:g}% at c = {self.cett:.4f} keeps the perplexity at {self.perplexity:.2f} "
            f"(dense {self.dense_perplexity:.2f}, ratio {self.ppl_ratio:.4f}) with an activation ratio of "
            f"{self.activation_ratio:.3f} (95% CI {lo:.3f}-{hi:.3f}, {self.tokens:,} predicted tokens). On the sweep "
            f"set ({self.sweep_tokens:,} tokens), each baseline's perplexity at CETT's PPL-{self.p:g}% activation "
            "ratio over CETT's: " + ", ".join(parts) + "."]

    def layer_findings(self) -> list[str]:
        """The range of the per-layer activation ratio at PPL-p%."""
        ratio, ci = self.layer_ratio, self.layer_ci
        low, high = int(ratio.argmin()), int(ratio.argmax())
        return [f"{self.model}: per-layer activation ratio from {ratio[low]:.3f} (layer {low}, CI {ci[low, 0]:.3f}-"
                f"{ci[low, 1]:.3f}) to {ratio[high]:.3f} (layer {high}, CI {ci[high, 0]:.3f}-{ci[high, 1]:.3f}); "
                f"model-level {self.activation_ratio:.3f}."]


def search_slope(trace: Sequence[Mapping[str, float]], target: float) -> float | None:
    """d ratio_gap / d(log2 c) between the two visited c whose ratios lie closest to the target."""
    near = _closest_two(np.array([t["ppl_ratio"] for t in trace]), target)
    if near is None or trace[near[0]]["cett"] == trace[near[1]]["cett"]:
        return None
    (a, b) = (trace[i] for i in near)
    dx = math.log2(b["cett"]) - math.log2(a["cett"])
    return (ratio_gap(b["ppl_ratio"], target) - ratio_gap(a["ppl_ratio"], target)) / dx


def _closest_two(ratios: np.ndarray, target: float) -> np.ndarray | None:
    """Indices of the two perplexity ratios closest to the target (the first closest; stable), None with fewer."""
    return np.argsort(np.abs(ratios - target), kind="stable")[:2] if len(ratios) >= 2 else None


def pareto(store: ArtefactStore, lm: LoadedModel, params: ParetoParams, evaluation: EvalParams,
           texts: Mapping[str, Sequence[str]], corpus: str) -> ParetoResult:
    """PPL-p% of `lm` on the full set (`windows_per_language` held-out windows of each of `pareto_languages`,
    batched within a language), and every method's Pareto points on the sweep set (the first `sweep_windows` of
    each language). The sweep set's search gives the full set's first c and step, so the full set needs few
    evaluations; one dense pass per set serves every evaluation. `texts`: held-out paragraphs per language,
    `corpus`: their sha256 (part of the key)."""
    key = params.key(model=lm.name, fingerprint=lm.fingerprint, corpus_sha256=corpus, evaluation=evaluation.as_dict())
    langs = list(params.pareto_languages)

    def compute():
        full_ids = eval_windows(lm, texts, langs, params.windows_per_language, evaluation)
        sweep_ids = full_ids.view(len(langs), params.windows_per_language, -1)[:, : params.sweep_windows].reshape(
            -1, full_ids.shape[1])
        target = 1 + params.p / 100
        sweep = SparseEvaluator(lm, sweep_ids, batch_size=evaluation.batch_size, keep_activations=params.keep_activations)
        found = sweep.ppl_p(params.p, params.tol, max_iter=params.max_iter, start=params.start)
        eps = sweep.score_quantiles(params.fat_quantiles).tolist()
        runs, points = list(found.runs), [("cett", t["cett"]) for t in found.trace]
        for method, value in [("cett", c) for c in params.cett_values] + \
                [("topk", r) for r in params.topk_ratios] + [("fat", e) for e in eps]:
            runs.append(sweep.evaluate(method, value))
            points.append((method, value))
        full = SparseEvaluator(lm, full_ids, batch_size=evaluation.batch_size, keep_activations=params.keep_activations,
                               groups=[params.windows_per_language] * len(langs))
        final = full.ppl_p(params.p, params.tol, max_iter=params.refine_iter, start=found.cett, step=1.0,
                           slope=search_slope(found.trace, target))
        best = final.runs[[t["cett"] for t in final.trace].index(final.cett)]
        tensors = WindowSums.of(full, final.runs).tensors("full") | WindowSums.of(sweep, runs).tensors("sweep")
        tensors |= {"frequency": torch.stack([torch.stack(g) for g in best.group_frequency]),
                    "thresholds": final.thresholds}
        meta = {"points": points, "full_cett": [t["cett"] for t in final.trace], "cett": final.cett,
                "ppl_ratio": final.ppl_ratio, "converged": final.converged, "dense_loss": final.dense_loss,
                "sweep_evaluations": len(found.trace), "predicted": full_ids.shape[1] - 1}
        return tensors, meta

    tensors, meta = store.cached(params.KIND, key, compute)
    return ParetoResult(model=lm.name, p=params.p, tol=params.tol, cett=meta["cett"], ppl_ratio=meta["ppl_ratio"],
                        converged=meta["converged"], evaluations=len(meta["full_cett"]),
                        sweep_evaluations=meta["sweep_evaluations"], dense_loss=meta["dense_loss"],
                        points=pd.DataFrame(meta["points"], columns=["method", "value"]),
                        full=WindowSums.load(tensors, "full", meta["predicted"]), full_cett=meta["full_cett"],
                        sweep=WindowSums.load(tensors, "sweep", meta["predicted"]), languages=langs,
                        frequency=tensors["frequency"].numpy(), thresholds=tensors["thresholds"].numpy(),
                        replicates=params.replicates)


# --- the per-language study ----------------------------------------------------------------------------


@dataclass
class LanguageResult:
    """Activation ratio, perplexity ratio and per-neuron activation frequency per language at one CETT value."""

    model: str
    cett: float
    target: float | None  # the perplexity ratio the CETT value was chosen for (pooled PPL-p%), if any
    rare: float
    table: pd.DataFrame  # language, activation_ratio (_lo, _hi), ppl_ratio (ppl_lo, ppl_hi), dense_perplexity, windows
    frequency: np.ndarray  # [languages, layers, d_ff]: share of the language's tokens on which a neuron is kept

    def frequencies(self) -> dict[str, np.ndarray]:
        """Per language, every neuron's activation frequency (all layers) as one flat array."""
        return {lang: self.frequency[i].ravel() for i, lang in enumerate(self.table["language"])}

    def rare_shares(self) -> dict[str, float]:
        """Per language, the share of neurons kept on fewer than `rare` of its tokens."""
        return {lang: float((f < self.rare).mean()) for lang, f in self.frequencies().items()}

    def findings(self) -> list[str]:
        """The ranges of the activation ratio and the perplexity ratio over languages."""
        g = self.table.set_index("language")
        a, r = g["activation_ratio"], g["ppl_ratio"]
        target = "" if self.target is None else f" against the pooled target {self.target:g}"
        low, high = a.idxmin(), a.idxmax()
        apart = g.loc[low, "activation_hi"] < g.loc[high, "activation_lo"]
        below = list(g.index[g["ppl_hi"] < 1])
        return [f"{self.model} at c = {self.cett:.4f} ({int(g['windows'].iloc[0])} windows per language): activation "
                f"ratio from {a.min():.3f} ({low}, CI {g.loc[low, 'activation_lo']:.3f}-{g.loc[low, 'activation_hi']:.3f}) "
                f"to {a.max():.3f} ({high}, CI {g.loc[high, 'activation_lo']:.3f}-{g.loc[high, 'activation_hi']:.3f}); "
                f"the extremes' intervals {'do not overlap' if apart else 'overlap'}. Perplexity ratio from "
                f"{r.min():.4f} ({r.idxmin()}) to {r.max():.4f} ({r.idxmax()}){target}; "
                + (f"below 1 with its whole interval in {', '.join(below)}." if below
                   else "no language's interval lies wholly below 1.")]

    def frequency_findings(self) -> list[str]:
        """The range over languages of the share of rare neurons."""
        rare = self.rare_shares()
        low, high = min(rare, key=rare.get), max(rare, key=rare.get)
        return [f"{self.model}: the share of neurons kept on fewer than {self.rare:.0%} of tokens ranges from "
                f"{rare[low]:.1%} ({low}) to {rare[high]:.1%} ({high})."]


def by_language(result: ParetoResult, params: LanguageParams) -> LanguageResult:
    """Per language, its windows of the full set at the PPL-p% c (thresholds derived per batch, and batches never
    mix languages): activation ratio and perplexity ratio with bootstrap intervals over the language's windows,
    and neuron activation frequencies. No forward of its own: these are the full set's per-window sums."""
    full, rows = result.full, []
    per = len(full.dense) // len(result.languages)
    for g, lang in enumerate(result.languages):
        draws = full.draws(result.replicates, seed=g, windows=np.arange(g * per, (g + 1) * per))
        ratio, act = full.ppl_ratio(draws)[result.best], full.activation_ratio(draws)[result.best]
        (a_lo, a_hi), (r_lo, r_hi) = _band(act), _band(ratio)
        dense = math.exp(full.dense[draws[0]].sum() / (full.predicted * per))
        rows.append({"language": lang, "activation_ratio": act[0], "activation_lo": a_lo, "activation_hi": a_hi,
                     "ppl_ratio": ratio[0], "ppl_lo": r_lo, "ppl_hi": r_hi, "dense_perplexity": dense, "windows": per})
    return LanguageResult(model=result.model, cett=result.cett, target=1 + result.p / 100, rare=params.rare,
                          table=pd.DataFrame(rows), frequency=result.frequency)


def language_table(results: Sequence[LanguageResult]) -> pd.DataFrame:
    """Activation ratio and perplexity ratio per language (rows) and model (columns)."""
    rows = pd.concat([r.table.assign(model=r.model) for r in results])
    return rows.pivot(index="language", columns="model", values=["activation_ratio", "ppl_ratio"])
