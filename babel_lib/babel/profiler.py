"""Per-language expert activation frequencies: count, on the device, how often each expert is activated.

`ExpertProfiler` hooks the neuron activation a (the down projection's input) of every layer. Per token it
scores each expert (s_e = sum of f(a_i) over the expert's neurons, f = identity, |.| or max(., 0)), picks the
activated experts by a rule, and adds them into int64 counters [n_groups, n_layers, n_experts]; a group is
whatever the caller counts separately (a language, a language x split-half). Rules:

  topk       per layer, the experts whose score is >= the k-th largest (k = round(ratio * n_experts));
             ties at the k-th score all count, so the rule does not depend on a sort's tie order.
  zscore     Unraveling Babel v1: z-normalise the scores within each layer (population std), then take,
             across all layers, the experts whose z is >= the K-th largest (K = round(ratio * L * E)).
  threshold  the experts whose score is > `threshold`.

Per-neuron counts come out of the same pass: neuron i is active on a token when a_i > 0 (the sign of the
down projection's input; for a plain FFN this is LAPE's act(W x) > 0). Only tokens of the batch's count mask
count (never BOS, padding or other special tokens). Nothing token-level outlives a batch, nothing is copied
to the host, and the LM head never runs. Counters are plain tensors, so processes can all-reduce them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from babel_lib.babel.conversion import Partition, texts_sha256
from babel_lib.babel.moe import SCORE_MODES, SCORERS, ExpertMap, top_experts
from babel_lib.core import distributed
from babel_lib.core.artefacts import ArtefactStore, write_json
from babel_lib.core.batches import Batch, paragraph_batches
from babel_lib.core.hooks import hooked, site
from babel_lib.core.models import LoadedModel, run_decoder
from babel_lib.core.study import StudyParams, param
from babel_lib.data.texts import TextSource
from babel_lib.errors import BabelError

RULES = ("topk", "zscore", "threshold")
NEURON_RULE = "a > 0"  # when a neuron counts as active (recorded with every artefact)


@dataclass(frozen=True)
class ProfileParams(StudyParams):
    """Notebook 02's counting pass: which text, and when an expert counts as activated on a token."""

    KIND: ClassVar[str] = "frequencies"
    CODE: ClassVar[tuple[str, ...]] = ("babel_lib.babel.profiler", "babel_lib.babel.moe", "babel_lib.core.batches",
                                       "babel_lib.core.hooks")

    paragraphs: int | None = param(80, ge=1)  # calibration paragraphs per language; None = the whole split
    max_length: int = param(256, ge=2)  # tokens per paragraph at most
    batch_tokens: int = param(4096, ge=1)  # tokens per batch (paragraphs of similar length together)
    rule: Literal["topk", "zscore", "threshold"] = "topk"
    ratio: float = param(0.25, gt=0, le=1)  # topk: share of each layer's experts per token; zscore: of all experts
    threshold: float = 0.0  # rule=threshold: activated when the score is above this
    mode: Literal["sum", "abs", "pos"] = "sum"  # expert score from its neurons' activations
    compile: bool = False  # torch.compile the per-layer counting (pays off on CUDA)


def positive_counts(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per neuron, how many tokens of `mask` have a_i > 0: a [N, d_ff], mask [N] bool -> int64 [d_ff].

    On CUDA one masked boolean reduction (int32 per batch; torch.compile fuses it into a single pass over a); on
    the CPU a float32 mask-vector product, about twice as fast there and exact while a batch has < 2^24 tokens.
    """
    if a.is_cuda:
        return ((a > 0) & mask[:, None]).sum(0, dtype=torch.int32)
    return (mask.float() @ (a > 0).float()).long()


def active_experts(scores: torch.Tensor, rule: str, k: int = 0, threshold: float = 0.0) -> torch.Tensor:
    """The activated set [..., E] bool from scores [..., E] under rule "topk" (score >= the k-th largest along
    the last axis) or "threshold" (score > threshold). zscore reuses topk on z-scores flattened over layers."""
    if rule == "threshold":
        return scores > threshold
    return top_experts(scores, k)


def tally(scores: torch.Tensor, a: torch.Tensor, mask: torch.Tensor, rule: str, k: int, threshold: float,
          neurons: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's counts for one batch under rule "topk" or "threshold": experts [E] and neurons [d_ff] (or
    None). One function so that torch.compile can fuse both masked reductions into few passes."""
    experts = (active_experts(scores, rule, k, threshold) & mask[:, None]).sum(0)
    return experts, positive_counts(a, mask) if neurons else None


def zscores(scores: torch.Tensor) -> torch.Tensor:
    """Scores standardised along the last axis (population std; a constant row gives zeros, not NaN)."""
    mean = scores.mean(-1, keepdim=True)
    std = scores.std(-1, correction=0, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    return (scores - mean) / std


class ExpertProfiler:
    """Context manager counting expert (and neuron) activations per group on the model's device.

    with ExpertProfiler(lm, experts, n_groups=17) as prof:
        for group, batch in ...: prof.count(batch, group)     # or prof.set_batch(mask, group); model(...)
    prof.expert_counts [G, L, E], prof.neuron_counts [G, L, d_ff], prof.tokens [G]   (int64, on the device)

    Scores are computed in float64 for float64 models (so counts match a float64 reference exactly), in
    float32 otherwise, by ExpertMap.scores (the one scoring path). scorer="matmul" (the default on CUDA) is one matmul with the one-hot assignment (for
    bf16/fp16 activations on CUDA a half-precision matmul with float32 output: fp32 accumulation, no fp32
    copy of the activations); scorer="index_add" (the default on the CPU) adds each neuron into its expert,
    a fraction of the matmul's cost when d_model is small (the embedded models: E / d_model is 0.4).
    `compile=True` fuses the per-layer counting (activated set, masks, reductions) with torch.compile (for
    CUDA; the same counts).
    """

    def __init__(self, model: LoadedModel | nn.Module, experts: ExpertMap, n_groups: int = 1, *,
                 rule: str = "topk", ratio: float = 0.25, threshold: float = 0.0, mode: str = "sum",
                 neurons: bool = True, scorer: str = "auto", compile: bool = False):
        self.model = model.model if isinstance(model, LoadedModel) else model
        if rule not in RULES:
            raise BabelError(f"unknown activation rule {rule!r}; choose one of {', '.join(RULES)}")
        if mode not in SCORE_MODES:
            raise BabelError(f"unknown score mode {mode!r}; choose one of {', '.join(SCORE_MODES)}")
        if scorer not in ("auto", *SCORERS):
            raise BabelError(f"unknown scorer {scorer!r}; choose one of auto, {', '.join(SCORERS)}")
        if n_groups < 1:
            raise BabelError(f"n_groups={n_groups} must be at least 1")
        L, E = experts.n_layers, experts.n_experts
        pool = E * (L if rule == "zscore" else 1)
        self.k = round(ratio * pool)
        if rule != "threshold" and not 1 <= self.k <= pool:
            raise BabelError(f"ratio={ratio} selects {self.k} of {pool} experts; choose a ratio in "
                             f"[{0.5 / pool:.3g}, 1]")
        self.experts, self.rule, self.ratio, self.threshold, self.mode = experts, rule, ratio, threshold, mode
        self.device = next(self.model.parameters()).device
        self.scorer = scorer if scorer != "auto" else "matmul" if self.device.type == "cuda" else "index_add"
        long = {"dtype": torch.long, "device": self.device}
        self.expert_counts = torch.zeros(n_groups, L, E, **long)
        self.neuron_counts = torch.zeros(n_groups, L, experts.width if neurons else 0, **long)
        self.tokens = torch.zeros(n_groups, **long)
        self.neurons = neurons
        self._positive = torch.compile(positive_counts) if compile else positive_counts
        self._tally = torch.compile(tally) if compile else tally
        self._z: torch.Tensor | None = None  # [N, L, E] z-scores of the current batch (zscore rule only)
        self._mask: torch.Tensor | None = None
        self._masks: dict[torch.device, torch.Tensor] = {}
        self._group = 0
        self._stack: ExitStack | None = None

    @property
    def n_groups(self) -> int:
        return self.tokens.numel()

    def __enter__(self) -> ExpertProfiler:
        from babel_lib.core.ffn import ffn_layers

        layers = ffn_layers(self.model)
        self.experts.check_model(len(layers), layers[0].width)
        self._stack = ExitStack()
        hooks = {site(layer, "mlp.hook_post"): self._hook(layer) for layer in range(self.experts.n_layers)}
        self._stack.enter_context(hooked(self.model, hooks))
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack, self._z, self._mask = self._stack, None, None, None
        stack.close()

    def set_batch(self, count_mask: torch.Tensor, group: int) -> None:
        """Count the next forward's tokens where `count_mask` ([B, T] or [B*T] bool) is True, into `group`."""
        if not 0 <= group < self.n_groups:
            raise BabelError(f"group {group} is outside 0..{self.n_groups - 1}; make the profiler with more n_groups")
        self._mask = count_mask.reshape(-1).to(self.device, torch.bool, non_blocking=True)
        self._masks = {self.device: self._mask}  # a copy per device of a model split over several (device_map)
        self._group = group

    @torch.no_grad()
    def count(self, batch: Batch, group: int) -> None:
        """Run the decoder body (no LM head) on `batch` and count its text tokens into `group`."""
        if self._stack is None:
            raise BabelError("ExpertProfiler.count needs the hooks: use it inside `with ExpertProfiler(...) as p:`")
        tensors = (batch.input_ids, batch.attention_mask, batch.count_mask)
        if self.device.type == "cuda":  # a copy from pinned memory does not wait for the GPU's queue
            tensors = tuple(t if t.is_cuda else t.pin_memory() for t in tensors)
        batch = Batch(*(t.to(self.device, non_blocking=True) for t in tensors))
        self.set_batch(batch.count_mask, group)
        run_decoder(self.model, batch.input_ids, batch.attention_mask)

    def _hook(self, layer: int):
        def observe(a: torch.Tensor) -> None:
            if self._mask is None:
                raise BabelError("the profiler has no batch: call profiler.count(batch, group), or "
                                 "profiler.set_batch(count_mask, group) before running the model")
            flat = a.reshape(-1, a.shape[-1])
            if flat.shape[0] != self._mask.numel():
                raise BabelError(f"the count mask has {self._mask.numel()} tokens but layer {layer} saw "
                                 f"{flat.shape[0]}; call set_batch with this batch's count_mask")
            if flat.device not in self._masks:
                self._masks[flat.device] = self._mask.to(flat.device, non_blocking=True)
            self._observe(layer, flat, self._masks[flat.device])

        return observe

    def _observe(self, layer: int, a: torch.Tensor, mask: torch.Tensor) -> None:
        """Count on the layer's own device; the per-layer sums join the counters on the profiler's device."""
        g, last, home = self._group, layer == self.experts.n_layers - 1, self.device
        scores = self.experts.scores(layer, a, self.mode, self.scorer)
        if self.rule == "zscore":
            if self._z is None or self._z.shape[0] != a.shape[0] or self._z.dtype != scores.dtype:
                self._z = scores.new_empty(a.shape[0], self.experts.n_layers, self.experts.n_experts)
            self._z[:, layer] = zscores(scores)
            if last:  # every layer's z is in: pick the globally top fraction across layers
                active = active_experts(self._z.flatten(1), "topk", self.k).view_as(self._z)
                self.expert_counts[g] += (active & mask.to(self._z.device)[:, None, None]).sum(0).to(home)
            if self.neurons:
                self.neuron_counts[g, layer] += self._positive(a, mask).to(home)
        else:
            experts, neurons = self._tally(scores, a, mask, self.rule, self.k, self.threshold, self.neurons)
            self.expert_counts[g, layer] += experts.to(home)
            if self.neurons:
                self.neuron_counts[g, layer] += neurons.to(home)
        if last:
            self.tokens[g] += mask.sum().to(home)


def profile_languages(lm: LoadedModel, experts: ExpertMap, texts: Mapping[str, Sequence[str]], *,
                      rule: str = "topk", ratio: float = 0.25, threshold: float = 0.0, mode: str = "sum",
                      batch_tokens: int = 4096, max_length: int = 256, compile: bool = False,
                      progress: bool = True) -> dict[str, torch.Tensor]:
    """Count expert and neuron activations per language (texts: {code: paragraphs}) in one pass.

    Even and odd paragraphs go to separate groups (group = 2 * language + half), so split-half stability
    comes free. Returns CPU tensors: expert_counts [n, L, E], neuron_counts [n, L, d_ff], tokens [n] (the
    artefact contract), expert_counts_halves [2, n, L, E] and tokens_halves [2, n].
    """
    from tqdm.auto import tqdm

    codes = list(texts)
    n = len(codes)
    jobs = [(2 * i + half, batch) for i, code in enumerate(codes) for half in (0, 1) if list(texts[code])[half::2]
            for batch in paragraph_batches(lm.tokenizer, list(texts[code])[half::2], batch_tokens=batch_tokens,
                                           max_length=max_length)]
    mine = distributed.shard(jobs)  # under torchrun: this rank's batches; the counters are summed below
    with ExpertProfiler(lm, experts, 2 * n, rule=rule, ratio=ratio, threshold=threshold, mode=mode,
                        compile=compile) as prof:
        def work():
            for _, (group, batch) in tqdm(mine, desc=f"{lm.name}: profiling", disable=not progress, leave=False):
                prof.count(batch, group)
        distributed.together(work)
    counts = distributed.all_reduce({"experts": prof.expert_counts, "neurons": prof.neuron_counts,
                                     "tokens": prof.tokens})
    halves = counts["experts"].cpu().view(n, 2, *prof.expert_counts.shape[1:]).transpose(0, 1)
    tokens_halves = counts["tokens"].cpu().view(n, 2).T
    neurons = counts["neurons"].cpu().view(n, 2, *prof.neuron_counts.shape[1:]).sum(1)
    if int(tokens_halves.min()) == 0:
        empty = [codes[i] for i in range(n) if int(tokens_halves[:, i].min()) == 0]
        raise BabelError(f"languages {empty} have no counted token in one split half; give each at least two "
                         "non-empty paragraphs")
    return {"expert_counts": halves.sum(0), "neuron_counts": neurons, "tokens": tokens_halves.sum(0),
            "expert_counts_halves": halves.contiguous(), "tokens_halves": tokens_halves.contiguous()}


def calibration_sample(languages: Sequence[str], paragraphs: int | None, source: TextSource = TextSource()
                       ) -> dict[str, list[str]]:
    """`paragraphs` rows of the calibration split (all when None), evenly spaced over it so they come from
    many help pages, each in every language: {code: paragraphs}."""
    import numpy as np

    corpus = source.load(languages, "calibration")
    n = min(paragraphs or len(corpus), len(corpus))
    rows = np.linspace(0, len(corpus) - 1, n).round().astype(int)
    sample = corpus.select(sorted(set(rows.tolist())))
    return {lang: list(sample[lang]) for lang in languages}


@dataclass
class Profile:
    """One model's counts (the "frequencies" artefact: expert_counts [n, L, E], neuron_counts [n, L, d_ff],
    tokens [n], expert_counts_halves [2, n, L, E], tokens_halves [2, n]), its metadata and file."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path | None

    def summary(self) -> dict[str, Any]:
        """The shape of the counts and how many tokens they rest on."""
        counts, tokens = self.tensors["expert_counts"], self.tensors["tokens"]
        return {"layers": counts.shape[1], "experts per layer": counts.shape[2], "tokens counted": int(tokens.sum()),
                "tokens per language (min–max)": f"{int(tokens.min())}–{int(tokens.max())}",
                "artefact": self.path.name if self.path else None}


def profile(store: ArtefactStore | None, lm: LoadedModel, partition: Partition, params: ProfileParams,
            texts: Mapping[str, Sequence[str]], *, split: str, progress: bool = True) -> Profile:
    """`profile_languages` of `lm` with `partition`'s experts, saved as (or loaded from) the "frequencies"
    artefact. The key holds every field of `params`, the code, the model and its fingerprint, the partition's
    key (a base model's partition when profiling its instruct variant), the languages, the split and the
    texts' sha256."""
    codes = list(texts)
    key = params.key(model=lm.name, fingerprint=lm.fingerprint, partition=partition.key, languages=codes,
                     split=split, texts_sha256=texts_sha256([list(texts[c]) for c in codes]))
    meta = {"model": lm.name, "card": lm.card, "languages": codes, "split": split, **params.as_dict(),
            "n_experts": partition.experts.n_experts, "partition": partition.params.as_dict(),
            "neuron_rule": NEURON_RULE}

    def compute():
        return profile_languages(lm, partition.experts, texts, rule=params.rule, ratio=params.ratio,
                                 threshold=params.threshold, mode=params.mode, batch_tokens=params.batch_tokens,
                                 max_length=params.max_length, compile=params.compile, progress=progress), meta

    if store is None:
        return Profile(compute()[0], meta, None)
    tensors, meta = store.cached(params.KIND, key, compute)
    return Profile(tensors, meta, store.paths(params.KIND, key)[0])


def save_index(artefacts: str | Path, run: str, profiles: Mapping[str, Profile]) -> Path:
    """Write <artefacts>/frequencies/index-<run>.json: {model: artefact path relative to the index's folder}
    (what the explorer reads)."""
    import os

    from babel_lib.babel.explorer import frequency_index

    index = frequency_index(artefacts, run)
    write_json(index, {name: os.path.relpath(p.path, index.parent) for name, p in profiles.items()})
    return index
