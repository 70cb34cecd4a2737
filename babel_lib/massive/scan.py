"""Massive activations (Sun et al., 2024): scan the residual stream, locate them, and intervene on them.

A massive activation is an entry of a decoder block's output h (the residual stream) with |h| > `magnitude`
(100) and |h| >= `ratio` (1000) times the median of |h| over all tokens x features of that sequence at that
layer. The scan keeps, per sequence and layer and on the device, the `top_k` largest |h| with their token
position and feature dimension, and that median; results leave the device once, at the end of the run.
Sequences are equal-length windows, so there is no padding to exclude from the median.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from babel_lib.core import distributed
from babel_lib.core.batches import windows as token_windows
from babel_lib.core.evaluation import window_loss
from babel_lib.core.ffn import decoder_layers
from babel_lib.core.hooks import hooked, site
from babel_lib.core.models import run_decoder
from babel_lib.core.study import StudyParams, param
from babel_lib.errors import BabelError

KINDS = ("start", "delimiter", "other")


@dataclass(frozen=True)
class MassiveParams(StudyParams):
    """Notebook 03: the residual-stream scan, the massive-activation criterion and the follow-up analyses."""

    KIND: ClassVar[str] = "massive-scan"
    CODE: ClassVar[tuple[str, ...]] = ("babel_lib.massive.scan", "babel_lib.core.batches", "babel_lib.core.hooks")

    seq_len: int = param(128, ge=2)  # tokens per window (scan, attention and perplexity)
    scan_windows: int = param(2, ge=1)  # calibration windows per language, each starting at a paragraph
    scan_paragraphs: int = param(80, ge=1)  # calibration paragraphs per language to cut them from
    batch_size: int = param(8, ge=1)
    top_k: int = param(128, ge=1)  # entries of largest |h| kept per sequence and layer
    magnitude: float = param(100.0, gt=0)  # massive: |h| > magnitude ...
    median_ratio: float = param(1000.0, gt=0)  # ... and |h| >= median_ratio x the sequence's median |h| at that layer
    median_sample: int | None = param(None, ge=1)  # None = exact median; N = median of N sampled entries
    min_share: float = param(0.5, gt=0, le=1)  # a dimension's layers: massive in >= this share of sequences
    prompt: str = "Summer is warm. Winter is cold."
    surface_layer: int | None = param(None, ge=0)  # layer of the 3-D plot; None = middle of the strongest range
    ppl_windows: int = param(1, ge=1)  # held-out windows per language for perplexity
    ppl_paragraphs: int = param(40, ge=1)  # held-out paragraphs per language to cut them from
    attention_windows: int = param(1, ge=1)  # scan windows per language for the attention analysis


def paragraph_windows(tokenizer, texts: Sequence[str], seq_len: int, n_windows: int,
                      add_bos: bool | None = None) -> torch.Tensor:
    """`n_windows` windows [n, seq_len], each starting at a paragraph: the texts are split into n contiguous groups
    and each group gives its first window, so position 0 is a real start of text (the paper's setting)."""
    if n_windows < 1 or len(texts) < n_windows:
        raise BabelError(f"need at least {max(n_windows, 1)} paragraphs for {n_windows} windows, got {len(texts)}; "
                         "load more paragraphs or ask for fewer windows")
    bounds = [len(texts) * i // n_windows for i in range(n_windows + 1)]
    return torch.cat([token_windows(tokenizer, texts[a:b], seq_len, 1, add_bos) for a, b in zip(bounds, bounds[1:])])


def sample_index(n: int, d_model: int, size: int | None, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Flat indices of a sample of `size` distinct entries of a [T, d_model] state (n = T * d_model entries), or
    None (use every entry).

    A golden-ratio walk i * step mod n with step coprime to n: it spreads evenly over the tokens and, as
    d_model divides n, cycles through every feature.
    """
    if size is None or n <= size:
        return None
    if n % d_model:
        raise BabelError(f"n={n} entries is not a whole number of tokens of width {d_model}")
    step = round(n * (math.sqrt(5) - 1) / 2)
    while math.gcd(step, n) != 1:
        step += 1
    return torch.arange(size, device=device) * step % n


def median_abs(h: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Median of |h| over everything but the batch dimension (torch's lower median), exact or over a sample."""
    flat = h.reshape(h.shape[0], -1)
    if index is None:
        return flat.abs().median(dim=1).values.float()
    sample = flat.index_select(1, index).abs()
    return sample.sort(dim=1).values[:, (index.numel() - 1) // 2].float()


def top_entries(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k entries of largest |h| per sequence of h [B, T, D]: (signed values, positions, dims), each [B, k].

    Exact, and cheap on a GPU (only small top-k's): the k largest entries lie in the k tokens with the largest
    max |h| (each token ahead of such an entry's token holds a distinct, at-least-as-large entry), and within
    those tokens' rows among each row's k largest.
    """
    batch, seq, width = h.shape
    tokens = torch.linalg.vector_norm(h, ord=math.inf, dim=-1).topk(min(k, seq), dim=1).indices  # [B, k_tok]
    rows = h.gather(1, tokens[..., None].expand(-1, -1, width))  # [B, k_tok, D]
    per_row = rows.abs().topk(min(k, width), dim=-1)  # [B, k_tok, k_row]
    k_row = per_row.indices.shape[-1]
    best = per_row.values.reshape(batch, -1).topk(min(k, tokens.shape[1] * k_row), dim=1).indices
    slot, dims = best // k_row, per_row.indices.reshape(batch, -1).gather(1, best)
    values = rows.reshape(batch, -1).gather(1, slot * width + dims)
    return values.float(), tokens.gather(1, slot), dims


@dataclass
class Scan:
    """Per sequence and layer: the top_k entries of largest |h| (by |h|, descending) and the median of |h|."""

    values: torch.Tensor  # [N, L, K] float32, signed residual value
    positions: torch.Tensor  # [N, L, K] long, token position
    dims: torch.Tensor  # [N, L, K] long, feature dimension
    median: torch.Tensor  # [N, L] float32, median |h| over tokens x features
    ids: torch.Tensor  # [N, T] the token ids scanned

    @property
    def n_sequences(self) -> int:
        return self.values.shape[0]

    @property
    def n_layers(self) -> int:
        return self.values.shape[1]

    def magnitudes(self, k: int = 3) -> torch.Tensor:
        """The k largest |h| per sequence and layer [N, L, k] (top-1, top-2, ...)."""
        return self.values[..., :k].abs()

    def is_massive(self, magnitude: float = 100.0, ratio: float = 1000.0) -> torch.Tensor:
        """[N, L, K] bool: the entry is a massive activation by the paper's criterion."""
        size = self.values.abs()
        return (size > magnitude) & (size >= ratio * self.median[..., None])

    def saturated(self, magnitude: float = 100.0, ratio: float = 1000.0) -> int:
        """How many (sequence, layer) pairs have all top_k entries massive (there may be more: raise top_k)."""
        return int(self.is_massive(magnitude, ratio).all(dim=-1).sum())

    def subset(self, rows: torch.Tensor | Sequence[int]) -> Scan:
        """The scan of some sequences only."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return Scan(self.values[rows], self.positions[rows], self.dims[rows], self.median[rows], self.ids[rows])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "positions": self.positions, "dims": self.dims, "median": self.median,
                "ids": self.ids}


class ResidualScan:
    """Hooks on every block output that keep the scan statistics of each batch on the device."""

    def __init__(self, n_layers: int, top_k: int = 32, median_sample: int | None = None):
        if top_k < 3:
            raise BabelError(f"top_k={top_k} is too small; keep at least 3 entries (the paper plots top-1/2/3)")
        self.n_layers, self.top_k, self.median_sample = n_layers, top_k, median_sample
        self._layer: dict[int, tuple[torch.Tensor, ...]] = {}
        self._batches: list[tuple[torch.Tensor, ...]] = []
        self._index: dict[tuple[int, int], torch.Tensor | None] = {}

    def hooks(self) -> dict:
        return {site(layer, "hook_resid_post"): self._observer(layer) for layer in range(self.n_layers)}

    def _observer(self, layer: int):
        def observe(h: torch.Tensor) -> None:
            h = h.detach()
            key = (h.shape[1] * h.shape[2], h.shape[2])
            if key not in self._index:
                self._index[key] = sample_index(*key, self.median_sample, h.device)
            self._layer[layer] = (*top_entries(h, self.top_k), median_abs(h, self._index[key]))
        return observe

    def end_batch(self) -> None:
        """Stack this batch's layers into [B, L, ...] tensors, still on the device."""
        if sorted(self._layer) != list(range(self.n_layers)):
            raise BabelError("the scan saw only some layers of the batch; run the whole decoder under its hooks")
        per_layer = [self._layer[layer] for layer in range(self.n_layers)]
        self._batches.append(tuple(torch.stack(parts, dim=1) for parts in zip(*per_layer)))
        self._layer = {}

    def result(self, ids: torch.Tensor, rows: Sequence[int] | None = None) -> Scan:
        """Everything scanned so far, moved to the CPU in one go; `rows`: the sequences of `ids` this rank
        scanned, gathered from every rank (distributed.gather_rows)."""
        parts = (torch.cat(part) for part in zip(*self._batches))
        if rows is not None:
            parts = (distributed.gather_rows(part, rows, ids.shape[0]) for part in parts)
        values, positions, dims, median = (part.cpu() for part in parts)
        return Scan(values, positions, dims, median, ids.cpu())


@torch.no_grad()
def scan_residuals(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8, top_k: int = 32,
                   median_sample: int | None = None) -> Scan:
    """Scan the residual stream of every layer over equal-length windows [N, T] (no LM head).

    median_sample None takes the exact median over all T x d_model entries; an int takes it over a
    sample of that many entries (for long sequences on a GPU, where an exact median costs more than a layer).
    """
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise BabelError(f"windows must be a non-empty [N, seq_len] tensor of token ids, got shape "
                         f"{tuple(windows.shape)}")
    device = next(model.parameters()).device
    scan = ResidualScan(len(decoder_layers(model)), top_k, median_sample)
    if math.ceil(windows.shape[0] / batch_size) < distributed.world_size():  # every rank sees this: none waits
        raise BabelError(f"{windows.shape[0]} windows make fewer batches of {batch_size} than the "
                         f"{distributed.world_size()} processes; use fewer processes or a smaller batch_size")
    starts = distributed.shard(range(0, windows.shape[0], batch_size))  # under torchrun: this rank's batches

    def work():
        with hooked(model, scan.hooks()):
            for _, start in starts:
                run_decoder(model, windows[start : start + batch_size].to(device))
                scan.end_batch()

    distributed.together(work)
    rows = [i for _, start in starts for i in range(start, min(start + batch_size, windows.shape[0]))]
    return scan.result(windows, rows if distributed.active() else None)


@torch.no_grad()
def residual_at(model: nn.Module, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The residual stream [B, T, D] after block `layer` for a few short inputs (for the 3-D plot only)."""
    captured: list[torch.Tensor] = []
    with hooked(model, {site(layer, "hook_resid_post"): lambda h: captured.append(h.detach().float().cpu())}):
        run_decoder(model, ids.to(next(model.parameters()).device))
    return captured[0]


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


def layer_share(scan: Scan, dim: int, magnitude: float = 100.0, ratio: float = 1000.0) -> torch.Tensor:
    """[L] the share of sequences in which `dim` is massive at each layer."""
    hit = (scan.is_massive(magnitude, ratio) & (scan.dims == dim)).any(dim=-1)
    return hit.float().mean(dim=0)


def summarise(scan: Scan, found: Sequence[Massive], magnitude: float = 100.0, ratio: float = 1000.0,
              min_share: float = 0.5) -> list[dict]:
    """One row per massive dimension: layer range (any, and where in >= min_share of sequences), located
    activations per token kind, share of sequences, positions per sequence that has it, largest |value|;
    sorted by share then size."""
    rows = []
    for dim in sorted({m.dim for m in found}):
        mine = [m for m in found if m.dim == dim]
        core = (layer_share(scan, dim, magnitude, ratio) >= min_share).nonzero().flatten().tolist()
        rows.append({"dim": dim, "first_layer": min(m.first_layer for m in mine),
                     "last_layer": max(m.last_layer for m in mine),
                     "core_first": core[0] if core else None, "core_last": core[-1] if core else None,
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


def head_averaged_attention(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Attention probabilities averaged over heads, [B, L, T, T] float32 (needs attn_implementation='eager')."""
    with torch.no_grad():
        out = model.base_model(input_ids=ids.to(next(model.parameters()).device), output_attentions=True,
                               use_cache=False)
    if not out.attentions or any(a is None for a in out.attentions):
        raise BabelError("this model returned no attention probabilities; load it with "
                         "load_model(name, attn_implementation='eager')")
    return torch.stack([a.float().mean(dim=1) for a in out.attentions], dim=1).cpu()


def attention_mass(attention: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, L] the attention mass on the marked key positions (positions [B, T] bool), averaged over queries
    1..T-1 (query 0 can only attend to itself)."""
    on_marked = (attention * positions[:, None, None, :].to(attention.dtype)).sum(dim=-1)  # [B, L, T]
    return on_marked[..., 1:].mean(dim=-1)


def uniform_mass(positions: torch.Tensor) -> torch.Tensor:
    """[B] what attention_mass would be if every query attended uniformly to all earlier tokens (the baseline)."""
    seen = positions.float().cumsum(dim=1)
    return (seen / torch.arange(1, positions.shape[1] + 1))[:, 1:].mean(dim=1)


def language_windows(tokenizer, texts: Mapping[str, Sequence[str]], seq_len: int, n_windows: int,
                     add_bos: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """paragraph_windows of every language stacked: (windows [n_lang * n_windows, seq_len], language index [N])."""
    parts = [paragraph_windows(tokenizer, list(paragraphs), seq_len, n_windows, add_bos)
             for paragraphs in texts.values()]
    index = torch.arange(len(parts)).repeat_interleave(torch.tensor([len(p) for p in parts]))
    return torch.cat(parts), index


def reference_layer(target: Target) -> int:
    """The middle of a target's layer range: where its values are compared across inputs and languages."""
    return (target.first_layer + target.last_layer) // 2


def constancy(scan: Scan, kinds: Sequence[Sequence[str]], targets: Sequence[Target], magnitude: float = 100.0,
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
               min_share: float = 0.5) -> list[set[int]]:
    """The massive dimensions (targets) found in the sequences of each group (e.g. each language) on their own."""
    out = []
    for g in range(int(groups.max()) + 1):
        sub = scan.subset((groups == g).nonzero().flatten())
        summary = summarise(sub, locate(sub, tokenizer, magnitude, ratio), magnitude, ratio, min_share)
        out.append({t.dim for t in targets_from(summary)})
    return out


def between_within(values: Sequence[torch.Tensor]) -> dict[str, float]:
    """Coefficient of variation of the group means (between groups) and the mean within-group CV."""
    means = torch.stack([v.double().mean() for v in values])
    within = [float(v.double().std() / v.double().mean().abs()) for v in values if v.numel() > 1]
    return {"between_cv": float(means.std() / means.mean().abs()) if len(values) > 1 else float("nan"),
            "within_cv": sum(within) / len(within) if within else float("nan")}


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
