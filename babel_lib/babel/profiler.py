"""Per-language expert activation frequencies: count, on the device, how often each expert is activated.

`ExpertProfiler` hooks the neuron activation a (the down projection's input) of every layer. Per token it
scores each expert (s_e = sum of f(a_i) over the expert's neurons, f = identity, |.| or max(., 0)), picks the
activated experts by a rule, and adds them into int64 counters [n_groups, n_layers, n_experts]; a group is
whatever the caller counts separately (a language, a language x split-half). One forward feeds several
countings: every (rule, mode) pair asked for, on every expert map given (e.g. notebook 01's partition and a
coarser one of about 43 neurons per expert, the paper's size). Rules:

  topk       per layer, the experts whose score is >= the k-th largest (k = round(ratio * n_experts));
             ties at the k-th score all count, so the rule does not depend on a sort's tie order.
  zscore     Unraveling Babel v1: z-normalise the scores within each layer (population std), then take,
             across all layers, the experts whose z is >= the K-th largest (K = round(ratio * L * E)).
  threshold  the experts whose score is > `threshold`.

Per-neuron counts come out of the same pass, by a magnitude rule: neuron i is active on a token when
|a_i| > neuron_scale x the root mean square of that token's a over the layer's neurons (scale-free per token
and layer; the sign a_i > 0 is a coin flip for gated FFNs, 0.49-0.51 in every layer of both embedded
models). Only tokens of the batch's count mask count (never BOS, padding or other special tokens). Nothing token-level outlives a batch, nothing is copied
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


def neuron_rule(scale: float) -> str:
    """When a neuron counts as active, in words (recorded with every artefact)."""
    return f"|a_i| > {scale:g} x RMS of the token's a over the layer's neurons"


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
    variants: tuple[tuple[str, str], ...] = (("zscore", "sum"), ("topk", "abs"), ("zscore", "abs"))  # more
    # (rule, mode) countings from the same forward, beside (rule, mode)
    expert_neurons: int | None = param(43, ge=1)  # also count experts of about this many neurons (a second
    # partition made like notebook 01's; the paper's 11008 / 256 = 43); None = only 01's experts
    neuron_scale: float = param(1.0, gt=0)  # neuron active: |a_i| > neuron_scale x the token's RMS of a
    compile: bool = False  # torch.compile the per-layer counting (pays off on CUDA)

    def check(self) -> None:
        for rule, mode in self.variants:
            if rule not in RULES or mode not in SCORE_MODES:
                raise self.invalid("variants", f"[{rule}, {mode}] is not a [rule, mode] pair; rules: "
                                   f"{', '.join(RULES)}; modes: {', '.join(SCORE_MODES)}")

    def countings(self) -> list[tuple[str, str]]:
        """(rule, mode) pairs counted, the main one first, without repeats."""
        return list(dict.fromkeys([(self.rule, self.mode), *map(tuple, self.variants)]))


def magnitude_counts(a: torch.Tensor, mask: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Per neuron, how many tokens of `mask` have |a_i| > scale x RMS of the token's a over the layer's neurons:
    a [N, d_ff], mask [N] bool -> int64 [d_ff]. The RMS is taken in float32 (float64 for float64 a).

    On CUDA one masked boolean reduction (int32 per batch; torch.compile fuses it into a single pass over a); on
    the CPU a float32 mask-vector product, about twice as fast there and exact while a batch has < 2^24 tokens.
    """
    x = a if a.dtype == torch.float64 else a.float()
    active = x.abs() > scale * x.square().mean(-1, keepdim=True).sqrt()
    if a.is_cuda:
        return (active & mask[:, None]).sum(0, dtype=torch.int32)
    return (mask.to(x.dtype) @ active.to(x.dtype)).long()


def active_experts(scores: torch.Tensor, rule: str, k: int = 0, threshold: float = 0.0) -> torch.Tensor:
    """The activated set [..., E] bool from scores [..., E] under rule "topk" (score >= the k-th largest along
    the last axis) or "threshold" (score > threshold). zscore reuses topk on z-scores flattened over layers."""
    if rule == "threshold":
        return scores > threshold
    return top_experts(scores, k)


def tally(scores: torch.Tensor, mask: torch.Tensor, rule: str, k: int, threshold: float) -> torch.Tensor:
    """One layer's expert counts [E] for one batch under rule "topk" or "threshold" (what torch.compile fuses)."""
    return (active_experts(scores, rule, k, threshold) & mask[:, None]).sum(0)


def zscores(scores: torch.Tensor) -> torch.Tensor:
    """Scores standardised along the last axis (population std; a constant row gives zeros, not NaN)."""
    std, mean = torch.std_mean(scores, -1, correction=0, keepdim=True)  # one kernel: ~10x mean + std on the CPU
    return (scores - mean) / std.clamp_min(torch.finfo(scores.dtype).tiny)


class ExpertProfiler:
    """Context manager counting expert (and neuron) activations per group on the model's device.

    with ExpertProfiler(lm, experts, n_groups=17) as prof:
        for group, batch in ...: prof.count(batch, group)     # or prof.set_batch(mask, group); model(...)
    prof.expert_counts [G, L, E], prof.neuron_counts [G, L, d_ff], prof.tokens [G]   (int64, on the device)

    `experts` is one ExpertMap or several (their counts are prof.counts[(map index, rule, mode)], each
    [G, L, E of that map]); every map is counted under (rule, mode) and under each of `variants`, all from the
    same forward. prof.expert_counts is the first map's (rule, mode) counts.
    Scores are computed in float64 for float64 models (so counts match a float64 reference exactly), in
    float32 otherwise, by ExpertMap.scores (the one scoring path). scorer="matmul" (the default on CUDA) is one
    matmul with the one-hot assignment (for bf16/fp16 activations on CUDA a half-precision matmul with float32
    output: fp32 accumulation, no fp32 copy of the activations); scorer="index_add" (the default on the CPU)
    adds each neuron into its expert, a fraction of the matmul's cost when d_model is small (the embedded
    models: E / d_model is 0.4). `compile=True` fuses the per-layer counting (activated set, masks,
    reductions) with torch.compile (for CUDA; the same counts).
    """

    def __init__(self, model: LoadedModel | nn.Module, experts: ExpertMap | Sequence[ExpertMap], n_groups: int = 1,
                 *, rule: str = "topk", ratio: float = 0.25, threshold: float = 0.0, mode: str = "sum",
                 variants: Sequence[tuple[str, str]] = (), neurons: bool = True, neuron_scale: float = 1.0,
                 scorer: str = "auto", compile: bool = False):
        self.model = model.model if isinstance(model, LoadedModel) else model
        self.maps = [experts] if isinstance(experts, ExpertMap) else list(experts)
        self.countings = list(dict.fromkeys([(rule, mode), *map(tuple, variants)]))
        for r, m in self.countings:
            if r not in RULES:
                raise BabelError(f"unknown activation rule {r!r}; choose one of {', '.join(RULES)}")
            if m not in SCORE_MODES:
                raise BabelError(f"unknown score mode {m!r}; choose one of {', '.join(SCORE_MODES)}")
        if scorer not in ("auto", *SCORERS):
            raise BabelError(f"unknown scorer {scorer!r}; choose one of auto, {', '.join(SCORERS)}")
        if n_groups < 1:
            raise BabelError(f"n_groups={n_groups} must be at least 1")
        if not self.maps or len({(m.n_layers, m.width) for m in self.maps}) > 1:
            raise BabelError("the expert maps must all be of one model (same layers and width); pass one map per "
                             "partition of that model")
        if neuron_scale <= 0:
            raise BabelError(f"neuron_scale={neuron_scale} must be positive")
        L = self.maps[0].n_layers
        self.k: dict[tuple[int, str], int] = {}  # (map index, rule) -> experts selected per token
        for i, em in enumerate(self.maps):
            for r in {r for r, _ in self.countings if r != "threshold"}:
                pool = em.n_experts * (L if r == "zscore" else 1)
                self.k[i, r] = round(ratio * pool)
                if not 1 <= self.k[i, r] <= pool:
                    raise BabelError(f"ratio={ratio} selects {self.k[i, r]} of {pool} experts; choose a ratio in "
                                     f"[{0.5 / pool:.3g}, 1]")
        self.rule, self.ratio, self.threshold, self.mode = rule, ratio, threshold, mode
        self.device = next(self.model.parameters()).device
        self.scorer = scorer if scorer != "auto" else "matmul" if self.device.type == "cuda" else "index_add"
        long = {"dtype": torch.long, "device": self.device}
        self.counts = {(i, r, m): torch.zeros(n_groups, L, em.n_experts, **long)
                       for i, em in enumerate(self.maps) for r, m in self.countings}
        self.neuron_counts = torch.zeros(n_groups, L, self.maps[0].width if neurons else 0, **long)
        self.tokens = torch.zeros(n_groups, **long)
        self.neurons, self.neuron_scale = neurons, neuron_scale
        self._magnitude = torch.compile(magnitude_counts) if compile else magnitude_counts
        self._tally = torch.compile(tally) if compile else tally
        self._z: dict[tuple[int, str], torch.Tensor] = {}  # (map, mode) -> [N, L, E] z-scores of the batch
        self._mask: torch.Tensor | None = None
        self._masks: dict[torch.device, torch.Tensor] = {}
        self._group = 0
        self._stack: ExitStack | None = None

    @property
    def expert_counts(self) -> torch.Tensor:
        """The first map's counts under (rule, mode): [G, L, E]."""
        return self.counts[0, self.rule, self.mode]

    @property
    def n_groups(self) -> int:
        return self.tokens.numel()

    def __enter__(self) -> ExpertProfiler:
        from babel_lib.core.ffn import ffn_layers

        layers = ffn_layers(self.model)
        for em in self.maps:
            em.check_model(len(layers), layers[0].width)
        self._stack = ExitStack()
        hooks = {site(layer, "mlp.hook_post"): self._hook(layer) for layer in range(self.maps[0].n_layers)}
        self._stack.enter_context(hooked(self.model, hooks))
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack, self._z, self._mask = self._stack, None, {}, None
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
        g, L, home = self._group, self.maps[0].n_layers, self.device
        last = layer == L - 1
        for i, em in enumerate(self.maps):
            scores = {m: em.scores(layer, a, m, self.scorer) for m in dict.fromkeys(m for _, m in self.countings)}
            for rule, mode in self.countings:
                if rule != "zscore":
                    counts = self._tally(scores[mode], mask, rule, self.k.get((i, rule), 0), self.threshold)
                    self.counts[i, rule, mode][g, layer] += counts.to(home)
                    continue
                z = self._z.get((i, mode))
                if z is None or z.shape[0] != a.shape[0] or z.dtype != scores[mode].dtype:
                    z = self._z[i, mode] = scores[mode].new_empty(a.shape[0], L, em.n_experts)
                z[:, layer] = zscores(scores[mode])
                if last:  # every layer's z is in: pick the globally top fraction across layers
                    active = active_experts(z.flatten(1), "topk", self.k[i, rule]).view_as(z)
                    self.counts[i, rule, mode][g] += (active & mask.to(z.device)[:, None, None]).sum(0).to(home)
        if self.neurons:
            self.neuron_counts[g, layer] += self._magnitude(a, mask, self.neuron_scale).to(home)
        if last:
            self.tokens[g] += mask.sum().to(home)


def variant_key(rule: str, mode: str, n_experts: int) -> str:
    """The artefact's tensor name of one counting's split-half counts [2, n, L, E]."""
    return f"expert_counts_halves:{rule}:{mode}:{n_experts}"


def profile_languages(lm: LoadedModel, experts: ExpertMap | Sequence[ExpertMap], texts: Mapping[str, Sequence[str]],
                      *, rule: str = "topk", ratio: float = 0.25, threshold: float = 0.0, mode: str = "sum",
                      variants: Sequence[tuple[str, str]] = (), neuron_scale: float = 1.0, batch_tokens: int = 4096,
                      max_length: int = 256, compile: bool = False, progress: bool = True) -> dict[str, torch.Tensor]:
    """Count expert and neuron activations per language (texts: {code: paragraphs}) in one pass.

    Even and odd paragraphs go to separate groups (group = 2 * language + half), so split-half stability
    comes free. Returns CPU tensors: expert_counts [n, L, E] (the first map, (rule, mode)), neuron_counts
    [n, L, d_ff], tokens [n] (the artefact contract), expert_counts_halves [2, n, L, E] and tokens_halves [2, n],
    and for every other map and (rule, mode) counted, variant_key(rule, mode, E): its halves [2, n, L, E].
    """
    from tqdm.auto import tqdm

    codes = list(texts)
    n = len(codes)
    jobs = [(2 * i + half, batch) for i, code in enumerate(codes) for half in (0, 1) if list(texts[code])[half::2]
            for batch in paragraph_batches(lm.tokenizer, list(texts[code])[half::2], batch_tokens=batch_tokens,
                                           max_length=max_length)]
    mine = distributed.shard(jobs)  # under torchrun: this rank's batches; the counters are summed below
    with ExpertProfiler(lm, experts, 2 * n, rule=rule, ratio=ratio, threshold=threshold, mode=mode,
                        variants=variants, neuron_scale=neuron_scale, compile=compile) as prof:
        def work():
            for _, (group, batch) in tqdm(mine, desc=f"{lm.name}: profiling", disable=not progress, leave=False):
                prof.count(batch, group)
        distributed.together(work)
    keys = {variant_key(r, m, prof.maps[i].n_experts): key for key in prof.counts for i, r, m in [key]}
    if len(keys) != len(prof.counts):
        raise BabelError("two expert maps have the same number of experts; count each partition size once")
    counts = distributed.all_reduce({**{k: prof.counts[v] for k, v in keys.items()}, "neurons": prof.neuron_counts,
                                     "tokens": prof.tokens})
    tokens_halves = counts["tokens"].cpu().view(n, 2).T
    if int(tokens_halves.min()) == 0:
        empty = [codes[i] for i in range(n) if int(tokens_halves[:, i].min()) == 0]
        raise BabelError(f"languages {empty} have no counted token in one split half; give each at least two "
                         "non-empty paragraphs")
    halves = {k: counts[k].cpu().view(n, 2, *counts[k].shape[1:]).transpose(0, 1).contiguous() for k in keys}
    main = halves.pop(variant_key(rule, mode, prof.maps[0].n_experts))
    neurons = counts["neurons"].cpu().view(n, 2, *prof.neuron_counts.shape[1:]).sum(1)
    return {"expert_counts": main.sum(0), "neuron_counts": neurons, "tokens": tokens_halves.sum(0),
            "expert_counts_halves": main, "tokens_halves": tokens_halves.contiguous(), **halves}


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
    tokens [n], expert_counts_halves [2, n, L, E] (the main counting), tokens_halves [2, n], and the halves
    [2, n, L, E] of every other counting; meta["countings"] names each one's tensor), its metadata and file."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path | None

    def summary(self) -> dict[str, Any]:
        """The shape of the counts and how many tokens they rest on."""
        counts, tokens = self.tensors["expert_counts"], self.tensors["tokens"]
        return {"layers": counts.shape[1], "experts per layer": counts.shape[2], "tokens counted": int(tokens.sum()),
                "tokens per language (min–max)": f"{int(tokens.min())}–{int(tokens.max())}",
                "countings": len(self.meta["countings"]), "artefact": self.path.name if self.path else None}


def partitions(store: ArtefactStore | None, lm: LoadedModel, params: ProfileParams, profile: str, model: str = "",
               base: LoadedModel | None = None) -> list[Partition]:
    """The partitions a profile counts: notebook 01's under `profile` (of `base` when profiling its instruct
    variant), then, with params.expert_neurons, the same method and seed at round(d_ff / expert_neurons)
    experts (the paper's 43-neuron size; skipped when that is 01's size, or too few experts for `ratio` to select
    one: a tiny model's FFN)."""
    from babel_lib.babel.conversion import partition, run_partition
    from babel_lib.core import config

    owner = base or lm
    main = run_partition(store, owner, profile, model)
    if params.expert_neurons is None:
        return [main]
    n = max(1, round(main.experts.width / params.expert_neurons))
    if n == main.experts.n_experts or round(n * params.ratio) < 1:
        return [main]
    P1 = config.notebook_params("01_convert", profile, model)
    return [main, partition(store, owner, main.params.replace(n_experts=n), P1.languages, config.text_source(P1))]


def profile(store: ArtefactStore | None, lm: LoadedModel, parts: Partition | Sequence[Partition],
            params: ProfileParams, texts: Mapping[str, Sequence[str]], *, split: str, progress: bool = True) -> Profile:
    """`profile_languages` of `lm` with the partitions' experts (the first is the main one), saved as (or loaded
    from) the "frequencies" artefact. The key holds every field of `params`, the code, the model and its
    fingerprint, the partitions' keys (a base model's partitions when profiling its instruct variant), the
    languages, the split and the texts' sha256."""
    parts = [parts] if isinstance(parts, Partition) else list(parts)
    codes = list(texts)
    key = params.key(model=lm.name, fingerprint=lm.fingerprint, partition=parts[0].key,
                     partitions=[p.key for p in parts[1:]], languages=codes, split=split,
                     texts_sha256=texts_sha256([list(texts[c]) for c in codes]))
    countings = [{"rule": r, "mode": m, "n_experts": p.experts.n_experts,
                  "neurons_per_expert": p.experts.width / p.experts.n_experts,
                  "tensor": "expert_counts_halves" if (i, r, m) == (0, params.rule, params.mode)
                  else variant_key(r, m, p.experts.n_experts)}
                 for i, p in enumerate(parts) for r, m in params.countings()]
    meta = {"model": lm.name, "card": lm.card, "languages": codes, "split": split, **params.as_dict(),
            "n_experts": parts[0].experts.n_experts, "partition": parts[0].params.as_dict(),
            "neuron_rule": neuron_rule(params.neuron_scale), "countings": countings}

    def compute():
        return profile_languages(lm, [p.experts for p in parts], texts, rule=params.rule, ratio=params.ratio,
                                 threshold=params.threshold, mode=params.mode, variants=params.variants,
                                 neuron_scale=params.neuron_scale, batch_tokens=params.batch_tokens,
                                 max_length=params.max_length, compile=params.compile, progress=progress), meta

    if store is None:
        return Profile(compute()[0], meta, None)
    tensors, meta = store.cached(params.KIND, key, compute)
    return Profile(tensors, meta, store.paths(params.KIND, key)[0])


def token_fragmentation(tokenizer: Any, texts: Mapping[str, Sequence[str]], reference: str = "en") -> dict[str, Any]:
    """Per language, tokens (no special tokens, no truncation), characters, tokens per character and tokens per
    `reference`-language token (the first language when `reference` is not among them) over the same parallel
    paragraphs: how finely the tokenizer cuts each language."""
    import numpy as np

    reference = reference if reference in texts else next(iter(texts))
    tokens = {c: sum(len(ids) for ids in tokenizer(list(t), add_special_tokens=False)["input_ids"])
              for c, t in texts.items()}
    chars = {c: sum(len(p) for p in t) for c, t in texts.items()}
    codes = list(texts)
    return {"languages": codes, "tokens": np.array([tokens[c] for c in codes]),
            "characters": np.array([chars[c] for c in codes]),
            "tokens_per_character": np.array([tokens[c] / chars[c] for c in codes]),
            "ratio_to_reference": np.array([tokens[c] / tokens[reference] for c in codes]), "reference": reference}


def save_index(artefacts: str | Path, run: str, profiles: Mapping[str, Profile]) -> Path:
    """Write <artefacts>/frequencies/index-<run>.json: {model: artefact path relative to the index's folder}
    (what the explorer reads)."""
    import os

    from babel_lib.babel.explorer import frequency_index

    index = frequency_index(artefacts, run)
    write_json(index, {name: os.path.relpath(p.path, index.parent) for name, p in profiles.items()})
    return index
