"""Massive activations, a close look: |h| over token x feature for one short prompt at one layer (the paper's 3-D
plot), each model with its own tokenisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from babel_lib.core.batches import encode
from babel_lib.core.hooks import hooked, site
from babel_lib.core.models import LoadedModel, run_decoder
from babel_lib.core.study import StudyParams, param
from babel_lib.massive.locate import Located, reference_layer, token_texts


@dataclass(frozen=True)
class PromptParams(StudyParams):
    """Notebook 03: the short prompt of the 3-D plot and the attention maps, and the 3-D plot's layer."""

    KIND: ClassVar[str] = "massive-prompt"
    CODE: ClassVar[tuple[str, ...]] = ("babel_lib.massive.surface",)

    prompt: str = "Summer is warm. Winter is cold."
    surface_layer: int | None = param(None, ge=0)  # layer of the 3-D plot; None = middle of the strongest range


@torch.no_grad()
def residual_at(model: nn.Module, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The residual stream [B, T, D] after block `layer` for a few short inputs (for the 3-D plot only)."""
    captured: list[torch.Tensor] = []
    with hooked(model, {site(layer, "hook_resid_post"): lambda h: captured.append(h.detach().float().cpu())}):
        run_decoder(model, ids.to(next(model.parameters()).device))
    return captured[0]


@dataclass
class Surface:
    """|h| [T, D] of the prompt after one block."""

    model: str
    bos: bool
    layer: int
    prompt: str
    size: torch.Tensor  # [T, D] |h|
    tokens: list[str]

    def findings(self) -> list[str]:
        pos, dim = divmod(int(self.size.argmax()), self.size.shape[1])
        return [f"{self.model}: at layer {self.layer} the largest |h| of the prompt is {float(self.size.max()):,.0f} "
                f"at token {pos} ({self.tokens[pos]!r}), dim {dim}; the median |h| is {float(self.size.median()):.2f}."]


def surface(lm: LoadedModel, params: PromptParams, located: Located) -> Surface | None:
    """The study: |h| of the prompt at `surface_layer`, or at the middle of the largest massive activation's range;
    None when the scan found no target."""
    if located.strongest is None:
        return None
    layer = params.surface_layer if params.surface_layer is not None else reference_layer(located.strongest)
    bos = located.scan.run.bos
    ids = torch.tensor(encode(lm.tokenizer, [params.prompt], add_bos=bos))
    return Surface(lm.name, bos, layer, params.prompt, residual_at(lm.model, ids, layer)[0].abs(),
                   token_texts(lm.tokenizer, ids)[0])
