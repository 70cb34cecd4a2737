"""Convert a loaded model into a fine-grained MoE: partition every layer, keep it as an artefact, check it.

`partition(store, lm, PartitionParams)` is the one way to get a partition: its artefact key comes from the
parameter object (every field, the code, the model's fingerprint, the calibration text), so later notebooks
find it and a changed model or parameter never reuses a stale one. `convert` partitions a run's models with
the main method and the baselines and compares their cohesion; `routed_perplexity` measures what the
conversion is for: the model's perplexity when each token runs only its top-scoring experts.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from tqdm.auto import tqdm

from babel_lib.babel.moe import ExpertMap, routed
from babel_lib.babel.partition import check_n_experts, cohesion, partition_labels
from babel_lib.core.artefacts import ArtefactStore
from babel_lib.core.batches import Batch, paragraph_batches, windows
from babel_lib.core.evaluation import lm_logits, window_loss
from babel_lib.core.ffn import ffn_layers
from babel_lib.core.hooks import hooked, site
from babel_lib.core.models import LoadedModel, run_decoder
from babel_lib.core.study import StudyParams, param
from babel_lib.data.texts import TextSource
from babel_lib.errors import BabelError

Method = Literal["kmeans", "random", "contiguous", "coactivation"]


@dataclass(frozen=True)
class PartitionParams(StudyParams):
    """One partition of every FFN layer into balanced experts (the artefact notebook 01 saves, 02 loads)."""

    KIND: ClassVar[str] = "partition"
    CODE: ClassVar[tuple[str, ...]] = ("babel_lib.babel.partition", "babel_lib.babel.conversion")

    n_experts: int = param(256, ge=1)
    method: Method = "kmeans"
    kmeans_iters: int = param(30, ge=1)
    calibration_paragraphs: int = param(16, ge=1)  # per language, read by method=coactivation only
    seed: int = 0  # layer l uses seed + l


@dataclass(frozen=True)
class ConvertParams(StudyParams):
    """Notebook 01: how each FFN layer is partitioned into experts, and the checks of the converted model."""

    KIND: ClassVar[str] = "conversion"
    CODE: ClassVar[tuple[str, ...]] = ("babel_lib.babel.partition", "babel_lib.babel.conversion")

    n_experts: int = param(256, ge=1)
    method: Method = "kmeans"
    kmeans_iters: int = param(30, ge=1)
    baselines: tuple[Method, ...] = ("random", "contiguous")
    calibration_paragraphs: int = param(16, ge=1)  # per language, for method=coactivation
    check_paragraphs: int = param(2, ge=1)  # held-out paragraphs per language for the logits check
    drop_fraction: float = param(0.5, gt=0, lt=1)  # the control: drop this share of experts, the logits must move
    routed_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)  # top-k routing: share of each layer's experts per token
    routed_seq_len: int = param(64, ge=2)  # tokens per held-out window of the routed-perplexity check
    routed_windows: int = param(1, ge=1)  # held-out windows per language for it
    routed_mode: Literal["sum", "abs", "pos"] = "abs"  # expert score for routing (|a|: the signed sum collapses)

    def check(self) -> None:
        if any(not 0 < f <= 1 for f in self.routed_fractions):
            raise self.invalid("routed_fractions", f"{list(self.routed_fractions)}: every share must be in (0, 1]")

    def partition(self, method: str | None = None, seed: int = 0) -> PartitionParams:
        """The partition this section makes with `method` (default: the main method) and the run's seed."""
        return PartitionParams(n_experts=self.n_experts, method=method or self.method, kmeans_iters=self.kmeans_iters,
                               calibration_paragraphs=self.calibration_paragraphs, seed=seed)


@dataclass(frozen=True)
class Partition:
    """A partition of one model (its experts), the parameters that made it, and its artefact key and file."""

    experts: ExpertMap
    params: PartitionParams
    key: dict[str, Any]
    path: Path | None = None


def texts_sha256(texts: Any) -> str:
    """The sha256 of texts (a list, or a mapping of lists) as JSON: the data part of a cache key."""
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()


def calibration_texts(languages: Sequence[str], paragraphs: int, source: TextSource = TextSource()) -> list[str]:
    """The first `paragraphs` calibration paragraphs of every language, language by language."""
    corpus = source.load(languages, "calibration", paragraphs)
    return [text for lang in languages for text in corpus[lang]]


@torch.no_grad()
def coactivation_features(lm: LoadedModel, batches: Iterable[Batch]) -> list[torch.Tensor]:
    """Per layer, the [d_ff, d_ff] co-activation matrix |A|^T |A| over counted tokens (a running sum).

    Row i describes neuron i by how strongly it fires together with every other neuron; balanced k-means
    on these rows groups neurons that co-activate (MoEfication's co-activation graph, as features).
    """
    layers = ffn_layers(lm.model)
    sums = [torch.zeros(f.width, f.width, device=lm.device) for f in layers]
    mask: list[torch.Tensor] = []

    def hook(layer: int):
        def accumulate(a: torch.Tensor) -> None:
            x = a.reshape(-1, a.shape[-1])[mask[0]].abs().float()
            sums[layer].addmm_(x.T, x)
        return accumulate

    with hooked(lm.model, {site(f.index, "mlp.hook_post"): hook(f.index) for f in layers}):
        for batch in batches:
            batch = batch.to(lm.device)
            mask[:] = [batch.count_mask.reshape(-1)]
            lm.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return sums


def partition_model(lm: LoadedModel, n_experts: int, method: str = "kmeans", *, seed: int = 0, iters: int = 30,
                    calibration: Iterable[Batch] | None = None) -> ExpertMap:
    """Partition every FFN layer of `lm` into `n_experts` balanced experts (the kernel; `partition` caches it)."""
    check_n_experts(n_experts)
    layers = ffn_layers(lm.model)
    if method == "coactivation":
        if calibration is None:
            raise BabelError("method='coactivation' needs calibration batches (pass calibration=...)")
        rows = coactivation_features(lm, calibration)
    else:
        rows = [f.cluster_rows() for f in layers]
    labels = torch.stack([
        partition_labels(r, n_experts, method, seed=seed + f.index, iters=iters).cpu()
        for f, r in tqdm(list(zip(layers, rows)), desc=f"{lm.name}: {method} partition", leave=False)
    ])
    experts = ExpertMap(labels, n_experts)
    experts.check_model(len(layers), layers[0].width)
    return experts


def partition(store: ArtefactStore | None, lm: LoadedModel, params: PartitionParams,
              languages: Sequence[str] = (), source: TextSource = TextSource()) -> Partition:
    """`lm`'s partition under `params`, loaded from (or computed into) the "partition" artefact of `store`.

    method=coactivation reads the first `calibration_paragraphs` calibration paragraphs of `languages`; their
    sha256 enters the key. Without a store the partition is computed and not saved.
    """
    texts = None
    if params.method == "coactivation":
        if not languages:
            raise BabelError("method='coactivation' clusters on calibration text: pass the run's languages")
        texts = calibration_texts(languages, params.calibration_paragraphs, source)
    key = params.key(model=lm.name, fingerprint=lm.fingerprint, calibration=texts_sha256(texts) if texts else None)

    def compute():
        batches = paragraph_batches(lm.tokenizer, texts) if texts else None
        experts = partition_model(lm, params.n_experts, params.method, seed=params.seed, iters=params.kmeans_iters,
                                  calibration=batches)
        return {"labels": experts.labels.to(torch.int32)}, {"card": lm.card}

    if store is None:
        tensors, path = compute()[0], None
    else:
        tensors, _ = store.cached(params.KIND, key, compute)
        path = store.paths(params.KIND, key)[0]
    experts = ExpertMap(tensors["labels"], params.n_experts)
    layers = ffn_layers(lm.model)
    experts.check_model(len(layers), layers[0].width)
    return Partition(experts, params, key, path)


def run_partition(store: ArtefactStore, lm: LoadedModel, profile: str, model: str = "") -> Partition:
    """The partition notebook 01 makes for `lm` under `profile` (computed now if 01 has not run)."""
    from babel_lib.core import config

    P1 = config.notebook_params("01_convert", profile, model)
    return partition(store, lm, P1.typed(ConvertParams).partition(seed=P1.seed), P1.languages,
                     config.text_source(P1))


def layer_cohesion(lm: LoadedModel, experts: ExpertMap) -> torch.Tensor:
    """Mean within-expert cosine similarity of the clustered rows, per layer and expert: [n_layers, n_experts]."""
    return torch.stack([cohesion(f.cluster_rows().float(), experts.labels[f.index].to(lm.device)).cpu()
                        for f in ffn_layers(lm.model)])


@dataclass
class Conversion:
    """Every model's partition (main method) and the cohesion of the main method and the baselines."""

    method: str
    baselines: tuple[str, ...]
    partitions: dict[str, Partition]
    cohesion: dict[str, dict[str, torch.Tensor]]  # model -> method -> [n_layers, n_experts]

    def table(self):
        """Mean within-expert cosine similarity, methods x models."""
        import pandas as pd

        table = pd.DataFrame({m: {method: float(c.mean()) for method, c in per.items()}
                              for m, per in self.cohesion.items()})
        table.index.name = "mean within-expert cosine similarity"
        return table

    def gain(self, model: str, baseline: str | None = None) -> float:
        """The main method's mean cohesion over the baseline's (default: the first baseline)."""
        per = self.cohesion[model]
        return float(per[self.method].mean() / per[baseline or self.baselines[0]].mean())

    def layers_above(self, model: str, baseline: str | None = None) -> tuple[int, int]:
        """(layers where the main method's mean cohesion is above the baseline's, layers)."""
        per = self.cohesion[model]
        above = per[self.method].mean(1) > per[baseline or self.baselines[0]].mean(1)
        return int(above.sum()), above.numel()

    def findings(self) -> list[str]:
        if not self.baselines:
            return [f"{m}: {self.method} mean cohesion {float(c[self.method].mean()):.3f} (no baseline configured)."
                    for m, c in self.cohesion.items()]
        base = self.baselines[0]
        out = []
        for m in self.cohesion:
            above, layers = self.layers_above(m)
            out.append(f"{m}: {self.method} cohesion is {self.gain(m):.1f}x the {base} baseline on average and "
                       f"higher in {above} of {layers} layers.")
        return out


def convert(store: ArtefactStore, models: Mapping[str, LoadedModel], params: ConvertParams, *, seed: int = 0,
            languages: Sequence[str] = (), source: TextSource = TextSource()) -> Conversion:
    """Partition every model with the main method and each baseline (artefacts), and measure their cohesion."""
    partitions, per_model = {}, {}
    for name, lm in models.items():
        per_model[name] = {}
        for method in dict.fromkeys([params.method, *params.baselines]):
            found = partition(store, lm, params.partition(method, seed), languages, source)
            partitions.setdefault(name, found)
            per_model[name][method] = layer_cohesion(lm, found.experts)
    return Conversion(params.method, tuple(m for m in params.baselines if m != params.method), partitions, per_model)


@torch.no_grad()
def equivalence(lm: LoadedModel, experts: ExpertMap, batches: Iterable[Batch], drop_fraction: float = 0.5,
                seed: int = 0) -> dict[str, float]:
    """Max |logit difference| on counted tokens: converted model with every expert active vs the dense model,
    and, as a control showing the routing is live, with a random `drop_fraction` of each layer's experts dropped.
    With every gate at 1 the first is 0 by construction: a regression test of the routing hooks, not a finding.
    The LM head runs on counted tokens only (Gemma's vocabulary is 262k); pass small, length-sorted batches
    (batches.paragraph_batches) to keep padding and memory low.
    """
    keep = random_keep(experts, drop_fraction, seed)
    gates = {"all_experts": lambda layer, s: torch.ones(experts.n_experts, device=s.device),
             "dropped": lambda layer, s: keep[layer].to(s.device)}
    result = {"all_experts": 0.0, "dropped": 0.0, "logit_scale": 0.0, "tokens": 0}
    for batch in batches:
        batch = batch.to(lm.device)

        def logits():
            hidden = run_decoder(lm.model, batch.input_ids, batch.attention_mask)
            return lm_logits(lm.model, hidden[batch.count_mask])

        dense = logits()
        result["logit_scale"] = max(result["logit_scale"], dense.abs().max().item())
        result["tokens"] += int(batch.count_mask.sum())
        for name, gate in gates.items():
            with routed(lm.model, experts, gate):
                result[name] = max(result[name], (logits() - dense).abs().max().item())
    if not result["tokens"]:
        raise BabelError("the equivalence check got no text token; give it at least one non-empty paragraph")
    return result


def random_keep(experts: ExpertMap, drop_fraction: float, seed: int = 0) -> torch.Tensor:
    """A fixed random choice per layer of experts kept (1.0) or dropped (0.0), [n_layers, n_experts]: each
    expert is dropped with probability `drop_fraction`, the same for every token."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(experts.n_layers, experts.n_experts, generator=g) >= drop_fraction).float()


def topk_gates(k: int):
    """Gates keeping, per token and layer, the experts whose score is >= the k-th largest (ties all kept)."""
    from babel_lib.babel.moe import top_experts

    return lambda layer, scores: top_experts(scores, k).to(scores.dtype)


@dataclass
class EquivalenceChecks:
    """Per model, the converted-vs-dense logit check (every expert active, and the random-drop control)."""

    drop_fraction: float
    checks: dict[str, dict[str, float]]

    def table(self):
        import pandas as pd

        return pd.DataFrame(self.checks).T

    def findings(self) -> list[str]:
        out = []
        for m, c in self.checks.items():
            same = "exactly 0" if c["all_experts"] == 0 else f"{c['all_experts']:.1e}"
            out.append(f"{m}: with every expert active the converted model's logits differ from the dense model's "
                       f"by {same} (max over {c['tokens']} tokens, logits up to {c['logit_scale']:.1f}; an identity "
                       f"of the construction: every gate is 1); dropping {self.drop_fraction:.0%} of the experts "
                       f"at random moves them by up to {c['dropped']:.2f}.")
        return out


def check_equivalence(models: Mapping[str, LoadedModel], conversion: Conversion, params: ConvertParams,
                      languages: Sequence[str], seed: int = 0, source: TextSource = TextSource()
                      ) -> EquivalenceChecks:
    """`equivalence` of every model's partition on `check_paragraphs` held-out paragraphs per language."""
    corpus = source.load(languages, "heldout", params.check_paragraphs)
    texts = [text for lang in languages for text in corpus[lang]]
    checks = {}
    for name, lm in models.items():
        batches = paragraph_batches(lm.tokenizer, texts, batch_tokens=512, max_length=128)
        checks[name] = equivalence(lm, conversion.partitions[name].experts, batches, params.drop_fraction, seed)
    return EquivalenceChecks(params.drop_fraction, checks)


@dataclass
class RoutedPerplexity:
    """Per model, the mean next-token loss of every held-out window: dense, routed to each token's top
    experts (per share of experts), and the control with the same share of experts kept at random."""

    fractions: tuple[float, ...]
    control: float  # share of experts kept at random in the control
    languages: list[str]  # the language of each window
    losses: dict[str, dict[str, torch.Tensor]]  # model -> setting -> [windows] mean loss (nats/token)

    @staticmethod
    def label(share: float, random: bool = False) -> str:
        return f"{'random' if random else 'top'} {share:.0%}"

    def ratio(self, model: str, setting: str) -> tuple[float, float]:
        """Perplexity of `setting` over the dense perplexity, and its standard error from the per-window
        paired log-perplexity differences (delta method)."""
        diff = (self.losses[model][setting] - self.losses[model]["dense"]).double()
        se = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else math.nan
        ratio = math.exp(float(diff.mean()))
        return ratio, ratio * se

    def loss_gap(self, model: str, worse: str, better: str) -> tuple[float, float]:
        """Mean per-window loss of `worse` minus that of `better` (log perplexity ratio), and its paired s.e."""
        diff = (self.losses[model][worse] - self.losses[model][better]).double()
        se = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else math.nan
        return float(diff.mean()), se

    def perplexity(self, model: str, setting: str) -> float:
        return math.exp(float(self.losses[model][setting].double().mean()))

    def table(self):
        import pandas as pd

        rows = {}
        for m, per in self.losses.items():
            for setting in per:
                ratio, se = self.ratio(m, setting)
                rows[(m, setting)] = {"perplexity": self.perplexity(m, setting), "ratio to dense": ratio,
                                      "s.e.": se}
        return pd.DataFrame(rows).T

    def findings(self) -> list[str]:
        out = []
        for m in self.losses:
            parts = []
            for share in self.fractions:
                ratio, se = self.ratio(m, self.label(share))
                parts.append(f"top {share:.0%}: {ratio:.2f}x ± {se:.2f}")
            line = (f"{m}: dense perplexity {self.perplexity(m, 'dense'):.1f} on {len(self.languages)} held-out "
                    f"windows; with each token routed to its top experts the perplexity is " + ", ".join(parts)
                    + " of dense")
            control = self.label(self.control, random=True)
            if control in self.losses[m]:
                ratio, se = self.ratio(m, control)
                line += f"; keeping {self.control:.0%} of the experts at random instead gives {ratio:.2f}x ± {se:.2f}"
            out.append(line + ".")
        return out


@torch.no_grad()
def routed_perplexity(models: Mapping[str, LoadedModel], conversion: Conversion, params: ConvertParams,
                      languages: Sequence[str], seed: int = 0, paragraphs: int = 40,
                      source: TextSource = TextSource()) -> RoutedPerplexity:
    """Perplexity when each token runs only its top `routed_fractions` of every layer's experts (scores under
    `routed_mode`: by default the sum of |a| over the expert's neurons; the signed sum drops experts with large
    negative contributions and multiplies the perplexity by 10^3-10^4 on the embedded models), against the dense
    model and a random choice of the same share.

    Windows: `routed_windows` per language of `routed_seq_len` tokens, cut from the first `paragraphs` held-out
    paragraphs; the loss comes from `evaluation.window_loss` (the chunked LM head).
    """
    corpus = source.load(languages, "heldout", paragraphs)
    control = 1 - params.drop_fraction
    losses, window_langs = {}, []
    for name, lm in models.items():
        experts = conversion.partitions[name].experts
        rows = [windows(lm.tokenizer, corpus[lang], params.routed_seq_len, params.routed_windows)
                for lang in languages]
        window_langs = [lang for lang, r in zip(languages, rows) for _ in range(len(r))]
        ids = torch.cat(rows)
        settings = {"dense": None}
        for share in params.routed_fractions:
            settings[RoutedPerplexity.label(share)] = topk_gates(max(1, round(share * experts.n_experts)))
        keep = random_keep(experts, params.drop_fraction, seed)
        settings[RoutedPerplexity.label(control, random=True)] = lambda layer, s: keep[layer].to(s.device)
        losses[name] = {}
        for setting, gates in settings.items():
            per_window = []
            for w in ids:
                if gates is None:
                    per_window.append(window_loss(lm.model, w[None]).mean)
                else:
                    with routed(lm.model, experts, gates, params.routed_mode):
                        per_window.append(window_loss(lm.model, w[None]).mean)
            losses[name][setting] = torch.tensor(per_window, dtype=torch.float64)
    return RoutedPerplexity(tuple(params.routed_fractions), control, window_langs, losses)


PAPER = "Unraveling Babel"


def verdicts(conversion: Conversion, routed: RoutedPerplexity) -> list:
    """Notebook 01's verdicts: cohesion of parameter clustering, and top-k routing against random routing."""
    from babel_lib.core.verdicts import Verdict, decide

    out = []
    if conversion.baselines:
        base = conversion.baselines[0]
        above = {m: conversion.layers_above(m) for m in conversion.cohesion}
        ours = "; ".join(f"{m}: {conversion.gain(m):.1f}x {base}, higher in {a} of {n} layers"
                         for m, (a, n) in above.items())
        out.append(Verdict(PAPER, "Parameter clustering (MoEfication ParamSplit) groups a dense FFN's neurons into "
                           "experts", "LLaMA-2-7B: 256 experts of 43 neurons per layer (v1, method); no cohesion "
                           "number given", ours,
                           decide(all(a == n for a, n in above.values()),
                                  all(conversion.gain(m) > 1 for m in above)),
                           f"reproduced when {conversion.method} cohesion is above {base} in every layer of every "
                           "model; partly when above it on average"))
    control = routed.label(routed.control, random=True)
    top = routed.label(routed.control)
    if top in next(iter(routed.losses.values())):
        gaps = {}
        for m in routed.losses:
            (rt, st), (rr, sr) = routed.ratio(m, top), routed.ratio(m, control)
            gaps[m] = (rt, st, rr, sr)
        ours = "; ".join(f"{m}: {top} {rt:.2f}x ± {st:.2f} vs {control} {rr:.2f}x ± {sr:.2f} of dense perplexity"
                         for m, (rt, st, rr, sr) in gaps.items())
        better = {}
        for m in routed.losses:
            gap, se = routed.loss_gap(m, control, top)
            better[m] = gap > 2 * se
        verdict = decide(all(better.values()), any(better.values()))
        rule = (f"reproduced when, in every model, routing each token to its {top} experts by score has a lower loss "
                f"(log perplexity) than keeping {routed.control:.0%} at random by more than 2 s.e. of the per-window "
                "paired differences; partly in some")
    else:
        ours, verdict, rule = "no top-k share equals the random control's share", "not attempted", \
            "needs routed_fractions to hold 1 - drop_fraction"
    out.append(Verdict(PAPER, "Dynamic sparse activation: per token, only the top-k experts by score run",
                       "perplexity vs active ratio (method card); v1: ~30% faster inference at comparable quality",
                       ours, verdict, rule))
    return out


def model_table(models: Mapping[str, LoadedModel], n_experts: int):
    """Per model: architecture, layers, widths, gating, activation, experts and the weights' card."""
    import pandas as pd

    rows = []
    for name, lm in models.items():
        layers = ffn_layers(lm.model)
        width = layers[0].width
        rows.append({"model": name, "architecture": type(lm.model).__name__, "layers": len(layers),
                     "d_model": lm.model.config.hidden_size, "d_ff": width, "gated": layers[0].gated,
                     "activation": type(layers[0].act).__name__, "n_experts": n_experts,
                     "neurons per expert": f"{width / n_experts:g}", "weights": lm.card})
    return pd.DataFrame(rows).set_index("model")
