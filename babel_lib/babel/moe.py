"""Dense FFN -> fine-grained mixture of experts, without changing any weight.

An expert is a fixed group of a layer's neurons (a partition from babel_lib.babel.partition). The converted
model is the dense model plus an `ExpertMap`: the expert of every neuron. Expert scores are sums of the
expert's neuron activations, computed as one matmul with a one-hot assignment matrix (no gather, no
token-level copy), and routing scales each neuron's activation by its expert's gate. With every gate at 1
the converted model computes exactly what the dense model computes. (Permuting the weights so experts
are contiguous would allow a reshape instead, but it reorders the float sums of the down projection:
logits then drift by ~5e-5 in float32 on the embedded models.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from babel_lib.errors import BabelError
from babel_lib.core.hooks import hooked, site
from babel_lib.babel.partition import expert_sizes

SCORE_MODES = ("sum", "abs", "pos")
SCORERS = ("matmul", "index_add")
_HALF = (torch.float16, torch.bfloat16)


def top_experts(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool [..., E]: the experts whose score is >= the k-th largest along the last axis (ties at the k-th
    score all count, so the choice does not depend on a sort's tie order)."""
    return scores >= kth_largest(scores, k, by_sort=scores.is_cuda)


def kth_largest(scores: torch.Tensor, k: int, by_sort: bool) -> torch.Tensor:
    """The k-th largest value along the last axis, [..., 1]. by_sort: from a sort of each row, what a GPU does
    fastest (a bitonic sort in shared memory; under torch.compile a Triton sort fused with what follows, up to
    512 experts); else from a partial selection (topk), about 3x cheaper than a sort on the CPU."""
    if by_sort:
        return scores.sort(dim=-1, descending=True).values[..., k - 1 : k]
    return scores.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)


class ExpertMap:
    """The expert of every neuron of every layer (labels [n_layers, d_ff]), and what follows from it."""

    def __init__(self, labels: torch.Tensor, n_experts: int):
        self.labels = labels.long()
        self.n_experts = n_experts
        for layer, layer_labels in enumerate(self.labels):
            counts = torch.bincount(layer_labels.cpu(), minlength=n_experts)
            if counts.numel() != n_experts or not torch.equal(counts, expert_sizes(layer_labels.numel(), n_experts)):
                raise BabelError(f"partition layer {layer} is not balanced over {n_experts} experts; rebuild it "
                                 "with babel_lib.babel.partition.partition_labels")
        self._onehot: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self._labels: dict[tuple[int, torch.device], torch.Tensor] = {}

    @property
    def n_layers(self) -> int:
        return self.labels.shape[0]

    @property
    def width(self) -> int:
        return self.labels.shape[1]

    def check_model(self, n_layers: int, width: int) -> None:
        """Raise if this map was made for a model of another shape."""
        if (n_layers, width) != (self.n_layers, self.width):
            raise BabelError(f"the partition is for {self.n_layers} layers x {self.width} neurons but the model has "
                             f"{n_layers} x {width}; was it made for another model?")

    def onehot(self, layer: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Assignment matrix [d_ff, n_experts] on `device` in `dtype` (built once per layer, device and dtype)."""
        key = (layer, torch.device(device), dtype)
        if key not in self._onehot:
            eye = torch.zeros(self.width, self.n_experts, device=device)
            eye[torch.arange(self.width, device=device), self.labels[layer].to(device)] = 1.0
            self._onehot[key] = eye.to(dtype)
        return self._onehot[key]

    def layer_labels(self, layer: int, device: torch.device) -> torch.Tensor:
        """The expert of each neuron of `layer` [d_ff] on `device` (copied once per layer and device)."""
        key = (layer, torch.device(device))
        if key not in self._labels:
            self._labels[key] = self.labels[layer].to(device)
        return self._labels[key]

    def scores(self, layer: int, a: torch.Tensor, mode: str = "sum", scorer: str = "matmul") -> torch.Tensor:
        """Expert scores [N, n_experts] from neuron activations [N, d_ff] of `layer`: the one scoring path of
        routing and of the profiler. float64 for float64 activations, else float32 (fp32 accumulation).

        mode: "sum" (MoEfication's ground-truth routing score), "abs" (sum of |a|), "pos" (sum of max(a, 0)).
        scorer: "matmul" (one matmul with the one-hot assignment; bf16/fp16 activations on CUDA use a
        half-precision matmul with float32 output, so no fp32 copy of them) or "index_add" (each neuron added
        into its expert: a fraction of the matmul's cost on the CPU when d_model is small).
        """
        if mode == "abs":
            a = a.abs()
        elif mode == "pos":
            a = a.clamp_min(0)
        elif mode != "sum":
            raise BabelError(f"unknown score mode {mode!r}; choose one of {', '.join(SCORE_MODES)}")
        dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        if scorer == "index_add":
            out = torch.zeros(a.shape[0], self.n_experts, dtype=dtype, device=a.device)
            return out.index_add_(1, self.layer_labels(layer, a.device), a.to(dtype))
        if scorer != "matmul":
            raise BabelError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
        if a.dtype in _HALF and a.is_cuda:
            return torch.mm(a, self.onehot(layer, a.device, a.dtype), out_dtype=torch.float32)
        return a.to(dtype) @ self.onehot(layer, a.device, dtype)

    def expand(self, layer: int, per_expert: torch.Tensor) -> torch.Tensor:
        """Give every neuron its expert's value: [..., n_experts] -> [..., d_ff]."""
        return per_expert.index_select(-1, self.labels[layer].to(per_expert.device))


GateFn = Callable[[int, torch.Tensor], torch.Tensor]


@contextmanager
def routed(model: nn.Module, experts: ExpertMap, gates: GateFn, mode: str = "sum") -> Iterator[nn.Module]:
    """Run the model as an MoE: at layer l, token t keeps expert e with weight gates(l, scores)[t, e].

    `gates` gets the layer index and the expert scores [tokens, n_experts] and returns weights of that shape,
    or [n_experts] for the same choice for every token; 1 keeps an expert, 0 drops it.
    """

    def hook(layer: int):
        def apply(a: torch.Tensor) -> torch.Tensor:
            flat = a.reshape(-1, a.shape[-1])
            weights = gates(layer, experts.scores(layer, flat, mode)).to(a.dtype)
            return (flat * experts.expand(layer, weights)).reshape(a.shape)

        return apply

    with hooked(model, {site(layer, "mlp.hook_post"): hook(layer) for layer in range(experts.n_layers)}):
        yield model
