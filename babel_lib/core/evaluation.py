"""Language-model loss and perplexity on fixed-length windows, with the LM head applied in chunks.

Large vocabularies (Gemma-3: 262k) make full logits the biggest tensor of a forward, so the head runs
over `chunk` positions at a time and only the log-likelihood of the next token is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from babel_lib.core import distributed
from babel_lib.core.models import run_decoder


@dataclass
class Loss:
    """Summed next-token negative log-likelihood and the number of predicted tokens (summable across runs)."""

    nll: float
    tokens: int

    def __add__(self, other: Loss) -> Loss:
        return Loss(self.nll + other.nll, self.tokens + other.tokens)

    @property
    def mean(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean)


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on last hidden states (float32 at least, with the model's final soft-capping if any)."""
    logits = model.get_output_embeddings()(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def window_loss(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4, chunk: int = 512,
                distribute: bool = True) -> Loss:
    """Next-token loss over every position after the first of each window [N, seq_len].

    Under torchrun (and `distribute`) the batches are shared among the ranks and their sums gathered, so every
    rank returns the single-process Loss exactly; `distribute=False` inside a pass that shards its own batches.
    """
    device = next(model.parameters()).device
    starts = list(range(0, windows.shape[0], batch_size))
    mine = distributed.shard(starts) if distribute else list(enumerate(starts))

    def work() -> list[float]:
        return [float(window_nll(model, windows[start : start + batch_size].to(device), chunk).sum())
                for _, start in mine]

    if not distribute:
        return Loss(sum(work()), windows[:, 1:].numel())
    nll = torch.tensor(distributed.together(work), dtype=torch.float64)
    nll = distributed.gather_rows(nll, [i for i, _ in mine], len(starts))
    return Loss(sum(nll.tolist()), windows[:, 1:].numel())


def window_nll(model: nn.Module, ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Summed next-token NLL of each window of one batch [B, T] (float64 [B]), the LM head `chunk` positions at a
    time; per-window sums are what a bootstrap over windows resamples."""
    hidden = run_decoder(model, ids)[:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    per_position = torch.empty(targets.numel(), dtype=torch.float64, device=targets.device)
    for i in range(0, targets.numel(), chunk):
        logp = torch.log_softmax(lm_logits(model, hidden[i : i + chunk]), dim=-1)
        per_position[i : i + chunk] = -logp.gather(1, targets[i : i + chunk, None])[:, 0].double()
    return per_position.view(ids.shape[0], -1).sum(dim=1).cpu()
