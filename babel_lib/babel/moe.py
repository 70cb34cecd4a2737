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
        self._onehot: dict[tuple[int, torch.device], torch.Tensor] = {}

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

    def onehot(self, layer: int, device: torch.device) -> torch.Tensor:
        """Assignment matrix [d_ff, n_experts] in float32 on `device` (built once per layer and device)."""
        key = (layer, torch.device(device))
        if key not in self._onehot:
            eye = torch.zeros(self.width, self.n_experts, device=device)
            eye[torch.arange(self.width, device=device), self.labels[layer].to(device)] = 1.0
            self._onehot[key] = eye
        return self._onehot[key]

    def scores(self, layer: int, a: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        """Expert scores [..., n_experts] (float32) from neuron activations [..., d_ff] of `layer`.

        mode: "sum" (MoEfication's ground-truth routing score), "abs" (sum of |a|), "pos" (sum of max(a, 0)).
        """
        if mode == "abs":
            a = a.abs()
        elif mode == "pos":
            a = a.clamp_min(0)
        elif mode != "sum":
            raise BabelError(f"unknown score mode {mode!r}; choose one of {', '.join(SCORE_MODES)}")
        return a.float() @ self.onehot(layer, a.device)

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
