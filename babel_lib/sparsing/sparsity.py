"""Activation sparsity (Sparsing Law): CETT thresholds, PPL-p%, and the top-k / FAT-ε / zero baselines.

A neuron i of an FFN contributes n_i = h_i · W_out[:, i] to the layer output, where h is the input of the
down projection (site `mlp.hook_post`), so ‖n_i‖ = |h_i| · ‖W_out[:, i]‖. For a threshold ε the skipped set
is D = {i : ‖n_i‖ < ε} and CETT(ε) = ‖Σ_{i∈D} n_i‖ / ‖Σ_i n_i‖, per token, averaged over counted tokens.
One CETT value c is shared by all layers; layer l gets the threshold t_l where its CETT crosses c.

Exact threshold search (`CettCurve`, `layer_thresholds`): CETT(ε) is a step function that changes only at
the values of ‖n_i‖, so the search runs over the sorted union of those values across tokens (M = tokens ×
d_ff candidates), with no grid. The search keeps a candidate with CETT ≤ c below and one with CETT > c above
until the bracket spans at most `CettCurve.SCAN` (token, neuron) pairs (the next point interpolated in log CETT
against log index, and a bisection step whenever that does not halve the bracket: 7 CETT evaluations
instead of 11 for a random 640-token layer of SmolLM2's shape); a scan then adds those pairs one by
one to their token's partial sum, which gives CETT exactly at every candidate inside, and t_l is the largest
of them with CETT ≤ c. So CETT(t_l) ≤ c < CETT(next candidate). Cost per layer: one sort of M values
(kept in the memo for the next c where the activations are kept: most of a search's time on the CPU), at most
about 2 log2(M / SCAN) CETT evaluations (each a [tokens, d_ff] × [d_ff, d_model] matmul) and a scan of
SCAN × d_model; memory O(M), the layer's activations, which exist anyway. CETT is the norm of a vector sum
and is not strictly monotone (adding a vector can shorten a sum; on random Gaussian data about 15 % of
single steps go down): where it is monotone, or where M ≤ SCAN, t_l is the largest ε with CETT(ε) ≤ c;
elsewhere it is an exact crossing of c. Search points are memoised per batch and layer, so a later c on the
same batch starts from a tighter bracket.

PPL-p% (`ppl_p`) searches c in (0, 1] until the perplexity ratio exp(L_sparse − L_dense) is within `tol` of
1 + p/100 (steps in log2 c until the target is bracketed, then regula falsi). As in the paper's reference code,
each batch's thresholds are derived from that batch's dense activations, then applied in a sparse pass that
measures the loss and the activation ratio. `SparseEvaluator` runs the dense pass once per window set and keeps
each batch's activations, so every later c searches its thresholds without another forward; each evaluation
also keeps per-window sums (loss, kept pairs per layer) for bootstrap intervals over windows.

Baselines (`sparsified`): top-k keeps the k = round(value · d_ff) largest |s_i| per token, FAT-ε skips
|s_i| < ε with one ε for all layers, and "relu" skips s_i = 0, where s is the gate activation act(W_gate x)
of a gated FFN (site `mlp.hook_gate`) and h itself for a plain FFN, as in the paper. Every method zeroes
the skipped h_i before the down projection and counts active neurons on the device in the same pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from babel_lib.core import distributed
from babel_lib.core.evaluation import Loss, window_nll
from babel_lib.core.ffn import FFN, ffn_layers
from babel_lib.core.hooks import hooked, site
from babel_lib.core.models import LoadedModel, run_decoder
from babel_lib.errors import BabelError

METHODS = ("cett", "topk", "fat", "relu")


# --- CETT on one layer's activations -------------------------------------------------------------------


def neuron_norms(h: torch.Tensor, down_columns: torch.Tensor) -> torch.Tensor:
    """‖n_i‖ = |h_i| · ‖W_out[:, i]‖ for activations h [tokens, d_ff] and W_out columns as rows [d_ff, d_model]."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    return h.to(dtype).abs() * down_columns.to(dtype).norm(dim=1)


def cett(h: torch.Tensor, down_columns: torch.Tensor, eps: float) -> float:
    """CETT(ε): the mean over tokens of ‖Σ_{‖n_i‖<ε} n_i‖ / ‖Σ_i n_i‖ (tokens with zero FFN output count 0)."""
    return CettCurve(h, down_columns).at_value(eps)[0]


class CettCurve:
    """CETT of one layer's activations h [tokens, d_ff] as a function of the threshold, searched exactly.

    Candidates are the sorted values of ‖n_i‖ (index j stands for ε = values[j]; j = M for ε = +inf). `known`
    memoises CETT at candidate indices; passing the same dict for the same activations (the same batch at
    another c) starts the search from a tighter bracket. It is cleared if the activations differ.
    """

    SCAN = 1024  # a bracket spanning at most this many (token, neuron) pairs is scanned pair by pair

    def __init__(self, h: torch.Tensor, down_columns: torch.Tensor, known: dict | None = None, *,
                 keep_sorted: bool = False):
        if h.ndim != 2 or h.shape[1] != down_columns.shape[0]:
            raise BabelError(f"activations {tuple(h.shape)} do not match down-projection columns "
                             f"{tuple(down_columns.shape)}; pass h as [tokens, d_ff] and W_out columns as [d_ff, d_model]")
        dtype = torch.promote_types(h.dtype, torch.float32)
        self.h, self.w = h.to(dtype), down_columns.to(dtype)
        self.norms = neuron_norms(self.h, self.w)
        self.size = self.norms.numel()
        self._partials: dict[int, torch.Tensor] = {}
        self.known = {} if known is None else known
        signature = (self.size, float(self.norms.double().sum()))  # the memo belongs to these activations
        if self.known.get("signature", signature) != signature:
            self.known.clear()
        self.known["signature"] = signature
        if "sorted" in self.known:  # kept by an earlier c on the same activations: the sort is most of a search
            self.values, self.total = self.known["sorted"], self.known["total"]
        else:
            self.values = self.norms.flatten().sort().values
            self.total = (self.h @ self.w).norm(dim=1)
            if keep_sorted:
                self.known["sorted"], self.known["total"] = self.values, self.total
        self.live = self.total > 0
        self.known.setdefault(0, 0.0)  # nothing lies strictly below the smallest value
        self.known.setdefault(self.size, float(self.live.double().mean()) if self.size else 0.0)

    def at_value(self, eps: float) -> tuple[float, torch.Tensor]:
        """CETT(ε) and the per-token partial sums Σ_{‖n_i‖<ε} n_i [tokens, d_model]."""
        part = (self.h * (self.norms < eps)) @ self.w
        ratio = torch.where(self.live, part.norm(dim=1) / torch.where(self.live, self.total, 1.0), 0.0)
        return (float(ratio.double().mean()) if ratio.numel() else 0.0), part

    def at(self, j: int) -> float:
        """CETT at candidate j, memoised in `known` (its partial sums kept for a scan that starts there)."""
        if j not in self.known:
            self.known[j], self._partials[j] = self.at_value(float(self.values[j]))
        return self.known[j]

    def _first(self, j: int) -> int:
        """The first sorted position holding values[j] (ties share one CETT value); M for M."""
        return j if j == self.size else int(torch.searchsorted(self.values, self.values[j]))

    def threshold(self, c: float) -> float:
        """The largest candidate ε with CETT(ε) ≤ c < CETT(next candidate), found by a safeguarded interpolation
        search (each step that does not halve the bracket is followed by a bisection step), then a scan."""
        if not 0.0 <= c <= 1.0:
            raise BabelError(f"CETT value {c} is outside [0, 1]; pass a fraction such as 0.2")
        if self.known[self.size] <= c:
            return math.inf
        points = [(j, v) for j, v in self.known.items() if isinstance(j, int)]
        lo = max(j for j, v in points if v <= c and j < self.size)
        hi = min(j for j, v in points if v > c and j > lo)
        while hi - lo > 1 and self._first(hi) - self._first(lo) > self.SCAN:
            mid = self._split(lo, hi, c)
            width = hi - lo
            lo, hi = (mid, hi) if self.at(mid) <= c else (lo, mid)
            if hi - lo > width // 2 and hi - lo > 1 and self._first(hi) - self._first(lo) > self.SCAN:
                mid = (lo + hi) // 2  # the interpolated point did not halve the bracket: bisect once
                lo, hi = (mid, hi) if self.at(mid) <= c else (lo, mid)
        if hi - lo > 1:
            lo = self._scan(lo, hi, c)
        return float(self.values[lo])

    def _split(self, lo: int, hi: int, c: float) -> int:
        """The next search point inside (lo, hi): where the line between the ends' CETT values (log CETT against
        log index once both are positive) crosses c, moved
        past it by SCAN / 2 pairs so the crossing tends to fall in a narrow bracket; at least 1/64 of the bracket
        from either end."""
        f_lo, f_hi, width = self.known[lo], self.known[hi], hi - lo
        if 0 < f_lo < c < f_hi and lo > 0:  # CETT grows like a power of the index: interpolate in log-log
            guess = math.exp(math.log(lo) + math.log(c / f_lo) / math.log(f_hi / f_lo) * math.log(hi / lo))
        else:
            guess = lo + (c - f_lo) / (f_hi - f_lo) * width if f_hi > f_lo else lo + width / 2
        guess += self.SCAN / 2 if guess - lo < hi - guess else -self.SCAN / 2
        margin = max(1, width // 64)
        return int(min(max(guess, lo + margin), hi - margin))

    def _scan(self, lo: int, hi: int, c: float) -> int:
        """Exact CETT after each pair in sorted positions [first(lo), first(hi)); the last candidate ≤ c."""
        start, stop = self._first(lo), self._first(hi)
        base = self.known[lo]
        partial = self._partials[lo] if lo in self._partials else self.at_value(float(self.values[lo]))[1]
        flat = self.norms.flatten()
        inside = flat >= self.values[start]  # the pairs at sorted positions [start, stop): whole groups of ties
        if stop < self.size:
            inside &= flat < self.values[stop]
        pos = inside.nonzero().squeeze(1)
        pos = pos[flat[pos].sort(stable=True).indices]
        tok, neuron = pos // self.h.shape[1], pos % self.h.shape[1]
        by_token = torch.argsort(tok, stable=True)
        tok_s, neuron_s = tok[by_token], neuron[by_token]
        vec = (self.h[tok_s, neuron_s, None] * self.w[neuron_s]).double()
        first = torch.ones_like(tok_s, dtype=torch.bool)
        first[1:] = tok_s[1:] != tok_s[:-1]
        index = torch.arange(len(tok_s), device=tok_s.device)
        segment = torch.where(first, index, 0).cummax(0).values  # where each token's run starts
        running = vec.cumsum(0)
        before = torch.where((segment > 0)[:, None], running[(segment - 1).clamp(min=0)], 0.0)
        new = (partial.double()[tok_s] + running - before).norm(dim=1)
        old = torch.where(first, partial.double()[tok_s].norm(dim=1), torch.roll(new, 1))
        total = self.total.double()[tok_s]
        delta = torch.where(self.live[tok_s], (new - old) / torch.where(self.live[tok_s], total, 1.0), 0.0)
        in_order = torch.empty_like(delta)
        in_order[by_token] = delta
        curve = base + in_order.cumsum(0) / self.h.shape[0]  # curve[m] = CETT with positions < start + m + 1
        k = torch.arange(start + 1, stop, device=curve.device)  # candidate positions strictly inside
        is_start = self.values[k] > self.values[k - 1]
        ok = is_start & (curve[: stop - start - 1] <= c)
        return int(k[ok][-1]) if bool(ok.any()) else lo


def layer_thresholds(h: torch.Tensor, down_columns: torch.Tensor, cs: Sequence[float],
                     known: dict | None = None, *, keep_sorted: bool = False) -> torch.Tensor:
    """Exact per-layer thresholds t(c) for each CETT value c (float64 [len(cs)]); +inf where c ≥ CETT(∞).

    h: the layer's activations on counted tokens [tokens, d_ff]; down_columns: W_out[:, i] as rows.
    keep_sorted: keep the sorted ‖n_i‖ in `known` for the next c (tokens × d_ff floats of memory).
    """
    curve = CettCurve(h, down_columns, known, keep_sorted=keep_sorted)
    return torch.tensor([curve.threshold(float(c)) for c in cs], dtype=torch.float64)


# --- model plumbing ------------------------------------------------------------------------------------


def _model_and_specials(lm_or_model: LoadedModel | nn.Module) -> tuple[nn.Module, list[int]]:
    """The nn.Module and the special token ids that statistics skip (none for a bare model)."""
    if isinstance(lm_or_model, LoadedModel):
        return lm_or_model.model, sorted(set(lm_or_model.tokenizer.all_special_ids))
    return lm_or_model, []


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _count_mask(ids: torch.Tensor, specials: Sequence[int]) -> torch.Tensor:
    """True on the tokens that CETT averages and sparsity counts: every token but specials such as BOS."""
    return ~torch.isin(ids, torch.tensor(list(specials), dtype=ids.dtype, device=ids.device))


def _flat_mask(count_mask: torch.Tensor | None, rows: int, device: torch.device) -> torch.Tensor | None:
    if count_mask is None:
        return None
    flat = count_mask.reshape(-1).to(device)
    if flat.numel() != rows:
        raise BabelError(f"count_mask covers {flat.numel()} tokens but the forward ran {rows}; "
                         "give the mask of the batch run inside this context, or None to count every token")
    return flat


@torch.no_grad()
def cett_thresholds(lm_or_model: LoadedModel | nn.Module, input_ids: torch.Tensor, c: float | Sequence[float],
                    count_mask: torch.Tensor | None = None, known: dict[int, dict] | None = None) -> torch.Tensor:
    """Per-layer thresholds for CETT value(s) c from one dense decoder pass over a batch [B, T].

    Returns float64 [n_layers] for one c, [len(c), n_layers] for a list. count_mask [B, T] selects the
    tokens CETT averages over (default: every token that is not a special token of the tokenizer).
    `known` ({layer: memo}, filled in place) carries search points to the next call on the same batch.
    """
    model, specials = _model_and_specials(lm_or_model)
    cs = [float(c)] if isinstance(c, (int, float)) else [float(x) for x in c]
    ids = input_ids.to(_device(model))
    mask = _count_mask(ids, specials) if count_mask is None else count_mask.to(ids.device)
    layers = ffn_layers(model)
    known = {} if known is None else known
    found: dict[int, torch.Tensor] = {}

    def observe(ffn: FFN):
        def hook(h: torch.Tensor) -> None:
            rows = h.reshape(-1, h.shape[-1])
            found[ffn.index] = layer_thresholds(rows[_flat_mask(mask, rows.shape[0], rows.device)],
                                                ffn.down_columns(), cs, known.setdefault(ffn.index, {}))
        return hook

    with hooked(model, {site(f.index, "mlp.hook_post"): observe(f) for f in layers}):
        run_decoder(model, ids)
    table = torch.stack([found[f.index] for f in layers], dim=1)
    return table[0] if isinstance(c, (int, float)) else table


# --- applying sparsity at inference --------------------------------------------------------------------


@dataclass
class SparsityMeter:
    """Active-neuron counts per layer (on the model's device) and the counted tokens, summed over forwards, and
    per window the kept (token, neuron) pairs of each layer (what a bootstrap over windows resamples)."""

    active: list[torch.Tensor]  # per layer [d_ff] long: counted tokens on which the neuron was kept
    tokens: list[torch.Tensor]  # per layer: counted tokens seen (0-d long)
    windows: list[list[torch.Tensor]] = field(default_factory=list)  # per layer, per forward: [B] kept pairs

    @classmethod
    def empty(cls, layers: Sequence[FFN], device: torch.device) -> SparsityMeter:
        return cls([torch.zeros(f.width, dtype=torch.long, device=device) for f in layers],
                   [torch.zeros((), dtype=torch.long, device=device) for _ in layers], [[] for _ in layers])

    def add(self, layer: int, keep: torch.Tensor, counted: torch.Tensor) -> None:
        """Count a [B, T, d_ff] bool mask of kept neurons on the counted tokens ([B, T] bool) of one forward."""
        kept = keep & counted[..., None]
        self.active[layer] += kept.sum(dim=(0, 1))
        self.tokens[layer] += counted.sum()
        self.windows[layer].append(kept.sum(dim=(1, 2)))

    def window_active(self) -> torch.Tensor:
        """Kept (token, neuron) pairs per window and layer [windows, n_layers] (long, CPU), windows in forward order."""
        return torch.stack([torch.cat(per_forward).cpu() for per_forward in self.windows], dim=1)

    @property
    def neuron_frequency(self) -> list[torch.Tensor]:
        """Per layer, the fraction of counted tokens on which each neuron was active (float64, CPU)."""
        return [a.double().cpu() / max(int(t), 1) for a, t in zip(self.active, self.tokens)]

    @property
    def layer_sparsity(self) -> torch.Tensor:
        """Fraction of (token, neuron) pairs skipped, per layer (float64 [n_layers], CPU)."""
        return torch.stack([1.0 - f.mean() for f in self.neuron_frequency])

    @property
    def activation_ratio(self) -> float:
        """Model-level activation ratio: 1 − the unweighted mean of the layer sparsities."""
        return float(1.0 - self.layer_sparsity.mean())


def _topk_skip(s: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros_like(s, dtype=torch.bool)
    return ~keep.scatter_(-1, s.abs().topk(k, dim=-1).indices, True)


def _score_skip(method: str, value: float | None, width: int):
    """The skip rule on the score s (gate activation, or h for a plain FFN) for the baseline methods."""
    if method == "topk":
        if value is None or not 0.0 < value <= 1.0:
            raise BabelError(f"top-k takes the kept fraction of d_ff in (0, 1], got {value!r}")
        k = max(1, round(value * width))
        return lambda s: _topk_skip(s, k)
    if method == "fat":
        if value is None or value < 0:
            raise BabelError(f"FAT-ε takes a threshold ε ≥ 0 on |s|, got {value!r}")
        return lambda s: s.abs() < value
    return lambda s: s == 0


def _counted(mask: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
    """The [B, T] counted-token mask of the forward whose activations are h ([B, T, d_ff], or [B·T, d_ff] as in
    OPT); all True for None (then a 2-D h is one window)."""
    tokens = h.numel() // h.shape[-1]
    if mask is None:
        return torch.ones(h.shape[:-1] if h.ndim == 3 else (1, tokens), dtype=torch.bool, device=h.device)
    if mask.numel() != tokens:
        raise BabelError(f"count_mask covers {mask.numel()} tokens but the forward ran {tokens}; "
                         "give the mask of the batch run inside this context, or None to count every token")
    return mask.to(h.device).reshape(-1, mask.shape[-1]).bool()


def _apply(h: torch.Tensor, skip: torch.Tensor, ffn: FFN, meter: SparsityMeter, mask) -> torch.Tensor:
    """Zero the skipped neurons of h and count the kept ones on counted tokens."""
    counted = _counted(mask, h)
    meter.add(ffn.index, ~skip.reshape(*counted.shape, h.shape[-1]), counted)
    return h.masked_fill(skip.view_as(h), 0)


@contextmanager
def sparsified(model: nn.Module, method: str, value: float | torch.Tensor | None = None, *,
               count_mask: torch.Tensor | None = None, meter: SparsityMeter | None = None) -> Iterator[SparsityMeter]:
    """Run `model` with activation sparsity applied at every FFN's down-projection input; yields the meter.

    method "cett": value = per-layer thresholds t_l [n_layers] (from `cett_thresholds`), skip ‖n_i‖ < t_l;
    "topk": value = kept fraction of d_ff, the k largest |s_i| per token; "fat": value = ε, skip |s_i| < ε;
    "relu": skip s_i = 0 (only meaningful for ReLU). count_mask [B, T] selects the counted tokens of the
    single forward run inside (None: count every token); pass `meter` to accumulate over several contexts.
    """
    if method not in METHODS:
        raise BabelError(f"unknown sparsity method {method!r}; use one of {', '.join(METHODS)}")
    layers = ffn_layers(model)
    meter = meter or SparsityMeter.empty(layers, _device(model))
    hooks = {}
    if method == "cett":
        thresholds = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
        if thresholds.numel() != len(layers):
            raise BabelError(f"CETT needs one threshold per layer ({len(layers)}), got {thresholds.numel()}; "
                             "compute them with cett_thresholds")
        for f in layers:
            hooks[site(f.index, "mlp.hook_post")] = _cett_hook(f, float(thresholds[f.index]), meter, count_mask)
    else:
        for f in layers:
            rule = _score_skip(method, value, f.width)
            if f.gated:
                pending: dict[str, torch.Tensor] = {}
                hooks[site(f.index, "mlp.hook_gate")] = _gate_hook(rule, pending)
                hooks[site(f.index, "mlp.hook_post")] = _pending_hook(f, pending, meter, count_mask)
            else:
                hooks[site(f.index, "mlp.hook_post")] = lambda h, f=f, rule=rule: _apply(h, rule(h), f, meter, count_mask)
    with hooked(model, hooks):
        yield meter


def _cett_hook(ffn: FFN, threshold: float, meter: SparsityMeter, mask):
    column_norms = ffn.down_columns().float().norm(dim=1)
    return lambda h: _apply(h, h.float().abs() * column_norms < threshold, ffn, meter, mask)


def _gate_hook(rule, pending: dict[str, torch.Tensor]):
    def hook(s: torch.Tensor) -> None:
        pending["skip"] = rule(s)
    return hook


def _pending_hook(ffn: FFN, pending: dict[str, torch.Tensor], meter: SparsityMeter, mask):
    def hook(h: torch.Tensor) -> torch.Tensor:
        return _apply(h, pending.pop("skip"), ffn, meter, mask)
    return hook


# --- evaluation: loss and activation ratio under a method, and PPL-p% ----------------------------------


@dataclass
class SparseEval:
    """Loss and sparsity of one method at one value on a set of windows, in total and per window."""

    method: str
    value: float | None
    loss: Loss
    activation_ratio: float
    layer_sparsity: torch.Tensor  # [n_layers] float64
    neuron_frequency: list[torch.Tensor]  # per layer [d_ff]: fraction of counted tokens with the neuron active
    thresholds: torch.Tensor | None  # CETT only: per-layer thresholds, mean over batches weighted by tokens
    window_nll: torch.Tensor  # [windows] float64: summed next-token NLL of each window
    window_active: torch.Tensor  # [windows, n_layers] long: kept (token, neuron) pairs of each window and layer
    group_frequency: list[list[torch.Tensor]]  # per window group (language), per layer [d_ff]: as neuron_frequency


def _check_windows(windows: torch.Tensor) -> None:
    if windows.ndim != 2 or windows.dtype != torch.long or windows.shape[0] == 0:
        raise BabelError(f"windows must be a LongTensor [n_windows, seq_len], got {windows.dtype} "
                         f"{tuple(windows.shape)}; build them with babel_lib.core.batches.windows")


def batch_ranges(n: int, batch_size: int, groups: Sequence[int] | None = None) -> list[tuple[int, int, int]]:
    """(group, start, stop) of each batch: at most `batch_size` consecutive windows, never across a group boundary.

    groups: the number of windows of each consecutive group (e.g. per language); None is one group of n.
    """
    groups = [n] if groups is None else list(groups)
    if sum(groups) != n or any(g < 1 for g in groups) or batch_size < 1:
        raise BabelError(f"groups {groups} must be positive counts summing to the {n} windows, and batch_size "
                         f"({batch_size}) at least 1")
    ranges, start = [], 0
    for g, size in enumerate(groups):
        ranges += [(g, b, min(b + batch_size, start + size)) for b in range(start, start + size, batch_size)]
        start += size
    return ranges


@dataclass
class PPLpResult:
    """PPL-p%: the CETT value whose sparse perplexity is (1 + p/100) × the dense one, and its sparsity."""

    p: float
    tol: float
    cett: float
    activation_ratio: float  # model level: 1 − mean layer sparsity
    layer_sparsity: torch.Tensor  # [n_layers] float64
    thresholds: torch.Tensor  # [n_layers]: per-batch thresholds averaged over batches, weighted by tokens
    dense_loss: float  # mean next-token NLL
    sparse_loss: float
    ppl_ratio: float  # exp(sparse_loss − dense_loss)
    converged: bool  # ppl_ratio is within tol of 1 + p/100
    tokens: int  # predicted tokens in the loss
    neuron_frequency: list[torch.Tensor]  # per layer [d_ff], at the found c
    trace: list[dict[str, float]]  # every evaluated c: cett, ppl_ratio, activation_ratio (Pareto points)
    runs: list[SparseEval]  # the evaluation behind each trace entry (per-window sums for a bootstrap)


class SparseEvaluator:
    """Sparse evaluations of one model on fixed windows, sharing one dense pass among all of them.

    The dense pass (run once, on first need) gives the dense loss per window, a sample of |s| for FAT-ε's ε
    (`score_quantiles`) and, with `keep_activations`, every batch's counted down-projection inputs h, from which
    each CETT value's thresholds are searched without another forward (memory: tokens × d_ff × layers floats;
    without it, each CETT evaluation runs a dense pass per batch first, as `cett_thresholds` does). The CETT
    search points are memoised per batch and layer, so later values of c start from a tighter bracket.
    Batches hold at most `batch_size` windows and never cross a group (`groups`: windows per group, in order).
    """

    SAMPLE = 65536  # |s| values kept per layer and batch for the FAT-ε quantiles (evenly strided)

    def __init__(self, lm_or_model: LoadedModel | nn.Module, windows: torch.Tensor, *, batch_size: int = 4,
                 groups: Sequence[int] | None = None, keep_activations: bool = True):
        _check_windows(windows)
        self.lm = lm_or_model
        self.model, self.specials = _model_and_specials(lm_or_model)
        self.windows, self.batch_size = windows, batch_size
        self.groups = [windows.shape[0]] if groups is None else list(groups)
        self.batches = batch_ranges(windows.shape[0], batch_size, self.groups)
        self.keep_activations = keep_activations
        self.layers = ffn_layers(self.model)
        self._known: dict[int, dict[int, dict]] = {}  # batch start -> layer -> CETT memo
        self._h: dict[int, dict[int, torch.Tensor]] = {}  # batch start -> layer -> counted h [tokens, d_ff]
        self._scores: list[torch.Tensor] = []
        self._dense_nll: torch.Tensor | None = None

    def _mask(self, ids: torch.Tensor) -> torch.Tensor:
        return _count_mask(ids, self.specials)

    def _dense_pass(self) -> torch.Tensor:
        """The one dense pass (run on first need): per-window NLL, the |s| sample and (with keep_activations)
        the counted h of every batch; returns the per-window NLL."""
        if self._dense_nll is not None:
            return self._dense_nll
        mine = distributed.shard(self.batches)
        nll = torch.zeros(self.windows.shape[0], dtype=torch.float64)

        def work():
            for _, (_, start, stop) in mine:
                ids = self.windows[start:stop].to(_device(self.model))
                mask = self._mask(ids)
                hooks = {}
                for f in self.layers:
                    hooks[site(f.index, "mlp.hook_gate")] = self._sample_hook(mask)
                    if self.keep_activations:
                        hooks[site(f.index, "mlp.hook_post")] = self._keep_hook(f, start, mask)
                with hooked(self.model, hooks):
                    nll[start:stop] = window_nll(self.model, ids)

        distributed.together(work)
        mine_windows = [w for _, (_, start, stop) in mine for w in range(start, stop)]
        self._dense_nll = distributed.gather_rows(nll[mine_windows], mine_windows, len(nll))
        return self._dense_nll

    def _sample_hook(self, mask: torch.Tensor):
        def hook(s: torch.Tensor) -> None:
            flat = s.reshape(-1, s.shape[-1])[_counted(mask, s).flatten()].abs().float().flatten()
            self._scores.append(flat[:: max(1, flat.numel() // self.SAMPLE)].cpu())
        return hook

    def _keep_hook(self, ffn: FFN, start: int, mask: torch.Tensor):
        def hook(h: torch.Tensor) -> None:
            self._h.setdefault(start, {})[ffn.index] = h.reshape(-1, h.shape[-1])[_counted(mask, h).flatten()]
        return hook

    @property
    def dense_window_nll(self) -> torch.Tensor:
        """The dense model's summed next-token NLL per window (float64 [windows])."""
        return self._dense_pass()

    @property
    def window_counted(self) -> torch.Tensor:
        """Counted tokens (text, not special tokens) per window [windows]: the denominators of activation ratios."""
        return self._mask(self.windows).sum(dim=1).cpu()

    @property
    def dense(self) -> Loss:
        """The dense model's next-token loss on the windows (from the one dense pass)."""
        return Loss(float(self.dense_window_nll.sum()), self.windows[:, 1:].numel())

    def score_quantiles(self, qs: Sequence[float]) -> torch.Tensor:
        """Quantiles of |s| pooled over layers and counted tokens (s: the gate activation, h for a plain FFN),
        from the dense pass's sample (at most SAMPLE values per layer and batch): FAT-ε's ε values."""
        self._dense_pass()
        pooled = [t for share in distributed.all_gather(self._scores) for t in share]  # a multiset: order is free
        return torch.from_numpy(np.quantile(torch.cat(pooled).double().numpy(), list(qs)))

    def _thresholds(self, ids: torch.Tensor, start: int, mask: torch.Tensor, c: float) -> torch.Tensor:
        """Per-layer thresholds of one batch at CETT value c: from the kept dense h, or from a dense pass."""
        known = self._known.setdefault(start, {})
        if not self.keep_activations:
            return cett_thresholds(self.model, ids, c, count_mask=mask, known=known)
        self._dense_pass()
        return torch.stack([layer_thresholds(self._h[start][f.index], f.down_columns(), [c],
                                             known.setdefault(f.index, {}), keep_sorted=True)[0]
                            for f in self.layers])

    @torch.no_grad()
    def evaluate(self, method: str, value: float | None = None) -> SparseEval:
        """Loss and activation ratio with `method` at `value` (for CETT, value is the CETT value c)."""
        if method not in METHODS:
            raise BabelError(f"unknown sparsity method {method!r}; use one of {', '.join(METHODS)}")
        n, n_layers = self.windows.shape[0], len(self.layers)
        meters = [SparsityMeter.empty(self.layers, _device(self.model)) for _ in self.groups]
        mine = distributed.shard(self.batches)  # under torchrun: this rank's batches; sums and rows gathered below
        per_window = torch.zeros(n, 1 + n_layers, dtype=torch.float64)  # nll, kept pairs per layer
        per_batch = torch.zeros(len(self.batches), 1 + n_layers, dtype=torch.float64)  # counted, threshold x n

        def work():
            for i, (group, start, stop) in mine:
                ids = self.windows[start:stop].to(_device(self.model))
                mask = self._mask(ids)
                setting = value
                if method == "cett":
                    setting = self._thresholds(ids, start, mask, float(value))
                    counted = int(mask.sum())
                    per_batch[i, 0], per_batch[i, 1:] = counted, setting * counted
                meter = meters[group]
                before = len(meter.windows[0])
                with sparsified(self.model, method, setting, count_mask=mask, meter=meter):
                    per_window[start:stop, 0] = window_nll(self.model, ids)
                per_window[start:stop, 1:] = torch.stack(
                    [torch.cat(w[before:]).cpu() for w in meter.windows], dim=1).double()

        distributed.together(work)
        mine_windows = [w for _, (_, start, stop) in mine for w in range(start, stop)]
        per_window = distributed.gather_rows(per_window[mine_windows], mine_windows, n)
        per_batch = distributed.gather_rows(per_batch[[i for i, _ in mine]], [i for i, _ in mine], len(self.batches))
        summed = [self._reduce(m) for m in meters]
        total = SparsityMeter([sum(m.active[i] for m in summed) for i in range(n_layers)],
                              [sum(m.tokens[i] for m in summed) for i in range(n_layers)])
        counted = float(per_batch[:, 0].sum())
        return SparseEval(method, value, Loss(float(per_window[:, 0].sum()), self.windows[:, 1:].numel()),
                          total.activation_ratio, total.layer_sparsity, total.neuron_frequency,
                          per_batch[:, 1:].sum(0) / max(counted, 1) if method == "cett" else None,
                          per_window[:, 0].clone(), per_window[:, 1:].round().long(),
                          [m.neuron_frequency for m in summed])

    def _reduce(self, meter: SparsityMeter) -> SparsityMeter:
        """The meter's counts summed over ranks (itself in a single process)."""
        n_layers = len(self.layers)
        sums = distributed.all_reduce({f"active{i}": a for i, a in enumerate(meter.active)}
                                      | {f"tokens{i}": t for i, t in enumerate(meter.tokens)})
        return SparsityMeter([sums[f"active{i}"] for i in range(n_layers)], [sums[f"tokens{i}"] for i in range(n_layers)])

    def ratio(self, run: SparseEval) -> float:
        """Perplexity ratio exp(L_sparse − L_dense) of an evaluation on these windows."""
        return math.exp(run.loss.mean - self.dense.mean)

    def ppl_p(self, p: float = 1.0, tol: float = 1e-3, *, max_iter: int = 30, start: float = 0.5, step: float = 2.0,
              slope: float | None = None) -> PPLpResult:
        """Search c in (0, 1] until the perplexity ratio is within `tol` of 1 + p/100 (see `ppl_p`).

        In x = log2 c: first c = `start`; until the target is bracketed, x moves by `step` towards it (or, with
        `slope` = d ratio_gap / d x from an earlier search, by the secant step, at most `step`; upwards at most
        half way to x = 0, so c = 1, where every neuron is skipped, is never evaluated); once a c below and
        one above the target are known, regula falsi between the closest such pair, with a halving step whenever
        the same end was kept twice (the Illinois safeguard), so the bracket always shrinks. The interpolation
        runs on ratio_gap, log((ratio − 1) / (target − 1)): the perplexity's excess grows about like a power of
        c, so this is close to linear in x, where the ratio itself is convex and regula falsi on it creeps up on
        the target from below (SmolLM2 stopped 0.17 points short after 3 steps).
        """
        if p <= 0 or tol <= 0:
            raise BabelError(f"p and tol must be positive (got p={p}, tol={tol}); the standard is p=1, tol=1e-3")
        if not 0 < start <= 1 or step <= 0:
            raise BabelError(f"start must lie in (0, 1] and step be positive (got start={start}, step={step})")
        target = 1.0 + p / 100.0
        points: list[tuple[float, float]] = []  # (x, ratio_gap(ratio, target))
        runs, trace, kept = [], [], []
        x = math.log2(start)
        for _ in range(max_iter):
            c = 2.0 ** x
            run = self.evaluate("cett", c)
            ratio = self.ratio(run)
            runs.append(run)
            trace.append({"cett": c, "ppl_ratio": ratio, "activation_ratio": run.activation_ratio})
            points.append((x, ratio_gap(ratio, target)))
            if abs(ratio - target) <= tol:
                break
            x = _next_x(points, kept, step, slope)
            if x is None:
                break
        best = min(range(len(runs)), key=lambda i: abs(trace[i]["ppl_ratio"] - target))
        run, ratio = runs[best], trace[best]["ppl_ratio"]
        return PPLpResult(p=p, tol=tol, cett=trace[best]["cett"], activation_ratio=run.activation_ratio,
                          layer_sparsity=run.layer_sparsity, thresholds=run.thresholds, dense_loss=self.dense.mean,
                          sparse_loss=run.loss.mean, ppl_ratio=ratio, converged=abs(ratio - target) <= tol,
                          tokens=run.loss.tokens, neuron_frequency=run.neuron_frequency, trace=trace, runs=runs)


def ratio_gap(ratio: float, target: float) -> float:
    """Where a perplexity ratio stands against the target 1 + p/100 on the PPL-p% search's scale:
    log((ratio − 1) / (target − 1)), positive above the target (ratios ≤ 1, noise at tiny c, sit at −log 1000)."""
    return math.log(max(ratio - 1.0, (target - 1.0) * 1e-3) / (target - 1.0))


def _next_x(points: list[tuple[float, float]], kept: list[str], step: float, slope: float | None) -> float | None:
    """The next log2 c of the PPL-p% search (see SparseEvaluator.ppl_p); None when no c in (0, 1] is left to try.

    points: every evaluated (log2 c, ratio_gap); kept: which bracket end each bracketed step kept.
    """
    above = [(x, f) for x, f in points if f > 0]
    below = [(x, f) for x, f in points if f <= 0]
    if above and below and min(above)[0] > min(below)[0]:
        hi = min(above)  # the smallest c above the target
        lo = max(p for p in below if p[0] < hi[0])  # the largest c below it
        kept.append("lo" if points[-1] == hi else "hi" if points[-1] == lo else "")
        fa, fb = lo[1], hi[1]
        if kept[-2:] == ["lo", "lo"]:
            fa /= 2  # Illinois: the low end was kept twice, so move the next point towards it
        elif kept[-2:] == ["hi", "hi"]:
            fb /= 2
        return lo[0] - fa * (hi[0] - lo[0]) / (fb - fa)
    x, f = points[-1]
    if f <= 0 and x >= 0:
        return None  # c = 1 is below the target: nothing larger to try
    move = min(abs(f / slope), step) if slope and slope > 0 and len(points) == 1 else step
    return min(x + move, x / 2) if f <= 0 else x - move  # upwards at most half way to c = 1, never onto it


def evaluate_sparse(lm_or_model: LoadedModel | nn.Module, windows: torch.Tensor, method: str,
                    value: float | None = None, *, batch_size: int = 4) -> SparseEval:
    """Next-token loss and activation ratio with `method` at `value` (CETT: the CETT value c)."""
    return SparseEvaluator(lm_or_model, windows, batch_size=batch_size).evaluate(method, value)


def ppl_p(lm_or_model: LoadedModel | nn.Module, windows: torch.Tensor, p: float = 1.0, tol: float = 1e-3, *,
          batch_size: int = 4, max_iter: int = 30) -> PPLpResult:
    """PPL-p%: search the CETT value c until exp(L_sparse − L_dense) is within `tol` of 1 + p/100.

    windows: LongTensor [n, seq_len] (perplexities compare only at one fixed seq_len). Each batch's thresholds
    are re-derived from its own dense activations at every c. After `max_iter` evaluations without reaching the
    target it returns the evaluated c whose ratio came closest, with converged=False.
    """
    return SparseEvaluator(lm_or_model, windows, batch_size=batch_size).ppl_p(p, tol, max_iter=max_iter)
