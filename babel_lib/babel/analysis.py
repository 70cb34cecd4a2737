"""The paper's analyses of expert activation frequencies f [n_langs, n_layers, n_experts] (numpy or torch).

High-frequency experts (f >= tau_high), experts shared by every language, language-specific experts,
language similarity with a hierarchical clustering and its agreement with language families (a number and a
permutation p-value), split-half stability with a noise floor for differences, and comparisons of two models
(two families, or a base/instruct pair). Every function is pure: arrays in, arrays or plain numbers out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform
from scipy.special import comb

from babel_lib.core.study import StudyParams, param
from babel_lib.errors import BabelError

METRICS = ("cosine", "pearson", "jaccard")
DEPTHS = ("early", "middle", "late")


@dataclass(frozen=True)
class AnalysisParams(StudyParams):
    """Notebook 02's analyses of the counts: thresholds, similarity, tests and the noise floor."""

    KIND: ClassVar[str] = "analysis"
    CODE: ClassVar[tuple[str, ...]] = ("babel_lib.babel.analysis",)

    tau_high: float = param(0.4, ge=0, le=1)  # high-frequency expert: f >= tau_high
    tau_low: float = param(0.25, ge=0, le=1)  # language-specific: f < tau_low in every other language
    tau_rare: float = param(0.01, ge=0, le=1)  # dormant (rarely activated): f < tau_rare in every language
    tau_grid: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # sensitivity
    max_specific: int = param(2, ge=1)  # specific: high-frequency in at most this many languages
    similarity: Literal["cosine", "pearson", "jaccard"] = "pearson"
    center: bool = True  # compare each language's deviation from the all-language mean
    n_permutations: int = param(10000, ge=1)
    alpha: float = param(0.05, gt=0, lt=1)
    noise_z: float = param(3.0, gt=0)  # a difference is real beyond noise_z standard errors (split halves)
    instruct_pairs: tuple[tuple[str, str], ...] = ()  # [[base, instruct], ...] profiled with the base's partition

    def check(self) -> None:
        if self.tau_low > self.tau_high:
            raise self.invalid("tau_low", f"{self.tau_low} is above tau_high={self.tau_high}")
        if not self.tau_grid or not all(0 < t <= 1 for t in self.tau_grid):
            raise self.invalid("tau_grid", f"{list(self.tau_grid)} must be a non-empty list of values in (0, 1]")


def _np(x: Any) -> np.ndarray:
    """A numpy copy of a numpy array or (CPU) torch tensor."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def frequencies(counts: Any, tokens: Any) -> np.ndarray:
    """f = counts / tokens, float64; counts [..., L, E] with tokens [...] (e.g. [n] or [2, n] for halves)."""
    counts, tokens = _np(counts).astype(np.float64), _np(tokens).astype(np.float64)
    if counts.shape[:-2] != tokens.shape:
        raise BabelError(f"counts {counts.shape} and tokens {tokens.shape} do not match; counts must be "
                         "[..., layers, experts] with tokens [...]")
    if (tokens <= 0).any():
        raise BabelError("some group has no counted token; profile more text for it")
    return counts / tokens[..., None, None]


def expert_order(freq: Any) -> np.ndarray:
    """Per layer, experts by mean frequency over languages, highest first (ties by expert id): [L, E]."""
    return np.argsort(-_np(freq).mean(0), axis=-1, kind="stable")


def reorder(values: Any, order: np.ndarray) -> np.ndarray:
    """values [..., L, E] with each layer's experts put in `order` [L, E] (one order for every language)."""
    values = _np(values)
    return np.take_along_axis(values, np.broadcast_to(order, values.shape), axis=-1)


def high_counts(freq: Any, tau_high: float) -> np.ndarray:
    """Number of high-frequency experts (f >= tau_high) per language and layer: [n, L]."""
    return (_np(freq) >= tau_high).sum(-1)


def shared_experts(freq: Any, tau_high: float) -> np.ndarray:
    """Experts with f >= tau_high in every language: bool [L, E]."""
    return (_np(freq) >= tau_high).all(0)


def specific_experts(freq: Any, tau_high: float, tau_low: float, max_languages: int = 1) -> np.ndarray:
    """bool [n, L, E]: expert e is specific to language i when f_i >= tau_high, it is high in at most
    `max_languages` languages, and every language where it is not high has f < tau_low."""
    if tau_low > tau_high:
        raise BabelError(f"tau_low={tau_low} is above tau_high={tau_high}; choose tau_low <= tau_high")
    freq = _np(freq)
    high = freq >= tau_high
    clear = ((freq < tau_low) | high).all(0) & (high.sum(0) <= max_languages)
    return high & clear


def expert_ids(mask: Any) -> list[tuple[int, int]]:
    """(layer, expert) of every True cell of a [L, E] mask."""
    return [(int(layer), int(e)) for layer, e in np.argwhere(_np(mask))]


def similarity(freq: Any, metric: str = "pearson", *, center: bool = False, tau_high: float | None = None
               ) -> np.ndarray:
    """Language similarity [n, n] of the flattened frequency vectors: "cosine", "pearson", or "jaccard" of the
    high-frequency sets (f >= tau_high). center=True first subtracts every cell's mean over languages, so the
    similarity compares what is particular to each language rather than the common expert popularity."""
    if metric not in METRICS:
        raise BabelError(f"unknown similarity {metric!r}; choose one of {', '.join(METRICS)}")
    x = _np(freq).reshape(len(freq), -1).astype(np.float64)
    if metric == "jaccard":
        if tau_high is None:
            raise BabelError("metric='jaccard' compares high-frequency sets; pass tau_high")
        sets = (x >= tau_high).astype(np.float64)
        inter = sets @ sets.T
        union = sets.sum(1)[:, None] + sets.sum(1)[None, :] - inter
        return np.divide(inter, union, out=np.ones_like(inter), where=union > 0)
    if center:
        x = x - x.mean(0)
    if metric == "pearson":
        x = x - x.mean(1, keepdims=True)
    norms = np.linalg.norm(x, axis=1)
    if (norms == 0).any():
        raise BabelError("a language's frequency vector is constant, so its similarity is undefined; profile "
                         "more text or use metric='jaccard'")
    unit = x / norms[:, None]
    return np.clip(unit @ unit.T, -1.0, 1.0)


def cluster(sim: np.ndarray, method: str = "average") -> np.ndarray:
    """Hierarchical clustering (scipy linkage matrix) of languages on the distance 1 - similarity."""
    dist = np.clip(1.0 - _np(sim), 0.0, None)
    np.fill_diagonal(dist, 0.0)
    return hierarchy.linkage(squareform((dist + dist.T) / 2, checks=False), method=method)


def dendrogram(linkage: np.ndarray, labels: Sequence[str]) -> dict:
    """Coordinates of the dendrogram (scipy's icoord, dcoord, ivl = leaf labels left to right, leaves)."""
    return hierarchy.dendrogram(linkage, labels=list(labels), no_plot=True)


def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, 1)


def family_agreement(sim: np.ndarray, groups: Sequence[str], n_permutations: int = 10000, seed: int = 0
                     ) -> dict[str, float]:
    """Mean similarity of language pairs in the same group minus pairs in different groups, and a one-sided
    permutation p-value (group labels shuffled over languages; p = (1 + #perm gap >= observed) / (1 + n))."""
    sim, groups = _np(sim), np.asarray(groups)
    i, j = _pairs(len(groups))
    values = sim[i, j]
    _, codes = np.unique(groups, return_inverse=True)

    def gaps(labels: np.ndarray) -> np.ndarray:  # labels [P, n] -> gap per row
        same = labels[:, i] == labels[:, j]
        if not same.any(1).all() or same.all(1).any():
            raise BabelError("the agreement needs language pairs both within and across groups; give languages "
                             "from at least two groups with one group holding two or more")
        within = (same * values).sum(1) / same.sum(1)
        across = (~same * values).sum(1) / (~same).sum(1)
        return within - across

    observed = gaps(codes[None])[0]
    rng = np.random.default_rng(seed)
    shuffled = rng.permuted(np.tile(codes, (n_permutations, 1)), axis=1)
    null = gaps(shuffled)
    same = codes[i] == codes[j]
    return {"within": float(values[same].mean()), "across": float(values[~same].mean()), "gap": float(observed),
            "p_value": float((1 + (null >= observed - 1e-12).sum()) / (1 + n_permutations)),
            "within_pairs": int(same.sum()), "n_permutations": n_permutations}


def adjusted_rand(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Adjusted Rand index of two labellings of the same items (1 = identical partitions, ~0 = chance)."""
    _, a = np.unique(np.asarray(a), return_inverse=True)
    _, b = np.unique(np.asarray(b), return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=np.int64)
    np.add.at(table, (a, b), 1)
    pairs = comb(table, 2).sum()
    rows, cols, total = comb(table.sum(1), 2).sum(), comb(table.sum(0), 2).sum(), comb(len(a), 2)
    expected = rows * cols / total
    top = (rows + cols) / 2
    return 1.0 if top == expected else float((pairs - expected) / (top - expected))


def cluster_agreement(linkage: np.ndarray, groups: Sequence[str]) -> float:
    """ARI between the known groups and the dendrogram cut into as many clusters as there are groups."""
    k = len(set(groups))
    return adjusted_rand(groups, hierarchy.fcluster(linkage, k, criterion="maxclust"))


def off_diagonal_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the upper-triangle entries of two [n, n] matrices."""
    i, j = _pairs(len(a))
    return float(np.corrcoef(_np(a)[i, j], _np(b)[i, j])[0, 1])


def mantel(a: np.ndarray, b: np.ndarray, n_permutations: int = 10000, seed: int = 0) -> dict[str, float]:
    """Mantel test: correlation of two similarity matrices over language pairs, and a one-sided p-value
    from permuting the languages of one matrix."""
    a, b = _np(a), _np(b)
    observed = off_diagonal_correlation(a, b)
    rng = np.random.default_rng(seed)
    null = np.array([off_diagonal_correlation(a, b[np.ix_(p, p)])
                     for p in (rng.permutation(len(a)) for _ in range(n_permutations))])
    return {"r": observed, "p_value": float((1 + (null >= observed - 1e-12).sum()) / (1 + n_permutations))}


def same_group(labels: Sequence[Any]) -> np.ndarray:
    """[n, n] 1.0 where two items share a label (e.g. a language family), else 0.0: a similarity matrix."""
    labels = np.asarray(labels)
    return (labels[:, None] == labels[None, :]).astype(np.float64)


def _residualise(y: np.ndarray, controls: np.ndarray) -> np.ndarray:
    """y [..., P] minus its least-squares fit on an intercept and the control columns [P, c]."""
    x = np.column_stack([np.ones(len(controls)), controls])
    return y - y @ (x @ np.linalg.pinv(x)).T


def partial_mantel(a: np.ndarray, b: np.ndarray, controls: Sequence[np.ndarray], n_permutations: int = 10000,
                   seed: int = 0) -> dict[str, float]:
    """Partial Mantel test: the correlation of two [n, n] matrices over item pairs after regressing both on the
    `controls` matrices (with an intercept), and a one-sided p-value from permuting the items of `a`
    (rows and columns together; controls and `b` fixed): p = (1 + #perm r >= observed) / (1 + n)."""
    a, b = _np(a), _np(b)
    i, j = _pairs(len(a))
    ctrl = np.column_stack([_np(c)[i, j] for c in controls]) if len(controls) else np.empty((len(i), 0))
    rb = _residualise(b[i, j], ctrl)
    ra = _residualise(a[i, j], ctrl)
    if np.linalg.norm(rb) < 1e-12 or np.linalg.norm(ra) < 1e-12:
        raise BabelError("a matrix of the partial Mantel test is fully explained by the controls (e.g. every family "
                         "has its own script), so nothing is left to test; use languages that vary within a control")

    def corr(res: np.ndarray) -> np.ndarray:
        return res @ rb / (np.linalg.norm(res, axis=-1) * np.linalg.norm(rb))

    observed = float(corr(ra))
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_permutations, len(a))), axis=1)
    null = corr(_residualise(a[perms[:, i], perms[:, j]], ctrl))
    return {"r": observed, "p_value": float((1 + (null >= observed - 1e-12).sum()) / (1 + n_permutations)),
            "n_permutations": n_permutations}


def within_group_agreement(sim: np.ndarray, families: Sequence[str], held: Sequence[str], n_permutations: int = 10000,
                           seed: int = 0) -> dict[str, Any] | None:
    """`family_agreement` among the languages of the largest `held` group (e.g. one script), so the held
    grouping cannot explain the gap; None when that group lacks pairs within and across families."""
    held, families = np.asarray(held), np.asarray(families)
    values, counts = np.unique(held, return_counts=True)
    keep = np.flatnonzero(held == values[int(np.argmax(counts))])
    fam = families[keep]
    _, sizes = np.unique(fam, return_counts=True)
    if len(sizes) < 2 or sizes.max() < 2:
        return None
    sub = _np(sim)[np.ix_(keep, keep)]
    return {"group": str(held[keep[0]]), "members": keep.tolist(),
            **family_agreement(sub, fam, n_permutations, seed)}


def fragmentation_similarity(ratio: Any) -> np.ndarray:
    """[n, n] similarity of tokenizer fragmentation: -|log r_i - log r_j| of tokens per reference token r."""
    log = np.log(_np(ratio).astype(np.float64))
    return -np.abs(log[:, None] - log[None, :])


def script_control(sim: np.ndarray, groups: Mapping[str, Sequence[str]], fragmentation: Any, linkage: np.ndarray,
                   n_permutations: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Is activation similarity about family once script (and tokenizer fragmentation) is held fixed?

    Mantel tests of similarity vs same-family, same-script and fragmentation; partial Mantel tests of family
    controlling for script, and for script and fragmentation; script vs similarity controlling for family; the
    family gap among the languages of the largest script; the dendrogram's ARI against family and script.
    """
    fam, scr = same_group(groups["family"]), same_group(groups["script"])
    frag = fragmentation_similarity(fragmentation)
    k = len(set(groups["family"]))
    cut = hierarchy.fcluster(linkage, k, criterion="maxclust")
    out: dict[str, Any] = {
        "family": mantel(sim, fam, n_permutations, seed), "script": mantel(sim, scr, n_permutations, seed),
        "fragmentation": mantel(sim, frag, n_permutations, seed),
        "within_script": within_group_agreement(sim, groups["family"], groups["script"], n_permutations, seed),
        "ari_family": adjusted_rand(groups["family"], cut),
        "ari_script": adjusted_rand(groups["script"], hierarchy.fcluster(linkage, len(set(groups["script"])),
                                                                         criterion="maxclust")),
    }
    for name, a, controls in (("family | script", fam, [scr]), ("family | script, fragmentation", fam, [scr, frag]),
                              ("script | family", scr, [fam])):
        try:
            out[name] = partial_mantel(sim, a, controls, n_permutations, seed)
        except BabelError:  # e.g. every family has its own script in a small language set
            out[name] = None
    return out


SCRIPT_TESTS = ("family", "script", "fragmentation", "family | script", "family | script, fragmentation",
                "script | family")


def script_table(controls: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """script_control results, tests x models: r and permutation p of each (partial) Mantel test, and the ARIs."""
    def cell(t: Mapping[str, float] | None) -> str:
        return "not testable" if t is None else f"r = {t['r']:+.3f}, p = {t['p_value']:.4f}"

    return pd.DataFrame({m: {**{t: cell(c[t]) for t in SCRIPT_TESTS}, "ARI vs families": f"{c['ari_family']:.3f}",
                             "ARI vs scripts": f"{c['ari_script']:.3f}"} for m, c in controls.items()})


def fragmentation_table(fragmentation: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """token_fragmentation results per model side by side: languages x (model, measure)."""
    keys = ("tokens", "characters", "tokens_per_character", "ratio_to_reference")
    return pd.concat({m: pd.DataFrame({k: f[k] for k in keys}, index=f["languages"])
                      for m, f in fragmentation.items()}, axis=1)


def fragmentation_findings(fragmentation: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One sentence per model: how unevenly its tokenizer cuts the same paragraphs (token_fragmentation)."""
    out = []
    for m, f in fragmentation.items():
        r, codes = np.asarray(f["ratio_to_reference"]), f["languages"]
        lo, hi = int(np.argmin(r)), int(np.argmax(r))
        out.append(f"{m}: the same paragraphs take {r[lo]:.2f}× ({codes[lo]}) to {r[hi]:.2f}× ({codes[hi]}) the "
                   f"tokens of {f['reference']}; the median language needs {np.median(r):.2f}×.")
    return out


def script_findings(model: str, control: Mapping[str, Any], alpha: float = 0.05) -> list[str]:
    """The family-vs-script results of one model as a sentence."""
    def test(name: str) -> str:
        t = control.get(name)
        return "not testable (explained by the controls)" if t is None else f"r = {t['r']:+.2f}, p = {t['p_value']:.4f}"

    within = control["within_script"]
    inside = ("no script's languages include two families with two languages in one, so the within-script test "
              "cannot run" if within is None else
              f"among the {len(within['members'])} {within['group']}-script languages the family gap is "
              f"{within['gap']:+.3f} (p = {within['p_value']:.4f})")
    fixed = control.get("family | script")
    verdict = ("cannot be told from a script effect in this language set" if fixed is None else
               f"{'survives' if fixed['p_value'] < alpha else 'does not survive'} holding script fixed")
    return [f"{model}: the family effect {verdict}. Similarity vs same family {test('family')}; "
            f"vs same script {test('script')}; vs tokenizer fragmentation {test('fragmentation')}. Partial Mantel: "
            f"family | script {test('family | script')}; family | script and fragmentation "
            f"{test('family | script, fragmentation')}; script | family {test('script | family')}. {inside[0].upper()}"
            f"{inside[1:]}. The dendrogram's ARI is {control['ari_family']:.2f} against families and "
            f"{control['ari_script']:.2f} against scripts."]


def split_half_correlation(freq_halves: Any) -> np.ndarray:
    """Per language, the Pearson correlation of the two halves' frequencies [2, n, L, E] -> [n]."""
    halves = _np(freq_halves)
    x = halves.reshape(2, halves.shape[1], -1)
    return np.array([np.corrcoef(x[0, i], x[1, i])[0, 1] for i in range(x.shape[1])])


def spearman_brown(r: Any) -> np.ndarray:
    """Reliability of the full sample from the split-half correlation r: 2r / (1 + r)."""
    r = _np(r)
    return 2 * r / (1 + r)


def standard_error(counts_halves: Any, tokens_halves: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell standard error [n, L, E] of the full-sample frequency, and the design effect [n] behind it.

    Tokens of a paragraph are not independent, so the binomial variance f(1-f)/N is scaled by a design
    effect estimated from the two paragraph halves: deff = sum (f1 - f2)^2 / sum f(1-f)(1/N1 + 1/N2).
    """
    counts, tokens = _np(counts_halves).astype(np.float64), _np(tokens_halves).astype(np.float64)
    halves = frequencies(counts, tokens)
    full = frequencies(counts.sum(0), tokens.sum(0))
    binomial = full * (1 - full)
    spread = ((halves[0] - halves[1]) ** 2).sum((1, 2))
    scale = binomial.sum((1, 2)) * (1 / tokens[0] + 1 / tokens[1])
    deff = np.divide(spread, scale, out=np.zeros_like(spread), where=scale > 0)
    return np.sqrt(deff[:, None, None] * binomial / tokens.sum(0)[:, None, None]), deff


def beyond_noise(diff: Any, se: Any, z: float = 3.0) -> np.ndarray:
    """Cells where a frequency difference exceeds z standard errors (se: the difference's standard error)."""
    return np.abs(_np(diff)) > z * _np(se)


def pairwise_beyond_noise(freq: Any, se: Any, z: float = 3.0) -> np.ndarray:
    """[n, n] fraction of cells where languages i and j differ by more than z * sqrt(se_i^2 + se_j^2)."""
    freq, se = _np(freq), _np(se)
    n = len(freq)
    out = np.zeros((n, n))
    for i, j in zip(*_pairs(n)):
        out[i, j] = out[j, i] = beyond_noise(freq[i] - freq[j], np.hypot(se[i], se[j]), z).mean()
    return out


def depth_peak(per_layer: Any) -> str:
    """Which third of the layers ("early", "middle", "late") holds the largest mean of a per-layer value."""
    thirds = np.array_split(_np(per_layer).astype(np.float64), 3)
    return DEPTHS[int(np.argmax([t.mean() for t in thirds]))]


def compare_variants(freq_a: Any, freq_b: Any, tau_high: float) -> dict[str, Any]:
    """Two models of one architecture (e.g. base vs instruct) profiled with one partition, same languages:
    per-layer correlation of their frequencies, mean |difference| (overall and per layer), Jaccard overlap
    of their shared-expert sets, and the correlation of their language-similarity matrices (n >= 3)."""
    a, b = _np(freq_a), _np(freq_b)
    if a.shape != b.shape:
        raise BabelError(f"the two variants' frequencies have shapes {a.shape} and {b.shape}; profile both with "
                         "one partition and the same languages")
    layers = a.shape[1]
    xa, xb = a.transpose(1, 0, 2).reshape(layers, -1), b.transpose(1, 0, 2).reshape(layers, -1)
    corr = np.array([np.corrcoef(xa[layer], xb[layer])[0, 1] for layer in range(layers)])
    shared_a, shared_b = shared_experts(a, tau_high), shared_experts(b, tau_high)
    union = (shared_a | shared_b).sum()
    n = a.shape[0]
    return {
        "layer_correlation": corr,
        "layer_mean_abs_difference": np.abs(a - b).mean((0, 2)),
        "mean_abs_difference": float(np.abs(a - b).mean()),
        "shared_a": int(shared_a.sum()), "shared_b": int(shared_b.sum()),
        "shared_jaccard": float((shared_a & shared_b).sum() / union) if union else 1.0,
        "similarity_correlation": (off_diagonal_correlation(similarity(a), similarity(b)) if n >= 3 else np.nan),
    }


@dataclass
class Summary:
    """Every analysis of one model's profile (arrays over languages [n], layers [L], experts [E]) and the
    sentences the notebook prints under each figure."""

    model: str
    languages: list[str]
    groups: dict[str, list[str]]  # grouping name -> one label per language; the first is scored by `ari`
    tau_high: float
    tau_low: float
    max_specific: int
    z: float
    tau_rare: float
    freq: np.ndarray  # [n, L, E]
    halves: np.ndarray  # [2, n, L, E]
    order: np.ndarray  # [L, E]
    high: np.ndarray  # [n, L] high-frequency experts
    shared: np.ndarray  # [L, E] bool
    specific: np.ndarray  # [n, L, E] bool
    similarity: np.ndarray  # [n, n]
    linkage: np.ndarray
    agreement: dict[str, dict[str, float]]  # grouping -> family_agreement
    ari: float
    split_half: np.ndarray  # [n]
    se: np.ndarray  # [n, L, E]
    deff: np.ndarray  # [n]
    beyond_noise_vs_mean: np.ndarray  # [n]
    pairwise_beyond_noise: np.ndarray  # [n, n]
    similarity_stability: float
    half_agreement: list[float]  # the first grouping's gap in each half

    @property
    def grouping(self) -> str:
        return next(iter(self.groups))

    @property
    def n_experts(self) -> int:
        return self.freq.shape[2]

    @property
    def shared_per_layer(self) -> np.ndarray:
        return self.shared.sum(-1)

    @property
    def specific_per_layer(self) -> np.ndarray:
        return self.specific.any(0).sum(-1)

    @property
    def rare(self) -> np.ndarray:
        """[L, E] experts activated on fewer than tau_rare of the tokens of every language."""
        return self.freq.max(0) < self.tau_rare

    def extreme_pairs(self) -> list[tuple[int, int]]:
        """The closest and the farthest pair of languages by similarity: [(i, j), (i, j)]."""
        sim = self.similarity.copy()
        np.fill_diagonal(sim, np.nan)
        return [tuple(int(v) for v in np.unravel_index(f(sim), sim.shape)) for f in (np.nanargmax, np.nanargmin)]

    def frequency_findings(self) -> list[str]:
        f = self.freq
        return [f"{self.model}: the mean frequency is {f.mean():.3f}; {(f.mean(0) >= self.tau_high).mean():.1%} of "
                f"experts have a mean frequency ≥ {self.tau_high}, the busiest is activated on {f.max():.0%} of a "
                f"language's tokens, and {self.rare.mean():.1%} are activated on fewer than {self.tau_rare:.0%} of "
                "the tokens of "
                "every language."]

    def difference_findings(self) -> list[str]:
        beyond, langs = self.beyond_noise_vs_mean, self.languages
        (a, b), (c, d) = self.extreme_pairs()
        pair = self.pairwise_beyond_noise
        return [f"{self.model}: the share of cells that differ from the all-language mean beyond noise ranges from "
                f"{beyond.min():.1%} ({langs[int(beyond.argmin())]}) to {beyond.max():.1%} "
                f"({langs[int(beyond.argmax())]}); the closest pair {langs[a]} − {langs[b]} differs in "
                f"{pair[a, b]:.1%} of cells, the farthest pair {langs[c]} − {langs[d]} in {pair[c, d]:.1%}."]

    def high_findings(self) -> list[str]:
        per_layer, total = self.high.mean(0), self.high.sum(1)
        langs = self.languages
        return [f"{self.model}: on average {per_layer.mean():.1f} of {self.n_experts} experts per layer are "
                f"high-frequency; the most in layer {int(per_layer.argmax())} ({per_layer.max():.1f}), the fewest in "
                f"layer {int(per_layer.argmin())} ({per_layer.min():.1f}). Across languages the total ranges from "
                f"{int(total.min())} ({langs[int(total.argmin())]}) to {int(total.max())} "
                f"({langs[int(total.argmax())]})."]

    def shared_findings(self) -> list[str]:
        return [f"{self.model}: {int(self.shared.sum())} of {self.shared.size} experts ({self.shared.mean():.1%}) are "
                f"shared by all {len(self.languages)} languages, most in layer {int(self.shared_per_layer.argmax())}; "
                f"language-specific (high in at most {self.max_specific} language(s), below {self.tau_low} in all "
                f"others): {int(self.specific.any(0).sum())}."]

    def family_findings(self, alpha: float = 0.05) -> list[str]:
        fam, script = self.agreement[self.grouping], self.agreement.get("script")
        verdict = "are" if fam["p_value"] < alpha else "are not significantly"
        line = (f"{self.model}: languages of one {self.grouping} {verdict} more similar than languages of different "
                f"{self.grouping} groups (within {fam['within']:.3f} vs across {fam['across']:.3f}, permutation "
                f"p = {fam['p_value']:.4f}, {fam['n_permutations']} permutations); the dendrogram cut into "
                f"{len(set(self.groups[self.grouping]))} clusters matches them with ARI = {self.ari:.2f}.")
        if script:
            line += f" Script: gap {script['gap']:+.3f}, p = {script['p_value']:.4f}."
        return [line]

    def stability_findings(self) -> list[str]:
        r, langs = self.split_half, self.languages
        return [f"{self.model}: split-half r is {r.min():.3f} ({langs[int(r.argmin())]}) to {r.max():.3f}; full-sample "
                f"reliability ≥ {spearman_brown(r).min():.3f}. Design effect {self.deff.min():.1f}–{self.deff.max():.1f} "
                f"(tokens of a paragraph are not independent). The two halves' similarity matrices correlate at "
                f"r = {self.similarity_stability:.3f}; the {self.grouping} gap is {self.half_agreement[0]:+.3f} and "
                f"{self.half_agreement[1]:+.3f} in the two halves."]

    def findings(self, alpha: float = 0.05) -> list[str]:
        return (self.frequency_findings() + self.difference_findings() + self.high_findings()
                + self.shared_findings() + self.family_findings(alpha) + self.stability_findings())


def analyse(profile_tensors: Mapping[str, Any], languages: Sequence[str], groups: Mapping[str, Sequence[str]],
            params: AnalysisParams, *, seed: int = 0, model: str = "") -> Summary:
    """`summarize` of a "frequencies" artefact's tensors with a profile's AnalysisParams."""
    return summarize(*(profile_tensors[k] for k in ("expert_counts", "tokens", "expert_counts_halves", "tokens_halves")),
                     languages, groups, tau_high=params.tau_high, tau_low=params.tau_low, metric=params.similarity,
                     center=params.center, max_specific=params.max_specific, n_permutations=params.n_permutations,
                     seed=seed, z=params.noise_z, tau_rare=params.tau_rare, model=model)


def summarize(counts: Any, tokens: Any, counts_halves: Any, tokens_halves: Any, languages: Sequence[str],
              groups: Mapping[str, Sequence[str]], *, tau_high: float, tau_low: float, metric: str = "pearson",
              center: bool = False, max_specific: int = 1, n_permutations: int = 10000, seed: int = 0,
              z: float = 3.0, tau_rare: float = 0.01, model: str = "") -> Summary:
    """Every analysis of one model's profile, for the notebook's figures and sentences.

    groups: {grouping name: one label per language} (e.g. family, genus, script); the first is the one the
    dendrogram is scored against.
    """
    freq = frequencies(counts, tokens)
    halves = frequencies(counts_halves, tokens_halves)
    se, deff = standard_error(counts_halves, tokens_halves)
    sim = similarity(freq, metric, center=center, tau_high=tau_high)
    linkage = cluster(sim)
    first = next(iter(groups))
    half_sims = [similarity(h, metric, center=center, tau_high=tau_high) for h in halves]
    return Summary(
        model=model, languages=list(languages), groups={k: list(v) for k, v in groups.items()}, tau_high=tau_high,
        tau_low=tau_low, max_specific=max_specific, z=z, tau_rare=tau_rare, freq=freq, halves=halves, order=expert_order(freq),
        high=high_counts(freq, tau_high), shared=shared_experts(freq, tau_high),
        specific=specific_experts(freq, tau_high, tau_low, max_specific), similarity=sim, linkage=linkage,
        agreement={name: family_agreement(sim, labels, n_permutations, seed) for name, labels in groups.items()},
        ari=cluster_agreement(linkage, groups[first]), split_half=split_half_correlation(halves), se=se, deff=deff,
        beyond_noise_vs_mean=beyond_noise(freq - freq.mean(0), se, z).mean((1, 2)),
        pairwise_beyond_noise=pairwise_beyond_noise(freq, se, z),
        similarity_stability=off_diagonal_correlation(*half_sims),
        half_agreement=[family_agreement(s, groups[first], n_permutations, seed)["gap"] for s in half_sims],
    )


def cross_model_findings(summaries: Mapping[str, Summary], alpha: float = 0.05,
                         n_permutations: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Which findings hold in every model: one row per finding, one column per model, and `holds in all`.

    Models may differ in depth and width, so findings are stated per model (fractions, depth thirds,
    languages) and compared; the language-similarity structures are compared with a Mantel test.
    """
    rows: list[dict[str, Any]] = []
    names = list(summaries)

    def row(finding: str, values: dict[str, Any], holds: bool) -> None:
        rows.append({"finding": finding, **values, "holds in all": bool(holds)})

    agree = {m: s.agreement[s.grouping] for m, s in summaries.items()}
    grouping = summaries[names[0]].grouping
    row(f"languages of one {grouping} are more similar than across (permutation p < {alpha})",
        {m: f"gap {a['gap']:+.3f}, p = {a['p_value']:.4f}" for m, a in agree.items()},
        all(a["p_value"] < alpha for a in agree.values()))
    shared = {m: float(s.shared.mean()) for m, s in summaries.items()}
    row("experts high-frequency in every language (fraction of all experts)",
        {m: f"{v:.1%}" for m, v in shared.items()}, all(v > 0 for v in shared.values()))
    for key, what in (("shared_per_layer", "shared experts"), ("specific_per_layer", "language-specific experts")):
        peaks = {m: depth_peak(getattr(s, key)) if getattr(s, key).sum() else "none" for m, s in summaries.items()}
        same = len(set(peaks.values())) == 1 and "none" not in peaks.values()
        row(f"{what} peak in the same third of the depth (early, middle or late layers)", peaks, same)
    high = {m: depth_peak(s.high.mean(0)) for m, s in summaries.items()}
    row("high-frequency experts peak in the same third of the depth", high, len(set(high.values())) == 1)
    outlier = {m: s.languages[int(np.argmin((s.similarity.sum(1) - 1)))] for m, s in summaries.items()}
    row("the language least similar to all others", outlier, len(set(outlier.values())) == 1)
    stable = {m: float(s.split_half.min()) for m, s in summaries.items()}
    row("frequencies are reproducible across paragraph halves (lowest split-half r >= 0.9)",
        {m: f"{v:.3f}" for m, v in stable.items()}, all(v >= 0.9 for v in stable.values()))
    if len(names) >= 2:
        test = mantel(summaries[names[0]].similarity, summaries[names[1]].similarity, n_permutations, seed)
        value = f"Mantel r = {test['r']:.2f}, p = {test['p_value']:.4f}"
        row(f"the language-similarity structure agrees between {names[0]} and {names[1]} (p < {alpha})",
            {m: value for m in names}, test["p_value"] < alpha)
    return pd.DataFrame(rows).set_index("finding")


@dataclass
class Counting:
    """One way of counting activated experts (rule, score mode, expert size) and its frequencies."""

    rule: str
    mode: str
    n_experts: int
    neurons_per_expert: float
    freq: np.ndarray  # [n, L, E]
    halves: np.ndarray | None  # [2, n, L, E]; None for the per-neuron counts

    @property
    def label(self) -> str:
        return f"{self.rule} · {self.mode} · {self.n_experts} × {self.neurons_per_expert:.3g}"


def countings(tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> list[Counting]:
    """Every counting of a "frequencies" artefact (meta["countings"]; the main one first), as frequencies."""
    tokens_halves = _np(tensors["tokens_halves"])
    out = []
    for c in meta["countings"]:
        halves = frequencies(tensors[c["tensor"]], tokens_halves)
        out.append(Counting(c["rule"], c["mode"], int(c["n_experts"]), float(c["neurons_per_expert"]),
                            frequencies(_np(tensors[c["tensor"]]).sum(0), tokens_halves.sum(0)), halves))
    return out


def neuron_counting(tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> Counting:
    """The per-neuron counts (|a| > neuron_scale x the token's RMS) as a counting of one-neuron experts, without
    halves."""
    return Counting("neurons", f"|a| > {meta['neuron_scale']:g} RMS", int(tensors["neuron_counts"].shape[-1]), 1.0,
                    frequencies(tensors["neuron_counts"], tensors["tokens"]), None)


def tau_fractions(freq: Any, taus: Sequence[float], low_ratio: float, max_specific: int) -> np.ndarray:
    """[len(taus), 3] fractions of experts that are shared (f >= tau in every language), specific (f >= tau in
    1..max_specific languages and f < low_ratio * tau in the rest) and dormant (f < tau in every language)."""
    freq = _np(freq)
    lo, hi = freq.min(0), freq.max(0)
    return np.array([[(lo >= t).mean(), specific_experts(freq, t, low_ratio * t, max_specific).any(0).mean(),
                      (hi < t).mean()] for t in taus])


def paper_thresholds(freq: Any, shared: float = 0.5, dormant: float = 1000 / 8192) -> tuple[float, float]:
    """The thresholds at which the paper's fractions appear: the largest tau with >= `shared` of the experts at
    f >= tau in every language, and the frequency v such that >= `dormant` of them have f <= v in every
    language (so any tau above v finds that many dormant)."""
    freq = _np(freq)
    lo, hi = np.sort(freq.min(0).ravel())[::-1], np.sort(freq.max(0).ravel())
    return float(lo[int(np.ceil(shared * lo.size)) - 1]), float(hi[int(np.ceil(dormant * hi.size)) - 1])


def layer_budget(freq: Any) -> np.ndarray:
    """Each layer's mean frequency over languages and experts divided by the overall mean: [L]. 1 everywhere
    under per-layer top-k; the cross-layer z-score rule moves the budget between layers."""
    per_layer = _np(freq).mean((0, 2))
    return per_layer / per_layer.mean()


def sensitivity_table(counts: Sequence[Counting], params: AnalysisParams) -> pd.DataFrame:
    """One row per counting: shared, specific and dormant fractions at the profile's thresholds (± split-half
    s.e.), the thresholds at which the paper's fractions appear, where high-frequency experts peak and how far
    the layers' activation budgets spread."""
    low = params.tau_low / params.tau_high if params.tau_high else 1.0
    rows = []
    for c in counts:
        values = tau_fractions(c.freq, [params.tau_high, params.tau_rare], low, params.max_specific)
        se = np.full_like(values, np.nan)  # split-half s.e. of each value (none for the per-neuron counts)
        if c.halves is not None:
            a, b = (tau_fractions(h, [params.tau_high, params.tau_rare], low, params.max_specific) for h in c.halves)
            se = np.abs(a - b) / 2  # _halves_spread of the two halves
        half_tau, dormant_tau = paper_thresholds(c.freq)
        budget = layer_budget(c.freq)
        rows.append({"counting": c.label, "shared": values[0, 0], "shared s.e.": se[0, 0], "specific": values[0, 1],
                     "dormant": values[1, 2], "dormant s.e.": se[1, 2], "τ for 50% shared": half_tau,
                     "τ for 12.2% dormant": dormant_tau,
                     "high-frequency peak": depth_peak(high_counts(c.freq, params.tau_high).mean(0)),
                     "layer budget min–max": f"{budget.min():.2f}–{budget.max():.2f}"})
    return pd.DataFrame(rows).set_index("counting")


def paper_counting(counts: Sequence[Counting], paper_neurons: float = 43.0) -> Counting:
    """The counting closest to the paper's v1 rule: z-score across layers, signed sums, experts nearest
    `paper_neurons` neurons; the first (main) counting when no z-score/sum counting was made."""
    fits = [c for c in counts if (c.rule, c.mode) == ("zscore", "sum")]
    return min(fits, key=lambda c: abs(c.neurons_per_expert - paper_neurons)) if fits else counts[0]


def sensitivity_findings(model: str, table: pd.DataFrame, paper: str) -> list[str]:
    """Where the paper's fractions appear, per counting, as a sentence."""
    row = table.loc[paper]
    return [f"{model}: under the paper's rule ({paper}) {row['shared']:.1%} of experts are shared at τ_high and "
            f"{row['dormant']:.1%} dormant; half the experts are shared only for τ ≤ {row['τ for 50% shared']:.3f} "
            f"and 12.2% are dormant only for τ above {row['τ for 12.2% dormant']:.4f}. Across the "
            f"{len(table)} countings the shared fraction ranges {table['shared'].min():.1%}–{table['shared'].max():.1%} "
            f"and the dormant fraction {table['dormant'].min():.1%}–{table['dormant'].max():.1%}."]


PAPER = "Unraveling Babel"
PAPER_EXPERTS = 8192  # LLaMA-2-7B: 32 layers x 256 experts (v1)


def _halves_spread(values: Sequence[float]) -> float:
    """Standard error of the mean of two split-half estimates: |a - b| / 2."""
    return abs(values[0] - values[1]) / 2


@dataclass
class RuleSensitivity:
    """One model's countings side by side: the table, which row is the paper's rule and which the main one,
    the shared / specific / dormant fractions over the tau grid per counting ([T, 3] each), and per counting
    the fraction of each layer's experts with f >= tau_high, mean over languages ([L] each)."""

    table: pd.DataFrame
    paper: str
    main: str
    taus: tuple[float, ...]
    curves: dict[str, np.ndarray]
    high_per_layer: dict[str, np.ndarray]


def rule_sensitivity(tensors: Mapping[str, Any], meta: Mapping[str, Any], params: AnalysisParams
                     ) -> RuleSensitivity:
    """Every counting of a "frequencies" artefact and its per-neuron counts, compared (sensitivity_table) and
    swept over params.tau_grid (tau_fractions)."""
    counts = countings(tensors, meta)
    every = [*counts, neuron_counting(tensors, meta)]
    low = params.tau_low / params.tau_high if params.tau_high else 1.0
    return RuleSensitivity(sensitivity_table(every, params), paper_counting(counts).label, counts[0].label,
                           tuple(params.tau_grid),
                           {c.label: tau_fractions(c.freq, params.tau_grid, low, params.max_specific) for c in every},
                           {c.label: high_counts(c.freq, params.tau_high).mean(0) / c.n_experts for c in every})


def verdicts(summaries: Mapping[str, Summary], rules: Mapping[str, RuleSensitivity],
             controls: Mapping[str, Mapping[str, Any]], alpha: float = 0.05,
             variants: Mapping[str, Mapping[str, Any]] | None = None) -> list:
    """Notebook 02's verdicts: the paper's v1 numbers (shared and rarely active experts, language families) and
    instruction tuning beside ours, each with a split-half or permutation uncertainty and the rule applied.
    Shared and dormant fractions are decided under the paper's counting (rules[m].paper), the family claim
    with script held fixed (controls[m], from script_control)."""
    from babel_lib.core.verdicts import Verdict, decide

    out = []
    rows = {m: (r.table.loc[r.paper], r.table.loc[r.main], r) for m, r in rules.items()}
    out.append(Verdict(PAPER, "About half of the experts are highly activated in every language",
                       f"roughly half of {PAPER_EXPERTS:,} experts (LLaMA-2-7B, 9 languages, 256 experts of 43 "
                       "neurons, z-score rule; v1)",
                       "; ".join(f"{m}: {p['shared']:.1%} ± {p['shared s.e.']:.1%} ({r.paper}; f ≥ τ_high in all "
                                 f"{len(summaries[m].languages)}); {x['shared']:.1%} ({r.main}); 50% shared needs "
                                 f"τ ≤ {p['τ for 50% shared']:.3f}" for m, (p, x, r) in rows.items()),
                       decide(all(0.4 <= p["shared"] <= 0.6 for p, _, _ in rows.values()),
                              any(0.25 <= p["shared"] <= 0.75 for p, _, _ in rows.values())),
                       "under the paper's counting (z-score across layers, signed sums, ~43-neuron experts): "
                       "reproduced when every model's shared fraction is in [40%, 60%]; partly when some model's is "
                       "in [25%, 75%] (± is the split-half s.e.)"))
    paper_rare = 1000 / PAPER_EXPERTS
    out.append(Verdict(PAPER, "Many experts are rarely activated in any language",
                       f"over 1,000 of {PAPER_EXPERTS:,} experts ({paper_rare:.1%}; v1)",
                       "; ".join(f"{m}: {p['dormant']:.1%} ± {p['dormant s.e.']:.1%} ({r.paper}; f < "
                                 f"{summaries[m].tau_rare:g} in every language); {x['dormant']:.1%} ({r.main})"
                                 for m, (p, x, r) in rows.items()),
                       decide(all(p["dormant"] - 2 * p["dormant s.e."] > paper_rare for p, _, _ in rows.values()),
                              any(p["dormant"] > paper_rare for p, _, _ in rows.values())),
                       f"under the paper's counting: reproduced when every model's dormant fraction exceeds "
                       f"{paper_rare:.1%} by 2 s.e.; partly when some model's exceeds it"))

    def held(c: Mapping[str, Any]) -> str:
        t = c.get("family | script")
        return "not testable" if t is None else f"r = {t['r']:+.2f}, p = {t['p_value']:.4f}"

    def fixed(c: Mapping[str, Any]) -> bool:
        return c.get("family | script") is not None and c["family | script"]["p_value"] < alpha

    fam = {m: s.agreement[s.grouping] for m, s in summaries.items()}
    out.append(Verdict(PAPER, "Related languages (one family) have more similar activation patterns",
                       "stated for en, fr, es, pt, bn, ur, hi, ar, zh (three families; v1); no test statistic",
                       "; ".join(f"{m}: ARI {c['ari_family']:.2f} vs families ({c['ari_script']:.2f} vs scripts); "
                                 f"gap {fam[m]['gap']:+.3f}, p = {fam[m]['p_value']:.4f}; script held fixed "
                                 f"(partial Mantel) {held(c)}" for m, c in controls.items()),
                       decide(all(fam[m]["p_value"] < alpha and fixed(c) for m, c in controls.items()),
                              any(fam[m]["p_value"] < alpha for m in controls)),
                       f"reproduced when, in every model, the within-family minus across-family similarity gap has "
                       f"permutation p < {alpha} and so has the partial Mantel test of family controlling for script; "
                       "partly when only the gap test passes in some model"))
    claim, paper_value = "Instruction tuning changes the activation patterns", "analysed for base/instruct pairs"
    if not variants:
        out.append(Verdict(PAPER, claim, paper_value, "not run on the default (no embedded base/instruct pair)",
                           "not attempted", "runs with `instruct_pairs` in the profile"))
    else:
        base_noise = {pair: float(summaries[pair.split(" → ")[0]].split_half.min())
                      if pair.split(" → ")[0] in summaries else None for pair in variants}
        changed = {pair: (float(v["layer_correlation"].min()), base_noise[pair]) for pair, v in variants.items()}
        out.append(Verdict(PAPER, claim, paper_value,
                           "; ".join(f"{p}: lowest per-layer r {r:.3f}" + (f" (base split-half r ≥ {n:.3f})"
                                                                           if n is not None else "")
                                     for p, (r, n) in changed.items()),
                           decide(all(n is not None and r < n for r, n in changed.values()),
                                  any(n is not None and r < n for r, n in changed.values())),
                           "reproduced when, for every pair, some layer's base-vs-instruct correlation is below the "
                           "base model's lowest split-half correlation (a change beyond sampling noise)"))
    return out


def language_table(codes: Sequence[str]) -> pd.DataFrame:
    """Each language's name, family, genus and script: the groupings the analyses test."""
    from babel_lib.data.languages import language

    return pd.DataFrame([vars(language(code)) for code in codes]).set_index("code")[["name", "family", "genus",
                                                                                      "script"]]


def variant_findings(variants: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One sentence per base → instruct comparison (`compare_variants` results by pair name)."""
    out = []
    for pair, r in variants.items():
        corr = r["layer_correlation"]
        out.append(f"{pair}: per-layer correlation {corr.min():.3f}–{corr.max():.3f} (lowest in layer "
                   f"{int(corr.argmin())}); mean |Δf| {r['mean_abs_difference']:.4f}; shared experts {r['shared_a']} → "
                   f"{r['shared_b']} (Jaccard {r['shared_jaccard']:.2f}); language-similarity matrices correlate at "
                   f"r = {r['similarity_correlation']:.2f}.")
    return out
