"""Notebook 05's studies: per-language perplexity under expert pruning, and the sliced model's measured speed.

`prune` evaluates, on held-out windows of every evaluation language (one fixed seq_len, the chunked LM head of
`window_loss`): the unpruned model; frequency-guided pruning with the language's own frequencies (uniform and
layer-adaptive counts) at every rate; random pruning with the same per-layer counts (several seeds); a
cross-lingual matrix (prune with A's frequencies, evaluate on B) at one rate; and dynamic top-k expert sparsity
at every active ratio. `sliced_speed` times the decoder body of sliced models against the dense one.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from babel_lib.babel.moe import ExpertMap
from babel_lib.babel.pruning import (Frequencies, dynamic, frequency_keep, keep_masks, masked, random_keep, sliced,
                                     uniform_counts)
from babel_lib.core.artefacts import ArtefactStore
from babel_lib.core.batches import windows
from babel_lib.core.evaluation import window_loss
from babel_lib.core.ffn import ffn_layers
from babel_lib.core.models import LoadedModel, run_decoder
from babel_lib.core.study import StudyParams, param
from babel_lib.core.verdicts import Verdict, decide


@dataclass(frozen=True)
class PruneParams(StudyParams):
    """Notebook 05: which prunings are evaluated, on which held-out text, and how the speed is timed."""

    KIND: ClassVar[str] = "pruning"
    CODE: ClassVar[tuple[str, ...]] = ("babel_lib.babel.pruning", "babel_lib.babel.pruning_study",
                                       "babel_lib.babel.moe", "babel_lib.core.evaluation", "babel_lib.core.batches")

    eval_languages: tuple[str, ...] = ("en", "ru", "ja", "tr")  # per-language curves and the cross-lingual matrix
    rates: tuple[float, ...] = (0.25, 0.5, 0.75)  # share of each layer's experts pruned
    random_seeds: int = param(3, ge=1)  # random prunings per rate (seeds 0..n-1)
    cross_rate: float = param(0.5, ge=0, lt=1)  # pruning rate of the cross-lingual matrix
    active_ratios: tuple[float, ...] = (0.75, 0.5, 0.25)  # dynamic top-k: share of experts active per token
    dynamic_mode: Literal["sum", "abs", "pos"] = "abs"  # dynamic top-k: the expert score (ExpertMap.scores)
    seq_len: int = param(128, ge=2)  # tokens per evaluation window: perplexities compare only at this length
    windows_per_language: int = param(2, ge=1)
    paragraphs: int = param(40, ge=1)  # held-out paragraphs per language to cut the windows from
    batch_size: int = param(4, ge=1)  # windows per forward
    speed_tokens: int = param(512, ge=2)  # tokens per timed forward of the speed measurement
    speed_repeats: int = param(3, ge=1)  # timed forwards per model (the fastest counts)

    def check(self) -> None:
        if not self.eval_languages:
            raise self.invalid("eval_languages", "the list is empty; name at least one language")
        if len(set(self.eval_languages)) != len(self.eval_languages):
            raise self.invalid("eval_languages", "a language is listed twice")
        for name in ("rates", "active_ratios"):
            values = getattr(self, name)
            if not values:
                raise self.invalid(name, "the list is empty; give at least one value")
        if any(not 0 <= r < 1 for r in self.rates):
            raise self.invalid("rates", f"{list(self.rates)} must all lie in [0, 1); 1 would prune every expert")
        if any(not 0 < r <= 1 for r in self.active_ratios):
            raise self.invalid("active_ratios", f"{list(self.active_ratios)} must all lie in (0, 1]")


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class PruneResult:
    """Mean next-token losses (nats) of every evaluated pruning; perplexity = exp(loss)."""

    model: str
    languages: list[str]
    rates: list[float]
    kept: list[float]  # kept share of experts at each rate (after per-layer rounding)
    dense: np.ndarray  # [n]
    frequency: np.ndarray  # [R, n] own-language frequencies, uniform counts
    adaptive: np.ndarray  # [R, n] own-language frequencies, layer-adaptive counts (same total)
    random: np.ndarray  # [R, S, n]
    cross_rate: float
    cross: np.ndarray  # [n source, n target]
    active_ratios: list[float]
    dynamic: np.ndarray  # [K, n]
    seq_len: int
    tokens: list[int]  # predicted tokens per language

    def ppl(self, losses: np.ndarray) -> np.ndarray:
        return np.exp(losses)

    def findings(self) -> list[str]:
        """The sentences notebook 05 prints, computed from the losses."""
        n, out = len(self.languages), []
        mean, std = self.random.mean(1), self.random.std(1, ddof=1) if self.random.shape[1] > 1 else 0 * self.random[:, 0]
        beats = self.frequency < mean
        clear = self.frequency < mean - 2 * std
        out.append(f"{self.model}: frequency-guided pruning has a lower perplexity than the mean of "
                   f"{self.random.shape[1]} random prunings in {int(beats.sum())} of {beats.size} (language, rate) "
                   f"pairs, lower by more than 2 standard deviations of the random seeds in {int(clear.sum())}.")
        gain = self.frequency - self.dense[None]
        wins = [f"{self.languages[j]} at {self.rates[i]:.0%}" for i, j in zip(*np.nonzero(gain < 0))]
        i, j = np.unravel_index(np.argmin(gain), gain.shape)
        out.append(f"{self.model}: frequency-guided pruning beats the unpruned model in "
                   + (", ".join(wins) if wins else "no language at any rate")
                   + f" (closest: {self.languages[j]} at {self.rates[i]:.0%}, perplexity "
                   f"{math.exp(self.frequency[i, j]):.2f} vs {math.exp(self.dense[j]):.2f} unpruned).")
        ratio = np.exp(self.adaptive - self.frequency)
        out.append(f"{self.model}: layer-adaptive rates give a lower perplexity than the uniform rate at the same "
                   f"total in {int((ratio < 1).sum())} of {ratio.size} (language, rate) pairs (median perplexity "
                   f"ratio adaptive/uniform {np.median(ratio):.3f}).")
        best = self.cross.argmin(0)  # for each target language, the source whose frequencies prune best
        diagonal = [self.languages[b] for b in range(n) if best[b] == b]
        off = self.cross[~np.eye(n, dtype=bool)]
        out.append(f"{self.model}: at {self.cross_rate:.0%} pruned, a language's own frequencies give the lowest "
                   f"perplexity for {len(diagonal)} of {n} target languages ({', '.join(diagonal) or 'none'}); "
                   f"mean diagonal perplexity {np.exp(np.diag(self.cross)).mean():.2f} vs off-diagonal "
                   f"{np.exp(off).mean():.2f}." if n > 1 else f"{self.model}: one language, no cross-lingual matrix.")
        for k, ratio_k in enumerate(self.active_ratios):
            same = [i for i, kept in enumerate(self.kept) if abs(kept - ratio_k) < 0.01]
            line = (f"{self.model}: dynamic top-k with {ratio_k:.0%} of experts active per token: median perplexity "
                    f"ratio to the unpruned model {np.median(np.exp(self.dynamic[k] - self.dense)):.3f}")
            if same:
                line += (f", to static frequency-guided pruning at the same kept share "
                         f"{np.median(np.exp(self.dynamic[k] - self.frequency[same[0]])):.3f}")
            out.append(line + ".")
        return out


def prune(store: ArtefactStore, lm: LoadedModel, experts: ExpertMap, freqs: Frequencies,
          partition: Mapping[str, Any], heldout: Mapping[str, Sequence[str]], params: PruneParams) -> PruneResult:
    """Evaluate every pruning of `params` on held-out text (heldout: {language: paragraphs}); cached as an artefact."""
    freqs.check(experts, partition)
    langs = list(params.eval_languages)
    own = {lang: freqs.of(lang) for lang in langs}
    wins = {lang: windows(lm.tokenizer, list(heldout[lang])[: params.paragraphs], params.seq_len,
                          params.windows_per_language) for lang in langs}
    key = params.key(model=lm.name, fingerprint=lm.fingerprint, partition=dict(partition),
                     frequencies=_digest(freqs.values), windows=_digest(*wins.values()))
    L, E = experts.n_layers, experts.n_experts
    memo: dict[tuple[bytes, str], float] = {}

    def loss(lang: str, keep: torch.Tensor | None = None) -> float:
        ident = (b"" if keep is None else keep.numpy().tobytes(), lang)
        if ident not in memo:
            if keep is None:
                memo[ident] = window_loss(lm.model, wins[lang], batch_size=params.batch_size).mean
            else:
                with masked(lm.model, experts, keep):
                    memo[ident] = window_loss(lm.model, wins[lang], batch_size=params.batch_size).mean
        return memo[ident]

    def compute():
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"{lm.name}: pruning", leave=False)
        rows = {"dense": [loss(lang) for lang in langs], "frequency": [], "adaptive": [], "random": [], "dynamic": []}
        for rate in params.rates:
            counts = uniform_counts(rate, L, E)
            rows["frequency"].append([loss(lang, frequency_keep(own[lang], counts)) for lang in langs])
            rows["adaptive"].append([loss(lang, keep_masks(own[lang], rate, adaptive=True)) for lang in langs])
            rows["random"].append([[loss(lang, random_keep(counts, E, seed)) for lang in langs]
                                   for seed in range(params.random_seeds)])
            bar.update()
        counts = uniform_counts(params.cross_rate, L, E)
        rows["cross"] = [[loss(b, frequency_keep(own[a], counts)) for b in langs] for a in langs]
        for ratio in params.active_ratios:
            row = []
            for lang in langs:
                with dynamic(lm.model, experts, ratio, params.dynamic_mode):
                    row.append(window_loss(lm.model, wins[lang], batch_size=params.batch_size).mean)
            rows["dynamic"].append(row)
        bar.close()
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in rows.items()}, {}

    tensors, _ = store.cached(params.KIND, key, compute)
    t = {k: v.numpy() for k, v in tensors.items()}
    return PruneResult(lm.name, langs, list(params.rates),
                       [1 - float(uniform_counts(r, L, E).sum()) / (L * E) for r in params.rates],
                       t["dense"], t["frequency"], t["adaptive"], t["random"], params.cross_rate, t["cross"],
                       list(params.active_ratios), t["dynamic"], params.seq_len,
                       [int(w[:, 1:].numel()) for w in wins.values()])


@dataclass
class SpeedResult:
    """Decoder-body throughput (tokens/s, no LM head) of the dense model and of sliced models, on this machine."""

    model: str
    device: str
    rates: list[float]  # pruning rate (share of experts removed) per sliced model
    kept: list[float]  # kept share of neurons per sliced model (its width padded to a multiple of 64)
    dense: float  # tokens/s
    pruned: list[float]  # tokens/s per sliced model
    ffn_share: float  # share of the dense body's time spent in the FFNs (measured with hooks)

    def ideal(self) -> list[float]:
        """Ideal speed-up: everything outside the FFN unchanged, FFN time x kept share."""
        return [1 / (1 - self.ffn_share + self.ffn_share * k) for k in self.kept]

    def speedup(self) -> list[float]:
        return [p / self.dense for p in self.pruned]

    def findings(self) -> list[str]:
        parts = [f"{r:.0%} pruned: {s:.2f}x (ideal {i:.2f}x, {s / i:.0%} of it)"
                 for r, s, i in zip(self.rates, self.speedup(), self.ideal())]
        return [f"{self.model} on {self.device}: the FFNs take {self.ffn_share:.0%} of the decoder body's time; "
                f"sliced models run " + "; ".join(parts) + "."]


def _clock(device: torch.device) -> float:
    """Seconds, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _ffn_time(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """(body seconds, FFN seconds) of one forward; an FFN runs from its first projection (gate, or up) to the end of
    its down projection, timed with hooks."""
    spent, starts, handles, device = [0.0], {}, [], ids.device
    for f in ffn_layers(model):
        first = f.gate if f.gate is not None else f.up
        handles.append(first.register_forward_pre_hook(lambda m, a, i=f.index: starts.__setitem__(i, _clock(device))))
        handles.append(f.down.register_forward_hook(
            lambda m, a, o, i=f.index: spent.__setitem__(0, spent[0] + _clock(device) - starts[i])))
    try:
        t0 = _clock(device)
        run_decoder(model, ids)
        return _clock(device) - t0, spent[0]
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def sliced_speed(lm: LoadedModel, experts: ExpertMap, freq: torch.Tensor, ids: torch.Tensor,
                 params: PruneParams) -> SpeedResult:
    """Time the decoder body on `ids` [B, T] for the dense model and for models sliced at every rate (frequency-
    guided keep of `freq` [L, E]); the fastest of `speed_repeats` forwards counts, after one warm-up."""
    def timed(model) -> float:
        t0 = _clock(ids.device)
        run_decoder(model, ids)
        return _clock(ids.device) - t0

    def fastest(model) -> float:
        timed(model)
        return min(timed(model) for _ in range(params.speed_repeats))

    ids, n = ids.to(lm.device), ids.numel()
    dense = fastest(lm.model)
    body, ffn = min((_ffn_time(lm.model, ids) for _ in range(params.speed_repeats)), key=lambda t: t[0])
    kept, pruned = [], []
    for rate in params.rates:
        keep = frequency_keep(freq, uniform_counts(rate, experts.n_layers, experts.n_experts))
        small = sliced(lm.model, experts, keep)
        kept.append(sum(f.width for f in ffn_layers(small)) / sum(f.width for f in ffn_layers(lm.model)))
        pruned.append(n / fastest(small))
        del small
    return SpeedResult(lm.name, str(lm.device), list(params.rates), kept, n / dense, pruned, ffn / body)


def verdicts(results: Sequence[PruneResult], speeds: Sequence[SpeedResult]) -> list[Verdict]:
    """The paper's application claims (babel.md, "Applications" and summary point 3) beside our numbers."""
    paper = "Unraveling Babel"
    beats = sum(int((r.frequency < r.random.mean(1)).sum()) for r in results)
    pairs = sum(r.frequency.size for r in results)
    below_dense = [f"{r.model}: {r.languages[j]}@{r.rates[i]:.0%}" for r in results
                   for i, j in zip(*np.nonzero(r.frequency < r.dense[None]))]
    adaptive = sum(int((r.adaptive < r.frequency).sum()) for r in results)
    fastest = [f"{s.model} {r:.0%} pruned: {x:.2f}x" for s in speeds for r, x in zip(s.rates, s.speedup())]
    return [
        Verdict(paper, "Frequency-guided expert pruning beats random expert pruning",
                "qualitative (summary, point 3; no number)",
                f"lower perplexity than the random mean in {beats}/{pairs} (model, language, rate) cases",
                decide(beats >= 0.9 * pairs, beats > pairs / 2), "reproduced: >= 90% of cases; partly: > 50%"),
        Verdict(paper, "In some languages frequency-guided pruning beats the unpruned model",
                "qualitative (summary, point 3; no number)",
                ", ".join(below_dense) if below_dense else "in no (model, language, rate) case",
                decide(bool(below_dense)), "reproduced: at least one case below the unpruned perplexity"),
        Verdict(paper, "Per-layer pruning rates from activation differences beat one uniform rate",
                "qualitative (summary, point 3; no number)",
                f"adaptive below uniform in {adaptive}/{pairs} cases (same total pruned)",
                decide(adaptive >= 0.9 * pairs, adaptive > pairs / 2), "reproduced: >= 90% of cases; partly: > 50%"),
        Verdict(paper, "Pruning low-activation experts gives ~30% faster inference at comparable quality",
                "about 30% faster (v1, 'Details recoverable')",
                "; ".join(fastest) + " (decoder body on this CPU)",
                decide(any(x >= 1.3 for s in speeds for x in s.speedup()), any(x > 1.05 for s in speeds
                                                                              for x in s.speedup())),
                "reproduced: some sliced model >= 1.3x; partly: > 1.05x (quality: see the perplexity table)"),
    ]
