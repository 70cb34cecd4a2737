"""Language-model loss and perplexity on fixed-length windows, with the LM head applied in chunks.

Large vocabularies (Gemma-3: 262k) make full logits the biggest tensor of a forward, so the head runs
over `chunk` positions at a time and only the log-likelihood of the next token is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

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
def window_loss(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4, chunk: int = 512) -> Loss:
    """Next-token loss over every position after the first of each window [N, seq_len]."""
    device = next(model.parameters()).device
    total = Loss(0.0, 0)
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        hidden = run_decoder(model, ids)[:, :-1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets = ids[:, 1:].reshape(-1)
        for i in range(0, targets.numel(), chunk):
            logp = torch.log_softmax(lm_logits(model, hidden[i : i + chunk]), dim=-1)
            total += Loss(-logp.gather(1, targets[i : i + chunk, None]).sum().item(), targets[i : i + chunk].numel())
    return total
