"""Notebook 03's verdicts: each claim of Massive Activations (Sun et al., 2024; ../shared/papers/massive-activations.md)
beside our number with its uncertainty over windows or languages, decided by the rule written next to it."""

from __future__ import annotations

import torch

from babel_lib.core.verdicts import Verdict, decide
from babel_lib.massive.attention import Attention
from babel_lib.massive.bias import ImplicitBias
from babel_lib.massive.intervene import Interventions
from babel_lib.massive.locate import KINDS, Located, reference_layer, target_values
from babel_lib.massive.stats import bootstrap, cv

PAPER = "Massive Activations"


def dim_hits(located: Located, dim: int) -> torch.Tensor:
    """[N, L] bool: `dim` is massive somewhere in window n at layer l."""
    scan = located.scan.scan
    return (scan.is_massive(**located.criterion.criterion) & (scan.dims == dim)).any(dim=-1)


def magnitude(located: Located) -> Verdict:
    layer, top1, _ = located.scan.peak()
    ratios = located.scan.window_ratios(layer).double()
    low, mid, high = torch.quantile(ratios, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return Verdict(PAPER, "The largest activations are about 10^4 times the median magnitude of the hidden state",
                   "LLaMA-2-7B: largest ~2,000-2,600 against a median ~0.2, i.e. ~10^4x (criterion: >100 and >=1000x)",
                   f"{located.label}, layer {layer}: top-1 {top1:,.0f}; top-1/median {mid:,.0f}x (median of "
                   f"{len(ratios)} windows, 5-95%: {low:,.0f}x-{high:,.0f}x)",
                   decide(top1 > 100 and mid >= 10 ** 3.5 and low >= 1000, mid >= 1000),
                   "reproduced: top-1 > 100, median window ratio >= 10^3.5 and its 5th percentile >= 10^3; partly: "
                   "median window ratio >= 10^3")


def dimensions(located: Located) -> Verdict:
    target = located.strongest
    ours, share, low = f"{located.label}: no dimension is massive in most windows", 0.0, 0.0
    if target is not None:
        present = dim_hits(located, target.dim).any(dim=1).double()
        share, low, high = bootstrap(present)
        ours = (f"{located.label}: {len(located.targets)} dimension(s) {sorted(t.dim for t in located.targets)}; "
                f"dim {target.dim} massive in {share:.0%} of {len(present)} windows (95% CI {low:.0%}-{high:.0%})")
    few = 1 <= len(located.targets) <= 4
    return Verdict(PAPER, "Massive activations sit in a few fixed feature dimensions",
                   "LLaMA-2-7B: dims 1415 and 2533; LLaMA-2-13B: 2100 and 4743; Mixtral-8x7B: 2070 and 3398",
                   ours, decide(few and low >= 0.9, few and share >= 0.5),
                   "reproduced: 1-4 target dimensions and the largest is massive in every window (95% CI lower "
                   "bound >= 90%); partly: 1-4 targets, the largest in >= 50% of windows")


def tokens(located: Located) -> Verdict:
    mine = located.in_range()
    per_window: dict[int, list[bool]] = {}
    for m in mine:
        per_window.setdefault(m.sequence, []).append(m.kind in ("start", "delimiter"))
    if not per_window:
        return Verdict(PAPER, "They appear on the starting token and on delimiters", "start token, first '.' or "
                       "'\\n', in some models weak words", f"{located.label}: no target", "not reproduced",
                       "no massive dimension to examine")
    shares = torch.tensor([sum(v) / len(v) for v in per_window.values()])
    share, low, high = bootstrap(shares)
    counts = ", ".join(f"{sum(m.kind == k for m in mine)} {k}" for k in KINDS)
    return Verdict(PAPER, "They appear on the starting token and on delimiters",
                   "the starting token and the first delimiter ('.' or '\\n'); in some models weak words",
                   f"{located.label}: {share:.0%} of each window's located activations on start/delimiter tokens "
                   f"(95% CI {low:.0%}-{high:.0%}, {len(shares)} windows; {counts})",
                   decide(low >= 0.9, share >= 0.5),
                   "reproduced: 95% CI lower bound of the per-window share on start/delimiter tokens >= 90%; partly: "
                   "mean share >= 50%")


def layers(located: Located) -> Verdict:
    target = located.strongest
    if target is None:
        return Verdict(PAPER, "They appear suddenly in an early layer and persist through most layers",
                       "LLaMA-2-7B: from layer 2 to about layer 30 of 32", f"{located.label}: no target",
                       "not reproduced", "no massive dimension to examine")
    n_layers = located.scan.scan.n_layers
    hits = dim_hits(located, target.dim)
    firsts = hits.long().argmax(dim=1)[hits.any(dim=1)].double()
    lo, med, hi = torch.quantile(firsts, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    span = target.last_layer - target.first_layer + 1
    early, long = target.first_layer <= 0.25 * n_layers, span >= 0.5 * n_layers
    return Verdict(PAPER, "They appear suddenly in an early layer and persist through most layers",
                   "LLaMA-2-7B: from layer 2 to about layer 30 of 32",
                   f"{located.label}: dim {target.dim} massive in most windows from layer {target.first_layer} to "
                   f"{target.last_layer} of {n_layers}; first layer per window: median {med:.0f} (5-95%: "
                   f"{lo:.0f}-{hi:.0f}, {len(firsts)} windows)",
                   decide(early and long, early or long),
                   "reproduced: first layer <= 25% of depth and the range spans >= 50% of layers; partly: one of the two")


def constancy(located: Located, tokenizer) -> Verdict:
    claim = "Their values are nearly constant across inputs"
    paper = "mean ± std over many sequences, small std (LLaMA-2-7B start token dim 2533 ~767.6, dim 1415 ~-458.6)"
    target = located.strongest
    if target is None:
        return Verdict(PAPER, claim, paper, f"{located.label}: no target", "not reproduced",
                       "no massive dimension to examine")
    layer = reference_layer(target)
    by_kind = target_values(located.scan.scan, located.kinds(tokenizer), target, layer,
                            **located.criterion.criterion)
    if not by_kind or max(v.numel() for _, v in by_kind.values()) < 2:
        return Verdict(PAPER, claim, paper, f"{located.label}: fewer than 2 occurrences at layer {layer}",
                       "not attempted", "needs >= 2 occurrences")
    kind = max(by_kind, key=lambda k: by_kind[k][1].numel())
    values = by_kind[kind][1]
    est, low, high = bootstrap(values, cv)
    return Verdict(PAPER, claim, paper,
                   f"{located.label}: dim {target.dim} on {kind} tokens at layer {layer}: {float(values.mean()):,.1f} "
                   f"± {float(values.std()):,.1f}, CV {est:.1%} (95% CI {low:.1%}-{high:.1%}, {values.numel()} "
                   "occurrences)", decide(high <= 0.1, est <= 0.3),
                   "reproduced: 95% CI upper bound of the coefficient of variation <= 10%; partly: CV <= 30%")


def intervention(result: Interventions | None, model: str) -> Verdict:
    claim = "Setting them to zero destroys the model; setting them to their mean does not"
    paper = "LLaMA-2-7B WikiText perplexity 5.47 -> inf (zero, first layer) vs 5.47 (mean)"
    if result is None:
        return Verdict(PAPER, claim, paper, f"{model}: no target to intervene on", "not attempted",
                       "needs a massive dimension")

    def holds(where: str) -> bool:
        base = result.median("original")
        return result.median(f"zero, {where}") >= 10 * base and abs(result.median(f"mean, {where}") / base - 1) <= 0.1

    parts = [f"{c} {result.median(c):,.2f} ({result.spread(c)[0]:,.2f}-{result.spread(c)[1]:,.2f})"
             for c in result.nll]
    n = len(result.nll["original"])
    return Verdict(PAPER, claim, paper, f"{result.label}: median perplexity over {n} languages (min-max): "
                   + "; ".join(parts), decide(holds("first layer"), holds("every layer")),
                   "reproduced: at the first layer, zeroing raises the median perplexity >= 10x and the mean keeps "
                   "it within 10%; partly: that holds only when editing every layer (the stronger control)")


def attention(result: Attention | None, model: str) -> Verdict:
    claim = "Attention concentrates on the massive-activation tokens from the layer where they appear"
    paper = "head-averaged attention concentrates on these tokens in the layers after they appear (attention sinks)"
    if result is None:
        return Verdict(PAPER, claim, paper, f"{model}: no target", "not attempted", "needs a massive dimension")
    before, after = result.before_after()
    gain, low, high = bootstrap(after - before)
    level = float(after.mean())
    return Verdict(PAPER, claim, paper,
                   f"{result.model}: {level:.1%} after vs {float(before.mean()):.1%} before (uniform "
                   f"{result.baseline:.1%}); after - before {gain:+.1%} (95% CI {low:+.1%} to {high:+.1%}, "
                   f"{len(after)} windows)", decide(level >= 2 * result.baseline and low >= 0.1,
                                                    level >= 2 * result.baseline),
                   "reproduced: mean mass after >= 2x uniform and the 95% CI of after - before above +10 points; "
                   "partly: mass after >= 2x uniform only (concentration without the onset)")


def implicit_bias(result: ImplicitBias | None, model: str) -> Verdict:
    claim = "Their attention value updates act as an implicit bias term"
    paper = "the attention output's part from these tokens is near constant across tokens and inputs"
    if result is None or not list(result.layers()):
        return Verdict(PAPER, claim, paper, f"{model}: no target read by a later layer", "not attempted",
                       "needs a massive dimension before the last block")
    layers = list(result.layers())
    est, low, high = bootstrap(result.per_window)
    rest = float(result.rest[layers].mean())
    return Verdict(PAPER, claim, paper,
                   f"{result.model}, layers {layers[0]}-{layers[-1]}: mean cosine to the mean vector {est:.3f} (95% CI "
                   f"{low:.3f}-{high:.3f}, {len(result.per_window)} windows) for the part from the massive-activation "
                   f"tokens, {rest:.3f} for the rest", decide(low >= 0.9 and low > rest, est >= 0.7 and est > rest),
                   "reproduced: 95% CI lower bound of the per-window mean cosine >= 0.9 and above the rest's; partly: "
                   "mean cosine >= 0.7 and above the rest's")


def verdicts(paper_setting: Located, tokenizer, own: Interventions | None, attn: Attention | None,
             bias: ImplicitBias | None) -> list[Verdict]:
    """Every claim for one model: the location claims on its scan in the paper's setting (without BOS), the
    intervention and attention claims on its own tokenisation."""
    model = paper_setting.scan.run.model
    return [magnitude(paper_setting), dimensions(paper_setting), tokens(paper_setting), layers(paper_setting),
            constancy(paper_setting, tokenizer), intervention(own, model), attention(attn, model),
            implicit_bias(bias, model)]
