"""Massive activations (Sun et al., 2024), step 1: scan the residual stream of every layer.

The scan keeps, per sequence and layer and on the device, the `top_k` largest |h| of a decoder block's output h
(the residual stream) with their token position and feature dimension, and the median of |h| over all tokens x
features; results leave the device once, at the end of the run. Sequences are equal-length windows, so there is
no padding to exclude from the median. `scan(store, lm, params, ...)` is the study: cached, keyed by its
parameters, the model and the corpus.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from babel_lib.core import distributed
from babel_lib.core.artefacts import ArtefactStore
from babel_lib.core.batches import adds_bos
from babel_lib.core.batches import windows as token_windows
from babel_lib.core.ffn import decoder_layers
from babel_lib.core.hooks import hooked, site
from babel_lib.core.models import LoadedModel, run_decoder
from babel_lib.core.study import StudyParams, param
from babel_lib.errors import BabelError


@dataclass(frozen=True)
class ScanParams(StudyParams):
    """Notebook 03: which windows the residual stream is scanned on, and what the scan keeps."""

    KIND: ClassVar[str] = "massive-scan"
    CODE: ClassVar[tuple[str, ...]] = ("babel_lib.massive.scan", "babel_lib.core.batches", "babel_lib.core.hooks")

    seq_len: int = param(128, ge=2)  # tokens per window (scan, attention and perplexity)
    scan_windows: int = param(2, ge=1)  # calibration windows per language, each starting at a paragraph
    scan_paragraphs: int = param(80, ge=1)  # calibration paragraphs per language to cut them from
    batch_size: int = param(8, ge=1)
    top_k: int = param(128, ge=3)  # entries of largest |h| kept per sequence and layer
    median_sample: int | None = param(None, ge=1)  # None = exact median; N = median of N sampled entries


def paragraph_windows(tokenizer, texts: Sequence[str], seq_len: int, n_windows: int,
                      add_bos: bool | None = None) -> torch.Tensor:
    """`n_windows` windows [n, seq_len], each starting at a paragraph: the texts are split into n contiguous groups
    and each group gives its first window, so position 0 is a real start of text (the paper's setting)."""
    if n_windows < 1 or len(texts) < n_windows:
        raise BabelError(f"need at least {max(n_windows, 1)} paragraphs for {n_windows} windows, got {len(texts)}; "
                         "load more paragraphs or ask for fewer windows")
    bounds = [len(texts) * i // n_windows for i in range(n_windows + 1)]
    return torch.cat([token_windows(tokenizer, texts[a:b], seq_len, 1, add_bos) for a, b in zip(bounds, bounds[1:])])


def language_windows(tokenizer, texts: Mapping[str, Sequence[str]], seq_len: int, n_windows: int,
                     add_bos: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """paragraph_windows of every language stacked: (windows [n_lang * n_windows, seq_len], language index [N])."""
    parts = [paragraph_windows(tokenizer, list(paragraphs), seq_len, n_windows, add_bos)
             for paragraphs in texts.values()]
    index = torch.arange(len(parts)).repeat_interleave(torch.tensor([len(p) for p in parts]))
    return torch.cat(parts), index


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
    return sample_median(flat.index_select(1, index))


def sample_median(sample: torch.Tensor) -> torch.Tensor:
    """The lower median of |sample| along the last axis, as float32 [...]: a sort, which on a GPU pays off when
    many rows (a batch x every layer) go in one call."""
    return sample.abs().sort(dim=-1).values[..., (sample.shape[-1] - 1) // 2].float()


def top_rows(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of h [B, T, D] that can hold the k entries of largest |h| of each sequence: (positions [B, k'],
    rows [B, k', D]) of the k' = min(k, T) tokens with the largest max |h| (each token ahead of such an entry's
    token holds a distinct, at-least-as-large entry)."""
    tokens = torch.linalg.vector_norm(h, ord=math.inf, dim=-1).topk(min(k, h.shape[1]), dim=1).indices
    return tokens, h.gather(1, tokens[..., None].expand(-1, -1, h.shape[2]))


def top_in_rows(tokens: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k entries of largest |h| among `top_rows`' rows [N, k', D]: (signed values, positions, dims), each
    [N, k]; they lie among each row's k largest. N may stack several layers' sequences (one call per batch)."""
    n, _, width = rows.shape
    per_row = rows.abs().topk(min(k, width), dim=-1)  # [N, k', k_row]
    k_row = per_row.indices.shape[-1]
    best = per_row.values.reshape(n, -1).topk(min(k, tokens.shape[1] * k_row), dim=1).indices
    slot, dims = best // k_row, per_row.indices.reshape(n, -1).gather(1, best)
    values = rows.reshape(n, -1).gather(1, slot * width + dims)
    return values.float(), tokens.gather(1, slot), dims


def top_entries(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k entries of largest |h| per sequence of h [B, T, D]: (signed values, positions, dims), each [B, k].
    Exact, and cheap on a GPU (only small top-k's): `top_rows`, then `top_in_rows`."""
    return top_in_rows(*top_rows(h, k), k)


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
    """Hooks on every block output that keep the scan statistics of each batch on the device.

    Per layer a hook keeps only what needs the whole state h: the candidate rows of the top entries (`top_rows`)
    and the median, or the median's sample; `end_batch` finds the top entries and sorts the samples of every
    layer at once (few launches over L x B rows instead of many small ones per layer)."""

    def __init__(self, n_layers: int, top_k: int = 32, median_sample: int | None = None):
        if top_k < 3:
            raise BabelError(f"top_k={top_k} is too small; keep at least 3 entries (the paper plots top-1/2/3)")
        self.n_layers, self.top_k, self.median_sample = n_layers, top_k, median_sample
        self._layer: dict[int, tuple[torch.Tensor, ...]] = {}
        self._batches: list[tuple[torch.Tensor, ...]] = []
        self._index: dict[tuple[int, int], torch.Tensor | None] = {}

    def hooks(self) -> dict:
        return {site(layer, "hook_resid_post"): self._observer(layer) for layer in range(self.n_layers)}

    def _sample_index(self, h: torch.Tensor) -> torch.Tensor | None:
        """The median's sample positions for states shaped like h [B, T, d] (made once per shape)."""
        key = (h.shape[1] * h.shape[2], h.shape[2])
        if key not in self._index:
            self._index[key] = sample_index(*key, self.median_sample, h.device)
        return self._index[key]

    def _observer(self, layer: int):
        def observe(h: torch.Tensor) -> None:
            h = h.detach()
            index = self._sample_index(h)
            median = median_abs(h) if index is None else h.reshape(h.shape[0], -1).index_select(1, index)
            self._layer[layer] = (*top_rows(h, self.top_k), median)
        return observe

    def end_batch(self) -> None:
        """This batch's top entries and medians of every layer as [B, L, ...] tensors, still on the device."""
        if sorted(self._layer) != list(range(self.n_layers)):
            raise BabelError("the scan saw only some layers of the batch; run the whole decoder under its hooks")
        tokens, rows, median = (torch.stack(part) for part in zip(*(self._layer[l] for l in range(self.n_layers))))
        n_layers, batch = tokens.shape[:2]  # [L, B, ...]
        found = top_in_rows(tokens.flatten(0, 1), rows.flatten(0, 1), self.top_k)
        found = [part.view(n_layers, batch, -1).transpose(0, 1) for part in found]
        if median.dim() == 3:  # [L, B, sample]: every layer's sample sorted in one call
            median = sample_median(median)
        median = median.T  # [B, L]
        self._batches.append((*found, median))
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


@dataclass(frozen=True)
class Run:
    """One scanned setting: a model, with or without a BOS token in front of every window."""

    model: str
    bos: bool

    @property
    def label(self) -> str:
        return f"{self.model} · {'with' if self.bos else 'without'} BOS"


def runs(models: Mapping[str, LoadedModel]) -> list[Run]:
    """Every model without BOS (the paper's setting), and with BOS too where its tokenizer adds one by default."""
    return [Run(name, bos) for name, lm in models.items()
            for bos in ([False, True] if adds_bos(lm.tokenizer) else [False])]


def own_tokenisation(lm: LoadedModel) -> Run:
    """The run a model gets with its tokenizer's own default (with BOS where it adds one)."""
    return Run(lm.name, adds_bos(lm.tokenizer))


def model_rows(models: Mapping[str, LoadedModel]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per model (layers, width, BOS use, what is scanned) and a note for each model without default BOS."""
    rows, notes = [], []
    for name, lm in models.items():
        tok, default_bos = lm.tokenizer, adds_bos(lm.tokenizer)
        rows.append({"model": name, "layers": lm.model.config.num_hidden_layers,
                     "d_model": lm.model.config.hidden_size, "bos token": tok.bos_token,
                     "adds BOS by default": default_bos,
                     "scanned": "with and without BOS" if default_bos else "without BOS only", "weights": lm.card})
        if not default_bos:
            notes.append(f"{name}: its tokenizer adds no BOS; its bos_token {tok.bos_token!r} is not put in front of "
                         "text by default, so it is scanned without BOS only.")
    return rows, notes


@dataclass
class ScanResult:
    """The scan of one run over every language's calibration windows."""

    run: Run
    params: ScanParams
    scan: Scan
    language: torch.Tensor  # [N] index into the languages of each window
    key: dict[str, Any]  # the artefact's cache key (identifies what later studies build on)

    def peak(self) -> tuple[int, float, float]:
        """(layer, mean top-1 |h|, mean median |h|) at the layer where the mean top-1 |h| is largest."""
        top1 = self.scan.magnitudes(1)[..., 0].mean(0)
        layer = int(top1.argmax())
        return layer, float(top1[layer]), float(self.scan.median.mean(0)[layer])

    def window_ratios(self, layer: int) -> torch.Tensor:
        """[N] top-1 |h| / median |h| of each window at `layer` (the spread behind the mean)."""
        return self.scan.magnitudes(1)[:, layer, 0] / self.scan.median[:, layer]

    def findings(self) -> list[str]:
        layer, top1, median = self.peak()
        ratios = self.window_ratios(layer)
        low, mid, high = torch.quantile(ratios.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.double)).tolist()
        return [f"{self.run.label}: the largest activation peaks at layer {layer} with |h| = {top1:,.0f} on "
                f"average, {top1 / median:,.0f}x the median magnitude there ({median:.2f}).",
                f"{self.run.label}: per window, top-1 / median at layer {layer} has a median of {mid:,.0f}x "
                f"(5-95% of {len(ratios)} windows: {low:,.0f}x to {high:,.0f}x)."]


def scan(store: ArtefactStore, lm: LoadedModel, params: ScanParams, texts: Mapping[str, Sequence[str]], *,
         bos: bool, corpus_sha256: str) -> ScanResult:
    """The study: scan `params.scan_windows` windows per language of `texts` (language -> paragraphs), cached."""
    key = params.key(model=lm.name, fingerprint=lm.fingerprint, bos=bos, languages=list(texts),
                     corpus_sha256=corpus_sha256)

    def compute():
        ids, lang = language_windows(lm.tokenizer, texts, params.seq_len, params.scan_windows, add_bos=bos)
        found = scan_residuals(lm.model, ids, batch_size=params.batch_size, top_k=params.top_k,
                               median_sample=params.median_sample)
        return found.tensors() | {"language": lang}, {}

    tensors, _ = store.cached(params.KIND, key, compute)
    found = Scan(*(tensors[k] for k in ("values", "positions", "dims", "median", "ids")))
    return ScanResult(Run(lm.name, bos), params, found, tensors["language"], key)
