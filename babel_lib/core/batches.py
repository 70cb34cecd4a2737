"""Text -> token batches: padded paragraph batches for statistics, fixed-length windows for perplexity.

Statistics count only real text tokens: `Batch.count_mask` is False on padding, BOS/EOS and every other
special token. Perplexity is only comparable at a fixed, stated sequence length, so `windows` cuts a
language's concatenated text into windows of exactly `seq_len` tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from babel_lib.errors import BabelError


@dataclass
class Batch:
    """Right-padded token ids with the masks the model and the counters need."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 on real positions (BOS included)
    count_mask: torch.Tensor  # [B, T] bool, True on text tokens that statistics may count

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.count_mask.to(device))

    @property
    def n_tokens(self) -> int:
        return int(self.count_mask.sum())


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text by default (Gemma and LLaMA do, SmolLM2 does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def encode(tokenizer, texts: Sequence[str], add_bos: bool | None = None, max_length: int | None = None) -> list[list[int]]:
    """Token ids of each text; add_bos None follows the tokenizer's default, True/False forces it."""
    add_bos = adds_bos(tokenizer) if add_bos is None else add_bos
    if add_bos and tokenizer.bos_token_id is None:
        raise BabelError("add_bos=True but this tokenizer has no BOS token; use add_bos=False")
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    prefix = [tokenizer.bos_token_id] if add_bos else []
    return [(prefix + seq)[:max_length] if max_length else prefix + seq for seq in ids]


def pad(sequences: Sequence[Sequence[int]], tokenizer) -> Batch:
    """Right-pad id sequences into a Batch whose count mask excludes special tokens."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[row, : len(seq)] = 1
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    count = attention.bool() & ~torch.isin(ids, special)
    return Batch(ids, attention, count)


def paragraph_batches(tokenizer, texts: Sequence[str], *, batch_tokens: int = 4096, max_length: int = 256,
                      add_bos: bool | None = None) -> Iterator[Batch]:
    """Batches of whole paragraphs (sorted by length to waste little padding), about `batch_tokens` tokens each."""
    sequences = [s for s in encode(tokenizer, texts, add_bos, max_length) if s]
    order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i]), i))
    batch: list[list[int]] = []
    for i in order:
        if batch and (len(batch) + 1) * len(sequences[i]) > batch_tokens:
            yield pad(batch, tokenizer)
            batch = []
        batch.append(sequences[i])
    if batch:
        yield pad(batch, tokenizer)


def windows(tokenizer, texts: Sequence[str], seq_len: int, n_windows: int | None = None,
            add_bos: bool | None = None) -> torch.Tensor:
    """Windows [N, seq_len] of the texts joined by newlines; each starts with BOS when the model uses one."""
    add_bos = adds_bos(tokenizer) if add_bos is None else add_bos
    body = seq_len - int(add_bos)
    stream = tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"]
    count = len(stream) // body if n_windows is None else min(n_windows, len(stream) // body)
    if count == 0:
        raise BabelError(f"the text holds {len(stream)} tokens, fewer than one window of {seq_len}; "
                         "use more paragraphs or a shorter seq_len")
    rows = torch.tensor(stream[: count * body], dtype=torch.long).view(count, body)
    if add_bos:
        rows = torch.cat([torch.full((count, 1), tokenizer.bos_token_id, dtype=torch.long), rows], dim=1)
    return rows
