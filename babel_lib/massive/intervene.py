"""Massive activations, step 3: set them to zero or to their mean and measure perplexity (the paper's test of
whether they act as fixed biases), at their first layer and, as the stronger control, at every layer."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from babel_lib.core.artefacts import ArtefactStore
from babel_lib.core.evaluation import window_loss
from babel_lib.core.hooks import hooked, site
from babel_lib.core.models import LoadedModel, run_decoder
from babel_lib.core.study import StudyParams, param
from babel_lib.errors import BabelError
from babel_lib.massive.locate import Located, Target
from babel_lib.massive.scan import median_abs, paragraph_windows


@dataclass(frozen=True)
class InterventionParams(StudyParams):
    """Notebook 03: the held-out windows the interventions are measured on."""

    KIND: ClassVar[str] = "massive-intervention"
    CODE: ClassVar[tuple[str, ...]] = ("babel_lib.massive.intervene", "babel_lib.massive.locate",
                                       "babel_lib.massive.scan", "babel_lib.core.evaluation", "babel_lib.core.hooks")

    ppl_windows: int = param(1, ge=1)  # held-out windows per language for perplexity
    ppl_paragraphs: int = param(40, ge=1)  # held-out paragraphs per language to cut them from


MODES = ("zero", "mean", "observe")
WHERE = ("first", "every")


class MassiveEdit:
    """Hooks that pick each target's massive entries at its first layer, per input, and zero them, set them to a
    mean, or only observe them (accumulating their per-layer sums, for the means).

    Selection: at the target's first layer, the entries of its dimension that meet the paper's criterion in the
    hidden state that reaches that layer; the same (sequence, position) entries are edited at later layers
    (where="every"). Means are per layer, target and position class (0 = the start position, 1 = later ones).
    """

    def __init__(self, targets: Sequence[Target], mode: str, where: str = "first", means: torch.Tensor | None = None,
                 magnitude: float = 100.0, ratio: float = 1000.0):
        if mode not in MODES or where not in WHERE:
            raise BabelError(f"unknown intervention mode={mode!r} where={where!r}; use mode in {MODES}, "
                             f"where in {WHERE}")
        if mode == "mean" and means is None:
            raise BabelError("mode='mean' needs the means; measure them with measure_means(...) first")
        if not targets:
            raise BabelError("no massive dimensions to intervene on; scan the model first (targets_from(summary))")
        self.targets, self.mode, self.magnitude, self.ratio = list(targets), mode, magnitude, ratio
        self.means = means
        span = "every" if mode == "observe" else where
        self.at: dict[int, list[int]] = {}
        for j, target in enumerate(self.targets):
            for layer in target.layers(span):
                self.at.setdefault(layer, []).append(j)
        self.masks: list[torch.Tensor | None] = [None] * len(self.targets)
        self.n_layers = max(target.last_layer for target in self.targets) + 1
        self.sums: torch.Tensor | None = None  # [n_layers, n_targets, 2] (observe mode)
        self.counts: torch.Tensor | None = None

    def hooks(self) -> dict:
        return {site(layer, "hook_resid_post"): self._hook(layer) for layer in sorted(self.at)}

    def _select(self, layer: int, h: torch.Tensor) -> None:
        starting = [j for j in self.at[layer] if self.targets[j].first_layer == layer]
        if not starting:
            return
        median = median_abs(h)
        for j in starting:
            size = h[..., self.targets[j].dim].abs()
            self.masks[j] = (size > self.magnitude) & (size >= self.ratio * median[:, None].to(size.dtype))

    def _hook(self, layer: int):
        def edit(h: torch.Tensor) -> torch.Tensor | None:
            self._select(layer, h)
            position_class = (torch.arange(h.shape[1], device=h.device) > 0).long()
            if self.mode == "observe":
                self._accumulate(layer, h, position_class)
                return None
            out = h.clone()
            for j in self.at[layer]:
                column = out[..., self.targets[j].dim]
                if self.mode == "zero":
                    new = torch.zeros_like(column)
                else:
                    new = self.means[layer, j].to(h.device, h.dtype)[position_class].expand_as(column)
                out[..., self.targets[j].dim] = torch.where(self.masks[j], new, column)
            return out
        return edit

    def _accumulate(self, layer: int, h: torch.Tensor, position_class: torch.Tensor) -> None:
        if self.sums is None:
            shape = (self.n_layers, len(self.targets), 2)
            self.sums = torch.zeros(shape, dtype=torch.float64, device=h.device)
            self.counts = torch.zeros(shape, dtype=torch.float64, device=h.device)
        for j in self.at[layer]:
            mask = self.masks[j]
            column = h[..., self.targets[j].dim].double() * mask
            for c in (0, 1):
                in_class = position_class == c
                self.sums[layer, j, c] += column[:, in_class].sum()
                self.counts[layer, j, c] += mask[:, in_class].sum()


@torch.no_grad()
def measure_means(model: nn.Module, windows: torch.Tensor, targets: Sequence[Target], *, batch_size: int = 8,
                  magnitude: float = 100.0, ratio: float = 1000.0) -> torch.Tensor:
    """Mean value [L, n_targets, 2] of each target's selected entries per layer and position class (start, later),
    on calibration windows; a class never seen takes the target's pooled mean at that layer."""
    edit = MassiveEdit(targets, "observe", magnitude=magnitude, ratio=ratio)
    device = next(model.parameters()).device
    with hooked(model, edit.hooks()):
        for start in range(0, windows.shape[0], batch_size):
            run_decoder(model, windows[start : start + batch_size].to(device))
    pooled = edit.sums.sum(-1, keepdim=True) / edit.counts.sum(-1, keepdim=True)
    means = torch.where(edit.counts > 0, edit.sums / edit.counts.clamp(min=1), pooled)
    for j, target in enumerate(targets):
        if not bool(edit.counts[target.first_layer, j].sum() > 0):
            raise BabelError(f"dimension {target.dim} is never massive at layer {target.first_layer} in the "
                             "calibration windows; use more calibration windows or other targets")
    return means.float().cpu()


def perplexity(mean_nll: float) -> float:
    """exp(mean NLL), inf when it overflows (zeroing massive activations can wreck a model)."""
    return math.exp(mean_nll) if mean_nll < 700 else math.inf



CONDITIONS = {"original": None, "zero, first layer": ("zero", "first"), "mean, first layer": ("mean", "first"),
              "zero, every layer": ("zero", "every"), "mean, every layer": ("mean", "every")}


def intervention_nll(model: nn.Module, windows: Mapping[str, torch.Tensor], targets: Sequence[Target],
                     means: torch.Tensor, *, batch_size: int = 4, magnitude: float = 100.0,
                     ratio: float = 1000.0) -> dict[str, dict[str, float]]:
    """Mean next-token NLL per condition (CONDITIONS) and language on fixed-length windows."""
    out: dict[str, dict[str, float]] = {}
    for name, condition in CONDITIONS.items():
        hooks = {} if condition is None else \
            MassiveEdit(targets, *condition, means=means, magnitude=magnitude, ratio=ratio).hooks()
        with hooked(model, hooks):
            out[name] = {lang: window_loss(model, w, batch_size=batch_size).mean for lang, w in windows.items()}
    return out


@dataclass
class Interventions:
    """Perplexity per condition (CONDITIONS) and language of one run."""

    label: str
    seq_len: int
    nll: dict[str, dict[str, float]]  # condition -> language -> mean next-token NLL

    def __post_init__(self) -> None:
        self.nll = {c: self.nll[c] for c in CONDITIONS if c in self.nll}  # CONDITIONS order (JSON sorts keys)

    @property
    def perplexity(self) -> dict[str, dict[str, float]]:
        return {cond: {lang: perplexity(v) for lang, v in per.items()} for cond, per in self.nll.items()}

    def median(self, condition: str) -> float:
        """The median perplexity over languages under `condition`."""
        return float(torch.tensor(list(self.perplexity[condition].values())).median())

    def spread(self, condition: str) -> tuple[float, float]:
        """The lowest and highest perplexity over languages under `condition`."""
        values = list(self.perplexity[condition].values())
        return min(values), max(values)

    def findings(self) -> list[str]:
        n = len(next(iter(self.nll.values())))
        return [f"{self.label}: median perplexity over {n} languages at seq_len {self.seq_len}: "
                + "; ".join(f"{c} {self.median(c):,.2f}" for c in self.nll) + "."]


def interventions(store: ArtefactStore, lm: LoadedModel, params: InterventionParams, located: Located,
                  heldout: Mapping[str, Sequence[str]]) -> Interventions | None:
    """The study: means on the scan's calibration windows, then NLL per condition on `params.ppl_windows` held-out
    windows per language of `heldout` (language -> paragraphs), cached; None when the scan found no target."""
    if not located.targets:
        return None
    scan, bos, criterion = located.scan, located.scan.run.bos, located.criterion.criterion
    key = params.key(scan=scan.key, criterion=located.criterion.as_dict(), targets=[vars(t) for t in located.targets],
                     heldout=list(heldout))

    def compute():
        means = measure_means(lm.model, scan.scan.ids, located.targets, batch_size=scan.params.batch_size, **criterion)
        windows = {lang: paragraph_windows(lm.tokenizer, texts, scan.params.seq_len, params.ppl_windows, bos)
                   for lang, texts in heldout.items()}
        return {"means": means}, {"nll": intervention_nll(lm.model, windows, located.targets, means, **criterion)}

    _, meta = store.cached(params.KIND, key, compute)
    return Interventions(located.label, scan.params.seq_len, meta["nll"])
