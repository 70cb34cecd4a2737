"""Massive activations, step 2: locate them in a scan by the paper's criterion.

A massive activation is an entry of a decoder block's output h with |h| > `magnitude` (100) and |h| >=
`median_ratio` (1000) times the median of |h| over all tokens x features of that sequence at that layer. Each is
located by feature dimension, token position, token text and kind (start, delimiter, other) and the layers where
it meets the criterion; the dimensions massive in most sequences become the targets of the later analyses.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from babel_lib.core.study import StudyParams, param
from babel_lib.massive.scan import Scan, ScanResult

KINDS = ("start", "delimiter", "other")


@dataclass(frozen=True)
class CriterionParams(StudyParams):
    """Notebook 03: the massive-activation criterion and which dimensions count as targets."""

    KIND: ClassVar[str] = "massive-criterion"
    CODE: ClassVar[tuple[str, ...]] = ("babel_lib.massive.locate",)

    magnitude: float = param(100.0, gt=0)  # massive: |h| > magnitude ...
    median_ratio: float = param(1000.0, gt=0)  # ... and |h| >= median_ratio x the sequence's median |h| at that layer
    min_share: float = param(0.5, gt=0, le=1)  # a dimension's layers: massive in >= this share of sequences
    # ... on at most this many positions of a sequence: more is an outlier feature (a dimension large on most
    # tokens), not a massive activation (the paper's sit on the starting token and the first delimiter)
    max_positions: int = param(2, ge=1)

    @property
    def criterion(self) -> dict[str, float]:
        """The keyword arguments of the criterion (magnitude, ratio) for the functions below."""
        return {"magnitude": self.magnitude, "ratio": self.median_ratio}


def token_kind(text: str, position: int) -> str:
    """start (position 0), delimiter (a token of only punctuation, or only whitespace with a newline), or other."""
    if position == 0:
        return "start"
    stripped = text.strip()
    if not stripped and "\n" in text:
        return "delimiter"
    if stripped and all(unicodedata.category(ch).startswith("P") for ch in stripped):
        return "delimiter"
    return "other"


def token_texts(tokenizer, ids: torch.Tensor) -> list[list[str]]:
    """The decoded text of every token of ids [N, T] (each distinct id decoded once)."""
    table = {int(i): tokenizer.decode([int(i)]) for i in ids.unique()}
    return [[table[i] for i in row] for row in ids.tolist()]


def token_kinds(tokenizer, ids: torch.Tensor) -> list[list[str]]:
    """The kind (start, delimiter, other) of every token of ids [N, T]."""
    return [[token_kind(text, p) for p, text in enumerate(row)] for row in token_texts(tokenizer, ids)]


@dataclass(frozen=True)
class Entries:
    """Every massive entry of a scan in long format (1-D tensors of equal length)."""

    sequence: torch.Tensor
    layer: torch.Tensor
    dim: torch.Tensor
    position: torch.Tensor
    value: torch.Tensor


def massive_entries(scan: Scan, magnitude: float = 100.0, ratio: float = 1000.0) -> Entries:
    """The massive entries of `scan` by the paper's criterion."""
    seq, layer, slot = scan.is_massive(magnitude, ratio).nonzero(as_tuple=True)
    return Entries(seq, layer, scan.dims[seq, layer, slot], scan.positions[seq, layer, slot],
                   scan.values[seq, layer, slot])


@dataclass(frozen=True)
class Massive:
    """One massive activation: a (sequence, dimension, token position) flagged at one or more layers."""

    sequence: int
    dim: int
    position: int
    token: str
    kind: str
    first_layer: int
    last_layer: int
    n_layers: int
    peak: float  # the signed value where |h| is largest


def locate(scan: Scan, tokenizer, magnitude: float = 100.0, ratio: float = 1000.0) -> list[Massive]:
    """Every massive activation of `scan`, with its layer range, token text and token kind."""
    entries = massive_entries(scan, magnitude, ratio)
    texts = token_texts(tokenizer, scan.ids)
    groups: dict[tuple[int, int, int], list[tuple[int, float]]] = {}
    for s, l, d, p, v in zip(*(t.tolist() for t in (entries.sequence, entries.layer, entries.dim,
                                                       entries.position, entries.value))):
        groups.setdefault((s, d, p), []).append((l, v))
    found = []
    for (s, d, p), hits in sorted(groups.items()):
        layers = [l for l, _ in hits]
        found.append(Massive(s, d, p, texts[s][p], token_kind(texts[s][p], p), min(layers), max(layers),
                             len(layers), max(hits, key=lambda hit: abs(hit[1]))[1]))
    return found


def layer_positions(scan: Scan, dim: int, magnitude: float = 100.0, ratio: float = 1000.0) -> torch.Tensor:
    """[N, L] on how many token positions `dim` is massive in each sequence at each layer."""
    return (scan.is_massive(magnitude, ratio) & (scan.dims == dim)).sum(dim=-1)


def layer_share(scan: Scan, dim: int, magnitude: float = 100.0, ratio: float = 1000.0,
                max_positions: int | None = None) -> torch.Tensor:
    """[L] the share of sequences in which `dim` is massive at each layer (on at most `max_positions` positions of
    the sequence, when given)."""
    count = layer_positions(scan, dim, magnitude, ratio)
    hit = (count > 0) if max_positions is None else (count > 0) & (count <= max_positions)
    return hit.float().mean(dim=0)


def longest_run(layers: torch.Tensor) -> list[int]:
    """The longest run of consecutive True layers of a [L] bool (the earliest of equal runs), as a list."""
    best: list[int] = []
    run: list[int] = []
    for layer, on in enumerate(layers.tolist()):
        run = run + [layer] if on else []
        if len(run) > len(best):
            best = run
    return best


def summarize(scan: Scan, found: Sequence[Massive], magnitude: float = 100.0, ratio: float = 1000.0,
              min_share: float = 0.5, max_positions: int | None = None) -> list[dict]:
    """One row per massive dimension: layer range (any; core: the longest run of layers where it is massive on at
    most max_positions positions in >= min_share of sequences; outlier: layers where it is massive on more positions
    in >= min_share of sequences, an outlier feature rather than a massive activation), located activations per token
    kind, share of sequences, positions per sequence that has it, largest |value|; sorted by share then size."""
    rows = []
    for dim in sorted({m.dim for m in found}):
        mine = [m for m in found if m.dim == dim]
        core = longest_run(layer_share(scan, dim, magnitude, ratio, max_positions) >= min_share)
        outlier = [] if max_positions is None else \
            ((layer_positions(scan, dim, magnitude, ratio) > max_positions).float().mean(dim=0) >= min_share
             ).nonzero().flatten().tolist()
        rows.append({"dim": dim, "first_layer": min(m.first_layer for m in mine),
                     "last_layer": max(m.last_layer for m in mine),
                     "core_first": core[0] if core else None, "core_last": core[-1] if core else None,
                     "outlier_layers": outlier,
                     **{kind: sum(m.kind == kind for m in mine) for kind in KINDS},
                     "sequences": len({m.sequence for m in mine}) / scan.n_sequences,
                     "positions_per_sequence": len(mine) / len({m.sequence for m in mine}),
                     "max_abs": max(abs(m.peak) for m in mine)})
    return sorted(rows, key=lambda r: (-r["sequences"], -r["max_abs"]))


@dataclass(frozen=True)
class Target:
    """A massive dimension to intervene on, over the layers where it is massive in most sequences."""

    dim: int
    first_layer: int
    last_layer: int

    def layers(self, where: str) -> range:
        return range(self.first_layer, self.first_layer + 1) if where == "first" else \
            range(self.first_layer, self.last_layer + 1)


def targets_from(summary: Sequence[dict]) -> list[Target]:
    """The dimensions of a summary that are massive in at least min_share of sequences at some layer."""
    return [Target(r["dim"], r["core_first"], r["core_last"]) for r in summary if r["core_first"] is not None]


def target_values(scan: Scan, kinds: Sequence[Sequence[str]], target: Target, layer: int,
                  magnitude: float = 100.0, ratio: float = 1000.0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per token kind: (sequence index, signed value) of the target's massive entries at `layer`."""
    entries = massive_entries(scan, magnitude, ratio)
    keep = (entries.dim == target.dim) & (entries.layer == layer)
    seq, pos, val = entries.sequence[keep], entries.position[keep], entries.value[keep]
    labels = [kinds[s][p] for s, p in zip(seq.tolist(), pos.tolist())]
    out = {}
    for kind in KINDS:
        mask = torch.tensor([k == kind for k in labels], dtype=torch.bool)
        if mask.any():
            out[kind] = (seq[mask], val[mask])
    return out


def reference_layer(target: Target) -> int:
    """The middle of a target's layer range: where its values are compared across inputs and languages."""
    return (target.first_layer + target.last_layer) // 2




def layer_list(layers: Sequence[int]) -> str:
    """'1-3, 5' for [1, 2, 3, 5]."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        start = layer if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(f"{start}" if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(parts)


@dataclass
class Located:
    """The massive activations of one scan: every one located, a row per dimension, and the targets."""

    scan: ScanResult
    criterion: CriterionParams
    found: list[Massive]
    summary: list[dict[str, Any]]
    targets: list[Target]

    @property
    def label(self) -> str:
        return self.scan.run.label

    @property
    def core(self) -> list[dict[str, Any]]:
        """The summary rows of the target dimensions (massive on at most max_positions positions in >= min_share of
        sequences at some layer)."""
        return [r for r in self.summary if r["core_first"] is not None]

    @property
    def strongest(self) -> Target | None:
        """The target with the largest |value|, or None when there is no target."""
        if not self.core:
            return None
        top = max(self.core, key=lambda r: r["max_abs"])
        return next(t for t in self.targets if t.dim == top["dim"])

    def in_range(self) -> list[Massive]:
        """The located activations of the target dimensions that are massive within their target's layer range
        (not only at layers where the dimension is an outlier feature)."""
        ranges = {t.dim: t for t in self.targets}
        return [m for m in self.found if m.dim in ranges
                and m.first_layer <= ranges[m.dim].last_layer and m.last_layer >= ranges[m.dim].first_layer]

    def kinds(self, tokenizer) -> list[list[str]]:
        return token_kinds(tokenizer, self.scan.scan.ids)

    def largest(self, n: int = 8) -> list[Massive]:
        """The n located activations of largest |peak|."""
        return sorted(self.found, key=lambda m: -abs(m.peak))[:n]

    def findings(self) -> list[str]:
        out = []
        saturated = self.scan.scan.saturated(**self.criterion.criterion)
        if saturated:
            out.append(f"warning: {self.label}: {saturated} (sequence, layer) pairs have all top_k="
                       f"{self.scan.params.top_k} entries massive; raise top_k to see them all")
        for row in self.summary:
            if row["outlier_layers"]:
                out.append(f"{self.label}: dim {row['dim']} is an outlier feature at layer(s) "
                           f"{layer_list(row['outlier_layers'])}: massive on more than {self.criterion.max_positions} "
                           "positions in most sequences there, so those layers are not part of its massive range.")
        if not self.core:
            return out + [f"{self.label}: no dimension is massive in at least {self.criterion.min_share:.0%} of the "
                          "sequences."]
        top = max(self.core, key=lambda r: r["max_abs"])
        kinds = ", ".join(f"{top[k]} {k}" for k in KINDS if top[k])
        out.append(f"{self.label}: {len(self.core)} massive dimension(s) {sorted(r['dim'] for r in self.core)}; the "
                   f"largest, dim {top['dim']} (|h| up to {top['max_abs']:,.0f}), is massive from layer "
                   f"{top['core_first']} to {top['core_last']} in most sequences, found in {top['sequences']:.0%} of "
                   f"them ({kinds}).")
        return out


def find(result: ScanResult, tokenizer, params: CriterionParams) -> Located:
    """The study: locate the massive activations of a scan, summarize them per dimension, pick the targets."""
    found = locate(result.scan, tokenizer, **params.criterion)
    summary = summarize(result.scan, found, min_share=params.min_share, max_positions=params.max_positions,
                        **params.criterion)
    return Located(result, params, found, summary, targets_from(summary))
