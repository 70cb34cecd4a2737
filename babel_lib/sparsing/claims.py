"""Sparsing Law's claims (../shared/papers/sparsing-law.md) beside our numbers, each with the rule that decides
its verdict. The paper's numbers come from its published constants (`scaling.PAPER`); ours from the studies."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from babel_lib.core.verdicts import Verdict, decide
from babel_lib.sparsing.scaling import DIRECTION, FORM_NAME, PAPER
from babel_lib.sparsing.studies import BASELINES, ParetoResult
from babel_lib.sparsing.trends import ScalingResult

PAPER_NAME = "Sparsing Law"
A0_BAND = 0.5  # our last-checkpoint ratios "match" the paper's A₀ within ±50 % of its range ends
PLATEAU_SHAPES = 5  # fewer width/depth ratios than this cannot show a rise followed by a plateau
COMPARABLE = 0.05  # "comparable performance": dense perplexities within 5 % of each other


def paper_a0(form: str) -> tuple[float, float]:
    """The published limits A₀ of one activation over the paper's scales (min, max)."""
    values = [law.a0 for (f, _), law in PAPER.items() if f == form]
    return min(values), max(values)


def spread(values: Sequence[float]) -> float:
    """(max − min) / mean: how much a quantity moves across a family."""
    return (max(values) - min(values)) / (sum(values) / len(values))


def cett_beats_baselines(results: Sequence[ParetoResult]) -> Verdict:
    """CETT against top-k and FAT-ε at CETT's own PPL-p% activation ratio, per model, with bootstrap intervals."""
    found, parts, unconverged = [], [], []
    for r in results:
        here = []
        for method in BASELINES:
            cmp = r.comparison(method)
            if cmp is not None:
                found.append(cmp)
                here.append(f"{method} {cmp[0]:.3f}x CETT's perplexity (95% CI {cmp[1]:.3f}-{cmp[2]:.3f})")
            else:
                here.append(f"{method}: its sweep does not reach that ratio")
        if not r.converged:
            unconverged.append(r.model)
        lo, hi = r.activation_ci
        parts.append(f"{r.model}: PPL-{r.p:g}% activation ratio {r.activation_ratio:.3f} (95% CI {lo:.3f}-{hi:.3f}, "
                     f"{r.tokens:,} tokens); on the sweep set ({r.sweep_tokens:,} tokens) " + ", ".join(here))
    ours = "; ".join(parts) + (f"; the search did not converge for {', '.join(unconverged)}" if unconverged else "")
    sure = sum(lo > 1 for _, lo, _ in found)
    better = sum(value > 1 for value, _, _ in found)
    verdict = "not attempted" if not found else decide(sure == len(found) and not unconverged,
                                                       better >= len(found) / 2)
    return Verdict(PAPER_NAME, "CETT (PPL-p%) gives a better perplexity-activation trade-off than top-k and FAT-ε",
                   "Fig. 2: CETT's Pareto curve lies below top-k's and FAT-ε's (shown, not tabulated)", ours, verdict,
                   "baseline perplexity / CETT's at CETT's PPL-1% activation ratio (interpolated on the sweep set, 95% "
                   "bootstrap interval over windows): reproduced if the interval lies above 1 in every comparison and "
                   "every search converged; partly if the ratio is > 1 in at least half; not attempted if no sweep "
                   "reaches that ratio")


def relu_sparser(zoo: ScalingResult) -> Verdict:
    claim = "ReLU models are much sparser than SiLU models (limit activation ratio ≈ 6-8 % vs ≈ 38-41 %)"
    (r_lo, r_hi), (s_lo, s_hi) = paper_a0("relu"), paper_a0("silu")
    paper = f"A₀ ReLU {r_lo:.3f}-{r_hi:.3f}, SiLU {s_lo:.3f}-{s_hi:.3f} (published constants, 0.1B-1.2B)"
    rule = (f"seed means at the last checkpoint: reproduced if ReLU < SiLU in every shape, with every seed's ReLU below "
            f"every seed's SiLU, and every mean within ±{A0_BAND:.0%} of the paper's A₀ range of its activation; partly "
            "if ReLU < SiLU in every shape only")
    if not zoo.available or not {"relu", "silu"} <= set(zoo.fits["activation"]):
        return Verdict(PAPER_NAME, claim, paper, "no zoo table with both activations", "not attempted", rule)
    shapes = zoo.shapes
    shape = shapes.pivot(index="shape", columns="activation", values="last_ratio").dropna()
    worst = shapes.pivot(index="shape", columns="activation", values="last_ratio_hi").dropna()["relu"]
    best = shapes.pivot(index="shape", columns="activation", values="last_ratio_lo").dropna()["silu"]
    sparser = int((shape["relu"] < shape["silu"]).sum())

    def inside(values, lo, hi):
        return bool(((values >= (1 - A0_BAND) * lo) & (values <= (1 + A0_BAND) * hi)).all())

    ours = (f"last-checkpoint ratio (seed means) ReLU {shape['relu'].min():.3f}-{shape['relu'].max():.3f}, SiLU "
            f"{shape['silu'].min():.3f}-{shape['silu'].max():.3f} over {len(shape)} shapes; ReLU sparser in "
            f"{sparser}/{len(shape)}, every seed in {int((worst < best).sum())}/{len(shape)}; {zoo.note()}")
    every = sparser == len(shape) > 0 and bool((worst < best).all())
    match = inside(shape["relu"], r_lo, r_hi) and inside(shape["silu"], s_lo, s_hi)
    return Verdict(PAPER_NAME, claim, paper, ours, decide(every and match, every), rule)


def training_trends(zoo: ScalingResult) -> Verdict:
    claim = ("Over training, ReLU's activation ratio decreases, A = exp(−c·D^α + b) + A₀, and SiLU's increases, "
             "A = −c·D^(−α) + A₀, each towards a limit A₀")
    law = PAPER[("relu", "0.1B")], PAPER[("silu", "0.1B")]
    paper = (f"fitted forms, e.g. 0.1B ReLU α={law[0].alpha}, b={law[0].b}, c={law[0].c}, A₀={law[0].a0}; "
             f"SiLU α={law[1].alpha}, c={law[1].c}, A₀={law[1].a0} (D in billions)")
    rule = ("Spearman ρ of the ratio (one c per run) over tokens per run, i.e. per seed: reproduced if every run moves "
            "in its form's direction and the fit identifies A₀ in every run; partly if the direction holds in more "
            "than half of one form's runs")
    if not zoo.available:
        return Verdict(PAPER_NAME, claim, paper, "no zoo table", "not attempted", rule)
    parts, every, most = [], True, False
    for form, group in zoo.fits.groupby("activation"):
        right = int((group["trend"] * DIRECTION[form] > 0).sum())
        parts.append(f"{FORM_NAME[form]}: {right}/{len(group)} runs in the form's direction (ρ {group['trend'].min():+.2f}"
                     f" to {group['trend'].max():+.2f}); " + zoo.limit_sentence(form, zoo.shapes[
                         zoo.shapes["activation"] == form]).rstrip("."))
        every &= right == len(group) and bool(group["a0_identified"].all())
        most |= right > len(group) / 2
    return Verdict(PAPER_NAME, claim, paper, "; ".join(parts) + f"; {zoo.note()}", decide(every, most), rule)


def width_depth(zoo: ScalingResult) -> Verdict:
    claim = "The limit activation ratio rises with the width/depth ratio up to a bottleneck, then plateaus"
    paper = "linear rise up to width/depth ≈ 114 (0.1B), flat beyond (shown, not tabulated)"
    rule = (f"Spearman ρ of the seed-mean last-checkpoint ratio against width/depth per activation: partly if ρ > 0 for both; "
            f"reproduced only if, in addition, ≥ {PLATEAU_SHAPES} ratios show the last step smaller than the first "
            "(a plateau); not reproduced if ρ ≤ 0 for either")
    along = zoo.along("ratio") if zoo.available else {}
    if len(along) < 2:
        return Verdict(PAPER_NAME, claim, paper, "fewer than 3 width/depth ratios per activation", "not attempted", rule)
    parts, rising, plateau = [], True, True
    for form, (group, rho) in along.items():
        values = list(group["last_ratio"])
        parts.append(f"{FORM_NAME[form]} {', '.join(f'{v:.3f} [{lo:.3f}, {hi:.3f}]' for v, lo, hi in zip(values, group['last_ratio_lo'], group['last_ratio_hi']))} at width/depth "
                     f"{', '.join(f'{v:.0f}' for v in group['width_depth'])} (ρ {rho:+.2f})")
        rising &= rho > 0
        plateau &= len(values) >= PLATEAU_SHAPES and abs(values[-1] - values[-2]) < abs(values[1] - values[0])
    return Verdict(PAPER_NAME, claim, paper, "; ".join(parts) + f"; {zoo.note()}", decide(rising and plateau, rising),
                   rule)


def scale_dependence(zoo: ScalingResult) -> Verdict:
    claim = "At a similar width/depth ratio, the limit activation ratio depends only weakly on parameter scale"
    spreads = {form: spread([law.a0 for (f, _), law in PAPER.items() if f == form]) for form in ("relu", "silu")}
    limit = max(spreads.values())
    paper = (f"A₀ over 0.1B-1.2B moves by {spreads['relu']:.0%} (ReLU) and {spreads['silu']:.0%} (SiLU) of its mean "
             "(published constants)")
    rule = (f"(max − min) / mean of the seed-mean last-checkpoint ratio along the scale axis: reproduced if ≤ {limit:.0%} "
            "(the paper's widest) for both activations; partly if for one")
    along = zoo.along("scale") if zoo.available else {}
    if not along:
        return Verdict(PAPER_NAME, claim, paper, "fewer than 3 scales per activation", "not attempted", rule)
    ours, weak = [], []
    for form, (group, _) in along.items():
        s = spread(list(group["last_ratio"]))
        weak.append(s <= limit)
        ours.append(f"{FORM_NAME[form]} {s:.0%} over {group['params'].min():,}-{group['params'].max():,} parameters "
                    f"(largest seed spread within a shape {(group['last_ratio_hi'] - group['last_ratio_lo']).max():.3f})")
    return Verdict(PAPER_NAME, claim, paper, "; ".join(ours) + f"; {zoo.note()}",
                   decide(all(weak) and len(weak) == 2, any(weak)), rule)


def comparable_loss(zoo: ScalingResult) -> Verdict:
    """ReLU's and SiLU's dense held-out loss at the last checkpoint, per shape, paired by seed."""
    claim = "ReLU models reach performance comparable to SiLU models (so their greater sparsity comes at no cost)"
    paper = "comparable loss and downstream scores of the ReLU and SiLU families (shown, not tabulated)"
    rule = (f"seed-paired perplexity ratio exp(L_ReLU − L_SiLU) at the last checkpoint per shape: reproduced if within "
            f"1 ± {COMPARABLE:.0%} for the mean and every seed in every shape; partly if the mean is within in more "
            "than half of the shapes; not reproduced otherwise")
    losses = zoo.losses() if zoo.available else pd.DataFrame()
    if losses.empty:
        return Verdict(PAPER_NAME, claim, paper, "no zoo table with both activations", "not attempted", rule)
    near = (losses["difference"].abs().apply(math.expm1) <= COMPARABLE)
    every = near & (losses[["difference_lo", "difference_hi"]].abs().max(axis=1).apply(math.expm1) <= COMPARABLE)
    ours = ("perplexity ReLU/SiLU " + ", ".join(
        f"{r['shape']} {math.exp(r['difference']):.3f} [{math.exp(r['difference_lo']):.3f}, "
        f"{math.exp(r['difference_hi']):.3f}]" for _, r in losses.iterrows()) + f" (loss {losses['relu'].min():.2f}-"
        f"{losses['relu'].max():.2f} vs {losses['silu'].min():.2f}-{losses['silu'].max():.2f} nats); {zoo.note()}")
    return Verdict(PAPER_NAME, claim, paper, ours, decide(bool(every.all()), near.sum() > len(near) / 2), rule)


def sparsing_verdicts(results: Sequence[ParetoResult], zoo: ScalingResult) -> list[Verdict]:
    """Every claim notebook 04 tests, in the order of the notebook."""
    return [cett_beats_baselines(results), relu_sparser(zoo), comparable_loss(zoo), training_trends(zoo),
            width_depth(zoo), scale_dependence(zoo)]
