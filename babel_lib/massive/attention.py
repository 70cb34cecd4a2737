"""Massive activations, step 4: where attention goes. Head-averaged attention probabilities, the share of attention
mass on the tokens that hold a massive activation, per layer, against uniform causal attention (the paper finds
attention concentrates on them from the layer where they appear: attention sinks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from babel_lib.core.batches import encode
from babel_lib.core.models import LoadedModel
from babel_lib.core.study import StudyParams, param
from babel_lib.errors import BabelError
from babel_lib.massive.locate import Located, token_texts
from babel_lib.massive.stats import bootstrap


@dataclass(frozen=True)
class AttentionParams(StudyParams):
    """Notebook 03: how many scan windows per language the attention analysis reads."""

    KIND: ClassVar[str] = "massive-attention"
    CODE: ClassVar[tuple[str, ...]] = ("babel_lib.massive.attention", "babel_lib.massive.locate")

    attention_windows: int = param(1, ge=1)  # scan windows per language for the attention analysis


@torch.no_grad()
def attention_probabilities(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every layer's attention probabilities [B, H, T, T], on the model's device (needs attn_implementation='eager')."""
    out = model.base_model(input_ids=ids.to(next(model.parameters()).device), output_attentions=True, use_cache=False)
    if not out.attentions or any(a is None for a in out.attentions):
        raise BabelError("this model returned no attention probabilities; load it with "
                         "load_model(name, attn_implementation='eager')")
    return out.attentions


def head_averaged_attention(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Attention probabilities averaged over heads, [B, L, T, T] float32 (needs attn_implementation='eager')."""
    return torch.stack([a.float().mean(dim=1) for a in attention_probabilities(model, ids)], dim=1).cpu()


def attention_mass(attention: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, L] the attention mass on the marked key positions (positions [B, T] bool), averaged over queries
    1..T-1 (query 0 can only attend to itself)."""
    on_marked = (attention * positions[:, None, None, :].to(attention.dtype)).sum(dim=-1)  # [B, L, T]
    return on_marked[..., 1:].mean(dim=-1)


def uniform_mass(positions: torch.Tensor) -> torch.Tensor:
    """[B] what attention_mass would be if every query attended uniformly to all earlier tokens (the baseline)."""
    seen = positions.float().cumsum(dim=1)
    return (seen / torch.arange(1, positions.shape[1] + 1))[:, 1:].mean(dim=1)


def window_rows(language: torch.Tensor, per_language: int) -> torch.Tensor:
    """The indices of the first `per_language` windows of each language (language [N] = index of each window)."""
    return torch.cat([(language == i).nonzero().flatten()[:per_language] for i in range(int(language.max()) + 1)])


def marked_positions(located: Located, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """[len(rows), T] bool: the token positions of windows `rows` that hold a massive activation of `dim` within its
    target's layer range."""
    marked = torch.zeros(len(rows), located.scan.scan.ids.shape[1], dtype=torch.bool)
    slot = {int(s): i for i, s in enumerate(rows)}
    for m in located.in_range():
        if m.sequence in slot and m.dim == dim:
            marked[slot[m.sequence], m.position] = True
    return marked


@dataclass
class Attention:
    """Attention of one model on the tokens holding its largest massive activation."""

    model: str
    maps: dict[int, torch.Tensor]  # layer -> [T, T] head-averaged attention of the prompt
    tokens: list[str]  # the prompt's tokens
    mass: torch.Tensor  # [N, L] share of attention on the marked tokens, per window and layer
    baseline: float  # what uniform causal attention would give them
    span: tuple[int, int]  # first and last layer where the activation is massive in most sequences

    def before_after(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[N] per window: mean mass over layers 0..first (inputs without the activation) and over
        first+1..last+1 (inputs that carry it)."""
        first, last = self.span
        return self.mass[:, : first + 1].mean(1), self.mass[:, first + 1 : last + 2].mean(1)

    def findings(self) -> list[str]:
        first, last = self.span
        per_layer = self.mass.mean(0)
        before = float(per_layer[: first + 1].mean())
        after = float(per_layer[first + 1 : last + 2].mean())
        shown = range(max(0, first - 2), min(len(per_layer), first + 4))
        _, low, high = bootstrap(self.before_after()[1] - self.before_after()[0])
        return [f"{self.model}: attention on the massive-activation tokens averages {before:.1%} up to layer {first} "
                f"and {after:.1%} from layer {first + 1} to {min(last + 1, len(per_layer) - 1)}; uniform attention "
                f"would give them {self.baseline:.1%}.",
                f"{self.model}: per layer around the appearance (the activation is in the output of block {first}): "
                + ", ".join(f"layer {layer} {float(per_layer[layer]):.1%}" for layer in shown)
                + f"; after minus before per window: {after - before:+.1%} (95% bootstrap CI {low:+.1%} to "
                f"{high:+.1%}, {self.mass.shape[0]} windows)."]


def attention(lm: LoadedModel, params: AttentionParams, located: Located, prompt: str) -> Attention | None:
    """The study: the prompt's attention at the layer where the largest massive activation appears and the next,
    and the attention mass on its tokens in `params.attention_windows` scan windows per language; None when the
    scan found no target."""
    target = located.strongest
    if target is None:
        return None
    scan = located.scan
    ids = torch.tensor(encode(lm.tokenizer, [prompt], add_bos=scan.run.bos))
    prompt_attention = head_averaged_attention(lm.model, ids)[0]
    first = target.first_layer
    maps = {layer: prompt_attention[layer] for layer in (first, min(first + 1, prompt_attention.shape[0] - 1))}
    rows = window_rows(scan.language, params.attention_windows)
    marked = marked_positions(located, rows, target.dim)
    step = scan.params.batch_size
    windows = torch.cat([head_averaged_attention(lm.model, scan.scan.ids[rows[i : i + step]])
                         for i in range(0, len(rows), step)])
    return Attention(lm.name, maps, token_texts(lm.tokenizer, ids)[0], attention_mass(windows, marked),
                     float(uniform_mass(marked).mean()), (target.first_layer, target.last_layer))
