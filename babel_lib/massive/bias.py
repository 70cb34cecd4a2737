"""Massive activations as an implicit attention bias (the paper's analysis): split each layer's attention output
into the part that comes from the massive-activation tokens and the rest. If the first is nearly the same vector
for every query and input, those tokens act as a fixed bias term added by attention.

The split is exact for attention of the form o_proj(sum_j a_tj v_j) (LLaMA-style and Gemma blocks: values carry
no position encoding): the part from the marked tokens is o_proj(sum_{j marked} a_tj v_j) without o_proj's bias.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from babel_lib.core.ffn import decoder_layers
from babel_lib.errors import BabelError
from babel_lib.massive.attention import AttentionParams, attention_probabilities, marked_positions, window_rows
from babel_lib.massive.locate import Located
from babel_lib.massive.stats import bootstrap


@contextlib.contextmanager
def captured_values(model: nn.Module):
    """Collect every layer's value projection output [B, T, n_kv * head_dim] while the block is active."""
    values: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for layer, block in enumerate(decoder_layers(model)):
            v_proj = getattr(getattr(block, "self_attn", None), "v_proj", None)
            if v_proj is None:
                raise BabelError(f"{type(block).__name__} has no self_attn.v_proj; the implicit-bias split needs "
                                 "LLaMA-style attention")
            handles.append(v_proj.register_forward_hook(
                lambda _m, _a, out, layer=layer: values.__setitem__(layer, out.detach())))
        yield values
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def attention_parts(model: nn.Module, ids: torch.Tensor, marked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the attention output's part from the marked key positions and the rest: two [B, L, T, D] float32
    tensors (o_proj without its bias; needs attn_implementation='eager')."""
    config = model.config
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    with captured_values(model) as values:
        attentions = attention_probabilities(model, ids)
    mask = marked.to(attentions[0].device, torch.float32)[:, None, None, :]  # [B, 1, 1, T]
    parts = ([], [])
    for layer, probs in enumerate(attentions):
        batch, _, seq, _ = probs.shape
        v = values[layer].float().view(batch, seq, kv, head_dim).repeat_interleave(heads // kv, dim=2)
        weight = decoder_layers(model)[layer].self_attn.o_proj.weight.float()
        for part, share in zip(parts, (probs.float() * mask, probs.float() * (1 - mask))):
            mixed = torch.einsum("bhtj,bjhd->bthd", share, v).reshape(batch, seq, heads * head_dim)
            part.append(F.linear(mixed, weight).cpu())
    return torch.stack(parts[0], dim=1), torch.stack(parts[1], dim=1)


def mean_cosine(vectors: torch.Tensor) -> float:
    """Mean cosine similarity of the rows of [n, D] to their mean vector (1 = all the same direction)."""
    return float(F.cosine_similarity(vectors, vectors.mean(0, keepdim=True), dim=-1).mean())


@dataclass
class ImplicitBias:
    """Per layer: how constant the attention output's part from the massive-activation tokens is across queries
    and windows, against the rest of the attention output."""

    COLUMNS: ClassVar[tuple[str, ...]] = ("model", "layer", "massive part", "rest", "reads it")  # of rows()

    model: str
    span: tuple[int, int]  # the target's layer range; layers first+1..last+1 read it
    massive: torch.Tensor  # [L] mean cosine to the mean vector of the part from the massive-activation tokens
    rest: torch.Tensor  # [L] the same for the rest of the attention output
    per_window: torch.Tensor  # [N] per window, the massive part's mean cosine over the layers that read it

    def layers(self) -> range:
        first, last = self.span
        return range(first + 1, min(last + 2, len(self.massive)))

    def rows(self) -> list[dict]:
        """One row per layer: the two parts' mean cosines, and whether the layer reads the massive activation."""
        return [dict(zip(self.COLUMNS, (self.model, layer, float(m), float(r), layer in self.layers())))
                for layer, (m, r) in enumerate(zip(self.massive, self.rest))]

    def findings(self) -> list[str]:
        shown = list(self.layers())
        if not shown:
            return [f"{self.model}: no layer reads the massive activation (it appears in the last block)."]
        est, low, high = bootstrap(self.per_window)
        return [f"{self.model}: in layers {shown[0]}-{shown[-1]}, the attention output's part from the massive-"
                f"activation tokens has a mean cosine of {float(self.massive[shown].mean()):.3f} to its mean vector "
                f"across queries and windows (per window {est:.3f}, 95% CI {low:.3f}-{high:.3f}); the rest of the "
                f"attention output {float(self.rest[shown].mean()):.3f}."]


def implicit_bias(lm, params: AttentionParams, located: Located) -> ImplicitBias | None:
    """The study: the split of every layer's attention output on `params.attention_windows` scan windows per
    language, queries after position 0 that are not themselves marked; None when the scan found no target."""
    target = located.strongest
    if target is None:
        return None
    scan = located.scan
    rows = window_rows(scan.language, params.attention_windows)
    marked = marked_positions(located, rows, target.dim)
    step = scan.params.batch_size
    pieces = [attention_parts(lm.model, scan.scan.ids[rows[i : i + step]], marked[i : i + step])
              for i in range(0, len(rows), step)]
    massive, rest = (torch.cat(p) for p in zip(*pieces))  # [N, L, T, D]
    queries = ~marked
    queries[:, 0] = False
    n_layers = massive.shape[1]
    by_layer = [(mean_cosine(massive[:, layer][queries]), mean_cosine(rest[:, layer][queries]))
                for layer in range(n_layers)]
    result = ImplicitBias(lm.name, (target.first_layer, target.last_layer),
                          torch.tensor([m for m, _ in by_layer]), torch.tensor([r for _, r in by_layer]),
                          torch.zeros(0))
    read = list(result.layers()) or [n_layers - 1]
    result.per_window = torch.tensor([sum(mean_cosine(massive[w, layer][queries[w]]) for layer in read) / len(read)
                                      for w in range(len(rows))])
    return result
