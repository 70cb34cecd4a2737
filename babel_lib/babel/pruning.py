"""Expert pruning: which experts to remove (from per-language frequencies, at random, per-layer adaptive, or per
token), and two ways to remove them (a mask at the activation site, or physically smaller FFN weights).

A static pruning is a keep mask [n_layers, n_experts] (True = kept). `masked` multiplies the neuron activation
(the down projection's input) by the mask; `sliced` copies the model with only the kept neurons' gate/up rows and
down columns (padded with zeroed neurons to an aligned width), so it is really smaller and faster. Both compute the
same function (up to the summation order of the down projection). `dynamic` keeps, per token and layer, the top-k
experts by ExpertMap's score.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from babel_lib.babel.moe import ExpertMap, routed
from babel_lib.core.ffn import FFN, arch_spec, ffn_layers
from babel_lib.core.hooks import hooked, site
from babel_lib.errors import BabelError

WIDTHS_KEY = "babel_ffn_widths"  # config key of a sliced model with per-layer FFN widths


def check_rate(rate: float, what: str = "rate") -> float:
    """A pruning rate must lie in [0, 1): pruning every expert leaves no FFN."""
    if not 0 <= rate < 1:
        raise BabelError(f"{what}={rate} is outside [0, 1); give the share of experts to prune, e.g. 0.25")
    return float(rate)


@dataclass(frozen=True)
class Frequencies:
    """Per-language expert activation frequencies f[language, layer, expert] and the partition they were counted on."""

    languages: tuple[str, ...]
    values: torch.Tensor  # [langs, L, E] float64: counts / tokens
    partition: Mapping[str, Any]  # the partition's parameters (PartitionParams.as_dict())

    @classmethod
    def from_artefact(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Frequencies:
        """From a "frequencies" artefact (expert_counts [langs, L, E], tokens [langs]; meta: languages, partition)."""
        counts, tokens = tensors["expert_counts"].double(), tensors["tokens"].double()
        return cls(tuple(meta["languages"]), counts / tokens.clamp_min(1)[:, None, None], dict(meta["partition"]))

    @classmethod
    def load(cls, path: str | Path) -> Frequencies:
        """From a frequencies artefact file (its .safetensors path, as notebook 02's index lists)."""
        from safetensors.torch import load_file

        path = Path(path)
        sidecar = path.with_suffix(".json")
        if not (path.exists() and sidecar.exists()):
            raise BabelError(f"no frequency artefact at {path}; run notebook 02 (make figures) first")
        return cls.from_artefact(load_file(str(path)), json.loads(sidecar.read_text())["meta"])

    @classmethod
    def of_run(cls, artefacts: str | Path, run: str, model: str) -> Frequencies:
        """`model`'s frequencies from notebook 02's index of run `run` (<artefacts>/frequencies/index-<run>.json)."""
        index = Path(artefacts) / "frequencies" / f"index-{run}.json"
        if not index.is_file():
            raise BabelError(f"no frequency index at {index}; run notebook 02_profile for this profile first")
        entries = json.loads(index.read_text())
        if model not in entries:
            raise BabelError(f"notebook 02's run {run!r} has no frequencies of {model!r} (it has "
                             f"{', '.join(entries)}); run notebook 02 with this model")
        return cls.load(index.parent / entries[model])

    def of(self, language: str) -> torch.Tensor:
        """f [L, E] of one language."""
        if language not in self.languages:
            raise BabelError(f"no frequencies for language {language!r}; profiled: {', '.join(self.languages)}. "
                             "Pick one of these or add it to notebook 02's languages and rerun it")
        return self.values[self.languages.index(language)]

    def check(self, experts: ExpertMap, partition: Mapping[str, Any]) -> None:
        """Raise unless these frequencies were counted on `partition` (and fit the map's shape)."""
        if dict(self.partition) != dict(partition):
            diff = {k: (self.partition.get(k), v) for k, v in partition.items() if self.partition.get(k) != v}
            raise BabelError(f"the frequencies were counted on another partition (counted vs wanted: {diff}); "
                             "rerun notebook 02 with notebook 01's current settings")
        if tuple(self.values.shape[1:]) != (experts.n_layers, experts.n_experts):
            raise BabelError(f"frequencies are {tuple(self.values.shape[1:])} layers x experts but the partition is "
                             f"{experts.n_layers} x {experts.n_experts}; rerun notebook 02")


def uniform_counts(rate: float, n_layers: int, n_experts: int) -> torch.Tensor:
    """Experts pruned per layer at a uniform rate: round(rate * E), at most E - 1 (a layer keeps one expert)."""
    check_rate(rate)
    return torch.full((n_layers,), min(round(rate * n_experts), n_experts - 1), dtype=torch.long)


def concentration(freq: torch.Tensor) -> torch.Tensor:
    """Per layer, 1 - normalised entropy of the frequencies as a distribution over experts: 0 when every expert
    is activated equally often, towards 1 when a few experts take all activations. freq [L, E] -> [L]."""
    if freq.shape[-1] == 1:
        return torch.zeros(freq.shape[0], dtype=torch.float64)
    p = freq.double() / freq.double().sum(-1, keepdim=True).clamp_min(1e-300)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return (1 - entropy / math.log(freq.shape[-1])).clamp_min(0)


def adaptive_counts(freq: torch.Tensor, rate: float, max_factor: float = 2.0) -> torch.Tensor:
    """Experts pruned per layer, proportional to the layer's `concentration` of frequencies.

    Rule: a layer whose activations concentrate on few experts loses more of its (rarely used) experts. The total
    equals the uniform case's (sum of `uniform_counts`); layer l gets a share c_l / sum(c) of it, capped at
    `max_factor` times the uniform count and at E - 1 (the excess goes to the other layers in the same
    proportions), rounded by largest remainder. With all c_l equal (or all 0) this is the uniform allocation. The
    cap matters: without it one concentrated layer can lose nearly all its experts (seen on SmolLM2-135M, whose
    perplexity then rose 150-fold against the uniform rate).
    """
    n_layers, n_experts = freq.shape
    uniform = uniform_counts(rate, n_layers, n_experts)
    total = int(uniform.sum())
    c = concentration(freq)
    c = torch.ones_like(c) if float(c.sum()) == 0 else c
    cap = min(n_experts - 1, max(1, math.floor(max_factor * int(uniform[0])))) if total else 0
    free = torch.ones(n_layers, dtype=torch.bool)
    share = torch.zeros(n_layers, dtype=torch.float64)
    while True:  # water-filling: layers at the cap are fixed, the rest share what is left
        left = total - cap * int((~free).sum())
        weight = c[free] if float(c[free].sum()) > 0 else torch.ones_like(c[free])
        share[free] = left * weight / weight.sum()
        over = free & (share > cap)
        if not over.any():
            break
        share[over], free = cap, free & ~over
    counts = share.floor().long()
    order = torch.argsort(share - counts, descending=True, stable=True)
    for layer in order[: total - int(counts.sum())]:
        counts[layer] += 1
    return counts


def frequency_keep(freq: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep mask [L, E]: in layer l, the counts[l] lowest-frequency experts are removed (ties: lower index first)."""
    keep = torch.ones(freq.shape, dtype=torch.bool)
    for layer, n in enumerate(counts.tolist()):
        keep[layer, torch.argsort(freq[layer], stable=True)[:n]] = False
    return keep


def random_keep(counts: torch.Tensor, n_experts: int, seed: int) -> torch.Tensor:
    """Keep mask [L, E] removing counts[l] experts of layer l drawn uniformly at random (reproducible by seed)."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.ones(len(counts), n_experts, dtype=torch.bool)
    for layer, n in enumerate(counts.tolist()):
        keep[layer, torch.randperm(n_experts, generator=gen)[:n]] = False
    return keep


def neuron_keep(experts: ExpertMap, keep: torch.Tensor) -> torch.Tensor:
    """Per-neuron keep mask [L, d_ff] from a per-expert one [L, E]."""
    if tuple(keep.shape) != (experts.n_layers, experts.n_experts):
        raise BabelError(f"keep mask is {tuple(keep.shape)} but the partition is {experts.n_layers} layers x "
                         f"{experts.n_experts} experts")
    return torch.stack([experts.expand(layer, keep[layer]) for layer in range(experts.n_layers)])


@contextmanager
def masked(model: nn.Module, experts: ExpertMap, keep: torch.Tensor) -> Iterator[nn.Module]:
    """Run `model` with the experts outside `keep` [L, E] zeroed at the activation site (mlp.hook_post)."""
    neurons = neuron_keep(experts, keep)
    layers = ffn_layers(model)
    experts.check_model(len(layers), layers[0].width)
    device = next(model.parameters()).device

    def hook(layer: int):
        mask = neurons[layer].to(device)
        return lambda a: a * mask.to(a.dtype)

    with hooked(model, {site(layer, "mlp.hook_post"): hook(layer) for layer in range(experts.n_layers)}):
        yield model


def top_k_gates(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Gates [..., E]: 1 on the k highest scores of each row (one `topk`: exactly k, ties by its order), else 0."""
    gates = torch.zeros_like(scores)
    return gates.scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)


@contextmanager
def dynamic(model: nn.Module, experts: ExpertMap, ratio: float, mode: str = "abs") -> Iterator[nn.Module]:
    """Dynamic expert sparsity: per token and layer keep only the round(ratio * E) experts with the highest
    ExpertMap score under `mode` ("abs" by default: an expert whose neurons push hard in either direction matters;
    the signed "sum" drops large negative contributions and collapses gated FFNs), the others contribute nothing."""
    k = round(ratio * experts.n_experts)
    if not 1 <= k <= experts.n_experts:
        raise BabelError(f"active ratio {ratio} keeps {k} of {experts.n_experts} experts; choose a ratio in "
                         f"[{0.5 / experts.n_experts:.3g}, 1]")
    with routed(model, experts, lambda layer, scores: top_k_gates(scores, k), mode):
        yield model


def _select(module: nn.Module, index: torch.Tensor, dim: int) -> None:
    """Keep `index` of the weight's `dim` (and of the bias when `dim` is the output), updating the size attributes."""
    weight = module.weight
    module.weight = nn.Parameter(weight.detach().index_select(dim, index.to(weight.device)).clone(),
                                 requires_grad=weight.requires_grad)
    out_dim = 1 if type(module).__name__ == "Conv1D" else 0
    if dim == out_dim and getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(module.bias.detach().index_select(0, index.to(weight.device)).clone(),
                                   requires_grad=module.bias.requires_grad)
    size = index.numel()
    if isinstance(module, nn.Linear):
        if dim == 0:
            module.out_features = size
        else:
            module.in_features = size
    elif hasattr(module, "nf") and dim == out_dim:
        module.nf = size


def _neuron_weights(ffn: FFN, index: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor, int]]:
    """Where neurons `index` sit in one FFN: (projection, its indices, its weight's axis) for the up (fused with the
    gate: both halves), gate and down projections; on every one but down that axis is the projection's output."""
    width, conv = ffn.width, ffn.spec.conv1d
    in_dim, out_dim = (1, 0) if conv else (0, 1)
    rows = torch.cat([index, index + width]) if ffn.spec.fused_gate_up else index
    parts = [(ffn.up, rows, in_dim)] + ([(ffn.gate, index, in_dim)] if ffn.gate is not None else [])
    return parts + [(ffn.down, index, out_dim)]


def slice_ffn(ffn: FFN, kept: torch.Tensor) -> None:
    """Shrink one FFN in place to neurons `kept` (sorted indices): gate/up rows, down columns."""
    for module, index, dim in _neuron_weights(ffn, kept):
        _select(module, index, dim)


@torch.no_grad()
def _zero_neurons(ffn: FFN, index: torch.Tensor) -> None:
    """Zero neurons `index` in place (gate/up rows with their biases, down columns): each then adds exactly 0."""
    for module, idx, dim in _neuron_weights(ffn, index):
        module.weight.index_fill_(dim, idx.to(module.weight.device), 0)
        if module is not ffn.down and getattr(module, "bias", None) is not None:
            module.bias.index_fill_(0, idx.to(module.bias.device), 0)


def sliced(model: nn.Module, experts: ExpertMap, keep: torch.Tensor, align: int = 64) -> nn.Module:
    """A copy of `model` whose FFNs hold only the kept experts' neurons (in their original order).

    Each layer's width is padded up to a multiple of `align` with zeroed neurons (same function): a GPU matmul over
    an unaligned width is slow (on the H200, 9,890 of LLaMA-2-7B's 11,008 neurons ran at 0.65x the dense model).
    With the same number of neurons in every layer the config's FFN width is set to it, so `save_pretrained` gives
    a model plain transformers loads; with per-layer widths they go into config.babel_ffn_widths and need
    `load_sliced` (transformers builds every layer at one width).
    """
    if align < 1:
        raise BabelError(f"align must be a positive number of neurons, got {align}")
    neurons = neuron_keep(experts, keep)
    spec = arch_spec(model)
    layers = ffn_layers(model)
    experts.check_model(len(layers), layers[0].width)
    model = copy.deepcopy(model)
    widths = []
    for ffn, mask in zip(ffn_layers(model), neurons):
        kept = mask.nonzero().squeeze(-1)
        filler = (~mask).nonzero().squeeze(-1)[:-kept.numel() % align]
        slice_ffn(ffn, torch.cat([kept, filler]))
        if filler.numel():
            _zero_neurons(ffn, torch.arange(kept.numel(), ffn.width))
        widths.append(ffn.width)
    if len(set(widths)) == 1:
        setattr(model.config, spec.width_key, widths[0])
    else:
        setattr(model.config, WIDTHS_KEY, widths)
    return model


def load_sliced(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a sliced model saved with `save_pretrained`: plain transformers at one width, babel's per-layer resize
    (config.babel_ffn_widths) otherwise."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    widths = getattr(config, WIDTHS_KEY, None)
    if widths is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or getattr(config, "dtype", None) or torch.float32)
    for ffn, width in zip(ffn_layers(model), widths):
        slice_ffn(ffn, torch.arange(width))
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state |= load_file(str(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {t.data_ptr() for k, t in params.items() if k in state}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise BabelError(f"{path} does not match its config (missing {untied[:3]}, unexpected {unexpected[:3]}); "
                         "save it again with sliced(...).save_pretrained")
    return model.eval()


def kept_fraction(keep: torch.Tensor) -> float:
    """Share of experts kept over all layers."""
    return float(keep.double().mean())


def keep_masks(freq: torch.Tensor, rate: float, *, adaptive: bool = False) -> torch.Tensor:
    """The frequency-guided keep mask of one language's f [L, E] at `rate` (uniform or layer-adaptive counts)."""
    n_layers, n_experts = freq.shape
    counts = adaptive_counts(freq, rate) if adaptive else uniform_counts(rate, n_layers, n_experts)
    return frequency_keep(freq, counts)

