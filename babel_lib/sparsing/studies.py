"""Notebook 04's studies of a model: CETT against top-k and FAT-ε on the Pareto curve (with PPL-p%), and
sparsity per language at one CETT value. One call each, cached under a key derived from every parameter, the
model's fingerprint and the corpus sha256 (`StudyParams.key`); each returns a result whose `findings()` are
the sentences the notebook prints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from babel_lib.core.artefacts import ArtefactStore
from babel_lib.core.batches import windows
from babel_lib.core.models import LoadedModel
from babel_lib.core.study import StudyParams, param
from babel_lib.errors import BabelError
from babel_lib.sparsing.sparsity import PPLpResult, SparseEvaluator, score_quantiles

_CODE = ("babel_lib.sparsing.studies", "babel_lib.sparsing.sparsity", "babel_lib.core.batches",
         "babel_lib.core.evaluation", "babel_lib.core.hooks")
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
    """The Pareto study: the pooled evaluation languages, the PPL-p% bisection and the baseline sweeps."""

    KIND: ClassVar[str] = "sparsity-pareto"
    CODE: ClassVar[tuple[str, ...]] = _CODE

    pareto_languages: tuple[str, ...] = ("en", "ru", "ja", "tr")  # the pooled set for Pareto curves and PPL-p%
    windows_per_language: int = param(1, ge=1)
    p: float = param(1.0, gt=0)  # PPL-p%: perplexity ratio target 1 + p/100
    tol: float = param(1e-3, gt=0)
    max_iter: int = param(12, ge=1)
    cett_values: tuple[float, ...] = ()
    topk_ratios: tuple[float, ...] = (0.3, 0.5, 0.65, 0.8, 0.9, 0.95)
    fat_quantiles: tuple[float, ...] = (0.05, 0.1, 0.2, 0.35, 0.5, 0.7)

    def check(self) -> None:
        for name in ("topk_ratios", "fat_quantiles", "cett_values"):
            bad = [v for v in getattr(self, name) if not 0 < v <= 1]
            if bad:
                raise self.invalid(name, f"{bad} must lie in (0, 1]")
        if not self.pareto_languages:
            raise self.invalid("pareto_languages", "the list is empty")


@dataclass(frozen=True)
class LanguageParams(StudyParams):
    """The per-language study: windows per language, and the share below which a neuron counts as rare."""

    KIND: ClassVar[str] = "sparsity-languages"
    CODE: ClassVar[tuple[str, ...]] = _CODE

    language_windows: int = param(1, ge=1)  # held-out windows per language for the per-language analysis
    rare: float = param(0.01, gt=0, lt=1)  # a neuron kept on fewer than this share of tokens is "rare"


def eval_windows(lm: LoadedModel, texts: Mapping[str, Sequence[str]], languages: Sequence[str], per_language: int,
                 evaluation: EvalParams) -> torch.Tensor:
    """`per_language` windows of each language's first `paragraphs` held-out paragraphs, stacked [n, seq_len]."""
    missing = [lang for lang in languages if lang not in texts]
    if missing:
        raise BabelError(f"no held-out text for {missing}; load them with load_corpus(languages, split='heldout')")
    return torch.cat([windows(lm.tokenizer, list(texts[lang])[: evaluation.paragraphs], evaluation.seq_len,
                              per_language) for lang in languages])


# --- the Pareto study ----------------------------------------------------------------------------------


@dataclass
class ParetoResult:
    """PPL-p% and the Pareto points (every method's activation ratio and perplexity ratio) of one model."""

    model: str
    p: float
    tol: float
    cett: float  # the PPL-p% CETT value (the closest one visited if the bisection did not converge)
    activation_ratio: float
    ppl_ratio: float
    converged: bool
    bisections: int
    dense_loss: float
    tokens: int  # predicted tokens in the loss
    points: pd.DataFrame  # method, value, activation_ratio, ppl_ratio, perplexity
    layer_ratio: np.ndarray  # [n_layers] activation ratio per layer at PPL-p%
    thresholds: np.ndarray  # [n_layers] per-batch thresholds averaged over batches

    @property
    def dense_perplexity(self) -> float:
        return math.exp(self.dense_loss)

    @property
    def perplexity(self) -> float:
        """The sparse perplexity at the PPL-p% point."""
        return self.ppl_ratio * self.dense_perplexity

    def at_cett_ratio(self, method: str) -> float | None:
        """`method`'s perplexity interpolated at CETT's PPL-p% activation ratio; None where its sweep does not reach."""
        base = self.points[self.points["method"] == method].sort_values("activation_ratio")
        if base.empty or not base["activation_ratio"].min() <= self.activation_ratio <= base["activation_ratio"].max():
            return None
        return float(np.interp(self.activation_ratio, base["activation_ratio"], base["perplexity"]))

    def warning(self) -> str | None:
        """A visible warning when the PPL-p% bisection did not reach its target."""
        if self.converged:
            return None
        return (f"WARNING {self.model}: the PPL-{self.p:g}% bisection did not converge in {self.bisections} steps: "
                f"the closest perplexity ratio is {self.ppl_ratio:.4f} (target {1 + self.p / 100:g} ± {self.tol:g}); "
                f"every number at PPL-{self.p:g}% below is at that closest c = {self.cett:.4f}.")

    def summary(self) -> dict[str, float | bool | int]:
        """The PPL-p% point in one row."""
        return {"PPL-p% CETT value c": self.cett, "activation ratio": self.activation_ratio,
                "perplexity ratio": self.ppl_ratio, "converged": self.converged,
                "dense perplexity": self.dense_perplexity, "predicted tokens": self.tokens}

    def findings(self) -> list[str]:
        """The non-convergence warning (if any) and CETT against the baselines at CETT's activation ratio."""
        parts = []
        for method in BASELINES:
            at = self.at_cett_ratio(method)
            parts.append(f"{method}: its sweep does not reach that activation ratio" if at is None
                         else f"{method} {at:.2f} ({at / self.perplexity:.2f}x)")
        warning = self.warning()
        return ([warning] if warning else []) + [
            f"{self.model}: CETT keeps the perplexity at {self.perplexity:.2f} (dense {self.dense_perplexity:.2f}) "
            f"with an activation ratio of {self.activation_ratio:.3f}; at the same activation ratio (interpolated): "
            + ", ".join(parts) + "."]

    def layer_findings(self) -> list[str]:
        """The range of the per-layer activation ratio at PPL-p%."""
        ratio = self.layer_ratio
        return [f"{self.model}: per-layer activation ratio from {ratio.min():.3f} (layer {int(ratio.argmin())}) to "
                f"{ratio.max():.3f} (layer {int(ratio.argmax())}); model-level {self.activation_ratio:.3f}."]


def _pareto_points(evaluator: SparseEvaluator, lm: LoadedModel, ids: torch.Tensor, params: ParetoParams,
                   batch_size: int) -> tuple[PPLpResult, list[dict]]:
    """The PPL-p% bisection (its visited c values are CETT's points) and the sweeps of every method."""
    found = evaluator.ppl_p(params.p, params.tol, max_iter=params.max_iter)
    points = [{"method": "cett", "value": t["cett"], "activation_ratio": t["activation_ratio"],
               "ppl_ratio": t["ppl_ratio"]} for t in found.trace]
    eps = score_quantiles(lm, ids, params.fat_quantiles, batch_size=batch_size).tolist()
    sweeps = [("cett", c) for c in params.cett_values] + [("topk", r) for r in params.topk_ratios] + \
        [("fat", e) for e in eps]
    for method, value in sweeps:
        run = evaluator.evaluate(method, value)
        points.append({"method": method, "value": value, "activation_ratio": run.activation_ratio,
                       "ppl_ratio": evaluator.ratio(run)})
    return found, points


def pareto(store: ArtefactStore, lm: LoadedModel, params: ParetoParams, evaluation: EvalParams,
           texts: Mapping[str, Sequence[str]], corpus: str) -> ParetoResult:
    """PPL-p% of `lm` on the pooled held-out windows of `params.pareto_languages`, and every method's Pareto
    points there; `texts`: held-out paragraphs per language, `corpus`: their sha256 (part of the key)."""
    key = params.key(model=lm.name, fingerprint=lm.fingerprint, corpus_sha256=corpus, evaluation=evaluation.as_dict())

    def compute():
        ids = eval_windows(lm, texts, params.pareto_languages, params.windows_per_language, evaluation)
        evaluator = SparseEvaluator(lm, ids, batch_size=evaluation.batch_size)
        found, points = _pareto_points(evaluator, lm, ids, params, evaluation.batch_size)
        meta = {"points": points, "cett": found.cett, "activation_ratio": found.activation_ratio,
                "ppl_ratio": found.ppl_ratio, "dense_loss": found.dense_loss, "converged": found.converged,
                "tokens": found.tokens, "bisections": len(found.trace)}
        return {"layer_sparsity": found.layer_sparsity, "thresholds": found.thresholds}, meta

    tensors, meta = store.cached(params.KIND, key, compute)
    points = pd.DataFrame(meta["points"])
    points["perplexity"] = points["ppl_ratio"] * math.exp(meta["dense_loss"])
    return ParetoResult(model=lm.name, p=params.p, tol=params.tol, cett=meta["cett"],
                        activation_ratio=meta["activation_ratio"], ppl_ratio=meta["ppl_ratio"],
                        converged=meta["converged"], bisections=meta["bisections"], dense_loss=meta["dense_loss"],
                        tokens=meta["tokens"], points=points, layer_ratio=(1 - tensors["layer_sparsity"]).numpy(),
                        thresholds=tensors["thresholds"].numpy())


# --- the per-language study ----------------------------------------------------------------------------


@dataclass
class LanguageResult:
    """Activation ratio, perplexity ratio and per-neuron activation frequency per language at one CETT value."""

    model: str
    cett: float
    target: float | None  # the perplexity ratio the CETT value was chosen for (pooled PPL-p%), if any
    rare: float
    table: pd.DataFrame  # language, activation_ratio, ppl_ratio, dense_perplexity
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
        return [f"{self.model} at c = {self.cett:.4f}: activation ratio from {a.min():.3f} ({a.idxmin()}) to "
                f"{a.max():.3f} ({a.idxmax()}); perplexity ratio from {r.min():.4f} ({r.idxmin()}) to "
                f"{r.max():.4f} ({r.idxmax()}){target}."]

    def frequency_findings(self) -> list[str]:
        """The range over languages of the share of rare neurons."""
        rare = self.rare_shares()
        low, high = min(rare, key=rare.get), max(rare, key=rare.get)
        return [f"{self.model}: the share of neurons kept on fewer than {self.rare:.0%} of tokens ranges from "
                f"{rare[low]:.1%} ({low}) to {rare[high]:.1%} ({high})."]


def by_language(store: ArtefactStore, lm: LoadedModel, params: LanguageParams, evaluation: EvalParams,
                texts: Mapping[str, Sequence[str]], corpus: str, cett: float,
                target: float | None = None) -> LanguageResult:
    """Per language of `texts`, thresholds re-derived on its own windows at CETT value `cett` (per batch, as
    always): its activation ratio, perplexity ratio and neuron activation frequencies."""
    languages = list(texts)
    key = params.key(model=lm.name, fingerprint=lm.fingerprint, corpus_sha256=corpus, languages=languages,
                     cett=cett, evaluation=evaluation.as_dict())

    def compute():
        rows, frequency = [], []
        for lang in languages:
            ids = eval_windows(lm, texts, [lang], params.language_windows, evaluation)
            evaluator = SparseEvaluator(lm, ids, batch_size=evaluation.batch_size)
            run = evaluator.evaluate("cett", cett)
            rows.append({"language": lang, "activation_ratio": run.activation_ratio,
                         "ppl_ratio": evaluator.ratio(run), "dense_perplexity": evaluator.dense.perplexity})
            frequency.append(torch.stack(run.neuron_frequency))
        return {"frequency": torch.stack(frequency)}, {"rows": rows}

    tensors, meta = store.cached(params.KIND, key, compute)
    return LanguageResult(model=lm.name, cett=cett, target=target, rare=params.rare, table=pd.DataFrame(meta["rows"]),
                          frequency=tensors["frequency"].numpy())


def language_table(results: Sequence[LanguageResult]) -> pd.DataFrame:
    """Activation ratio and perplexity ratio per language (rows) and model (columns)."""
    rows = pd.concat([r.table.assign(model=r.model) for r in results])
    return rows.pivot(index="language", columns="model", values=["activation_ratio", "ppl_ratio"])
