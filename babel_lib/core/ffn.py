"""The FFN adapter: where each architecture keeps its feed-forward block and its neuron activation.

The neuron activation of a layer is the input of its down projection: a = act(W_gate x) * (W_up x)
for gated FFNs, a = act(W_in x) otherwise. Everything in babel (expert scores, sparsity, pruning)
reads or edits that one tensor, so supporting a new architecture means adding one `ArchSpec` below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from babel_lib.errors import BabelError


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture keeps its decoder layers and FFN projections (dotted attribute paths)."""

    layers: str  # from the causal LM to the ModuleList of decoder layers
    mlp: str  # from a decoder layer to the module holding the projections ("" = the layer itself)
    up: str  # input projection (the "up" projection of a gated FFN)
    down: str  # output projection: its input is the neuron activation
    act: str  # activation module, on the mlp
    gate: str | None = None  # gate projection of a gated FFN
    fused_gate_up: bool = False  # `up` holds [gate; up] stacked along its output (Phi-3)
    conv1d: bool = False  # GPT-2's Conv1D stores weights as [in, out]
    width_key: str = "intermediate_size"  # the config key of d_ff


_LLAMA_LIKE = ArchSpec("model.layers", "mlp", up="up_proj", down="down_proj", act="act_fn", gate="gate_proj")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": ArchSpec("model.layers", "mlp", up="gate_up_proj", down="down_proj", act="activation_fn",
                     fused_gate_up=True),
    "gpt2": ArchSpec("transformer.h", "mlp", up="c_fc", down="c_proj", act="act", conv1d=True,
                     width_key="n_inner"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "mlp", up="dense_h_to_4h", down="dense_4h_to_h", act="act"),
    "opt": ArchSpec("model.decoder.layers", "", up="fc1", down="fc2", act="activation_fn", width_key="ffn_dim"),
}


def arch_spec(model: nn.Module) -> ArchSpec:
    """The adapter for `model`, or a clear error saying how to add one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise BabelError(
            f"{type(model).__name__} (model_type {model_type!r}) has no FFN adapter; supported model types: "
            f"{', '.join(sorted(ARCHITECTURES))}. Add an ArchSpec for it to ARCHITECTURES in babel_lib/core/ffn.py "
            "(README: 'Adding an architecture')."
        )
    return ARCHITECTURES[model_type]


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


@dataclass
class FFN:
    """One decoder layer's feed-forward block, seen through its architecture's spec."""

    index: int
    block: nn.Module  # the decoder layer (its output is the residual stream)
    spec: ArchSpec

    @property
    def mlp(self) -> nn.Module:
        return _get(self.block, self.spec.mlp)

    @property
    def up(self) -> nn.Module:
        return _get(self.mlp, self.spec.up)

    @property
    def down(self) -> nn.Module:
        """The module whose input is the neuron activation (hook site `mlp.hook_post`)."""
        return _get(self.mlp, self.spec.down)

    @property
    def gate(self) -> nn.Module | None:
        return _get(self.mlp, self.spec.gate) if self.spec.gate else None

    @property
    def act(self) -> nn.Module:
        return _get(self.mlp, self.spec.act)

    @property
    def gated(self) -> bool:
        return self.spec.gate is not None or self.spec.fused_gate_up

    @property
    def width(self) -> int:
        """d_ff, the number of neurons."""
        return self.down_columns().shape[0]

    def _rows(self, module: nn.Module) -> torch.Tensor:
        """A projection's weight as [out_features, in_features] (a view, no copy)."""
        return module.weight.T if self.spec.conv1d else module.weight

    def input_rows(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(W_gate, W_up) as [d_ff, d_model] views; W_gate is None for a plain FFN."""
        up = self._rows(self.up)
        if self.spec.fused_gate_up:
            gate, up = up.chunk(2, dim=0)
            return gate, up
        return (self._rows(self.gate) if self.gate is not None else None), up

    def cluster_rows(self) -> torch.Tensor:
        """Rows MoEfication clusters: the gate projection of a gated FFN, the input projection otherwise."""
        gate, up = self.input_rows()
        return gate if gate is not None else up

    def down_columns(self) -> torch.Tensor:
        """W_out[:, i] for every neuron i, as rows [d_ff, d_model]."""
        w = self.down.weight
        return w if self.spec.conv1d else w.T

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """The neuron activation for FFN input `x` (reference path, outside the model's forward)."""
        gate, up = self.input_rows()
        bias = self.up.bias
        if self.spec.fused_gate_up:
            g_bias, u_bias = (None, None) if bias is None else bias.chunk(2)
        else:
            u_bias = bias
            g_bias = self.gate.bias if self.gate is not None else None
        u = nn.functional.linear(x, up, u_bias)
        if gate is None:
            return self.act(u)
        return self.act(nn.functional.linear(x, gate, g_bias)) * u


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, in order."""
    return model.get_submodule(arch_spec(model).layers)


def ffn_layers(model: nn.Module) -> list[FFN]:
    """Every decoder layer's FFN, in order."""
    spec = arch_spec(model)
    return [FFN(i, block, spec) for i, block in enumerate(model.get_submodule(spec.layers))]
