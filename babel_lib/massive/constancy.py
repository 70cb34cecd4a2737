"""Massive activations, step 5: are they constant? Across inputs (mean, std and coefficient of variation of each
one over sequences) and across languages (which dimensions each language has, and how the value of the largest
one varies between and within languages)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from babel_lib.massive.locate import Located, Target, locate, reference_layer, summarize, target_values, targets_from
from babel_lib.massive.scan import Scan


def constancy_rows(scan: Scan, kinds: Sequence[Sequence[str]], targets: Sequence[Target], magnitude: float = 100.0,
              ratio: float = 1000.0) -> list[dict]:
    """Per target and token kind, at the target's reference layer: how many entries, their mean, std and
    coefficient of variation (std / |mean|) across sequences."""
    rows = []
    for target in targets:
        layer = reference_layer(target)
        for kind, (_, values) in target_values(scan, kinds, target, layer, magnitude, ratio).items():
            std = float(values.std()) if values.numel() > 1 else float("nan")
            mean = float(values.mean())
            rows.append({"dim": target.dim, "kind": kind, "layer": layer, "n": values.numel(), "mean": mean,
                         "std": std, "cv": std / abs(mean)})
    return rows


def group_dims(scan: Scan, groups: torch.Tensor, tokenizer, magnitude: float = 100.0, ratio: float = 1000.0,
               min_share: float = 0.5, max_positions: int | None = None) -> list[set[int]]:
    """The massive dimensions (targets) found in the sequences of each group (e.g. each language) on their own."""
    out = []
    for g in range(int(groups.max()) + 1):
        sub = scan.subset((groups == g).nonzero().flatten())
        summary = summarize(sub, locate(sub, tokenizer, magnitude, ratio), magnitude, ratio, min_share, max_positions)
        out.append({t.dim for t in targets_from(summary)})
    return out


def between_within(values: Sequence[torch.Tensor]) -> dict[str, float]:
    """Coefficient of variation of the group means (between groups) and the mean within-group CV."""
    means = torch.stack([v.double().mean() for v in values])
    within = [float(v.double().std() / v.double().mean().abs()) for v in values if v.numel() > 1]
    return {"between_cv": float(means.std() / means.mean().abs()) if len(values) > 1 else float("nan"),
            "within_cv": sum(within) / len(within) if within else float("nan")}


@dataclass
class Constancy:
    """Per target and token kind of one run: the spread of its value over sequences at its reference layer."""

    label: str
    rows: list[dict]

    def findings(self) -> list[str]:
        out = []
        varied = [r for r in self.rows if r["n"] > 1 and r["std"] > 0]
        fixed = [f"dim {r['dim']} on {r['kind']}" for r in self.rows if r["n"] > 1 and r["std"] == 0]
        if fixed:
            out.append(f"{self.label}: identical in every sequence: {', '.join(fixed)}.")
        if varied:
            tight = min(varied, key=lambda r: r["cv"])
            out.append(f"{self.label}: the steadiest varying massive activation, dim {tight['dim']} on {tight['kind']} "
                       f"tokens at layer {tight['layer']}, is {tight['mean']:,.1f} ± {tight['std']:,.1f} over "
                       f"{tight['n']} occurrences (CV {tight['cv']:.1%}); the CVs range from {tight['cv']:.1%} to "
                       f"{max(r['cv'] for r in varied):.1%}.")
        return out


def constancy(located: Located, tokenizer) -> Constancy:
    """The study: constancy_rows of every target of a located scan."""
    return Constancy(located.label, constancy_rows(located.scan.scan, located.kinds(tokenizer), located.targets,
                                                   **located.criterion.criterion))


@dataclass
class Languages:
    """The massive dimensions of each language, and the value of the largest one per language."""

    model: str
    languages: list[str]  # every language scanned
    presence: dict[int, int]  # dim -> in how many languages it is a target
    dim: int  # the largest massive activation's dimension ...
    layer: int  # ... and its reference layer
    label: str  # which activation `values` holds (dim, kind, layer, BOS)
    values: dict[str, torch.Tensor]  # language -> its values (languages where it occurs; empty if none)

    def spread(self) -> dict[str, float]:
        return between_within(list(self.values.values()))

    def findings(self) -> list[str]:
        if not self.values:
            return [f"{self.model}: dim {self.dim} is not massive at layer {self.layer} in any sequence "
                    f"{self.label.rsplit(', ', 1)[-1]}."]
        spread = self.spread()
        within = "n/a (one value per language)" if math.isnan(spread["within_cv"]) else f"{spread['within_cv']:.1%}"
        dims = ", ".join(f"dim {d} in {k} of {len(self.languages)} languages" for d, k in self.presence.items())
        return [f"{self.model}: massive dimensions per language: {dims}. The value of {self.label} occurs in "
                f"{len(self.values)} of {len(self.languages)} languages; the language means vary by CV "
                f"{spread['between_cv']:.1%} against a mean within-language CV of {within}."]


def across_languages(located: Located, tokenizer, languages: Sequence[str]) -> Languages | None:
    """The study: each language's targets from its own windows, and the value of the run's largest massive
    activation on its most frequent token kind at its reference layer, per language (None without a target)."""
    target = located.strongest
    if target is None:
        return None
    scan, lang, criterion = located.scan.scan, located.scan.language, located.criterion.criterion
    per_language = group_dims(scan, lang, tokenizer, min_share=located.criterion.min_share,
                              max_positions=located.criterion.max_positions, **criterion)
    presence = {dim: sum(dim in dims for dims in per_language) for dim in sorted(set.union(*per_language))}
    layer = reference_layer(target)
    by_kind = target_values(scan, located.kinds(tokenizer), target, layer, **criterion)
    bos = f"{'with' if located.scan.run.bos else 'without'} BOS"
    if not by_kind:
        return Languages(located.scan.run.model, list(languages), presence, target.dim, layer,
                         f"dim {target.dim}, layer {layer}, {bos}", {})
    kind = max(by_kind, key=lambda k: by_kind[k][0].numel())
    seq, vals = by_kind[kind]
    values = {code: vals[lang[seq] == i] for i, code in enumerate(languages) if (lang[seq] == i).any()}
    return Languages(located.scan.run.model, list(languages), presence, target.dim, layer,
                     f"dim {target.dim} on {kind} tokens, layer {layer}, {bos}", values)
