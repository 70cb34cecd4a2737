"""A candidate for the profiler's CUDA path (benchmark only, not the library's): expert scores and per-neuron
counts in ONE pass over the activation a, as a Triton kernel.

Today a layer reads a [N, d_ff] twice: the scores matmul with the one-hot assignment (cuBLAS; every M-tile also
re-reads the [d_ff, E] one-hot from L2) and the neuron count (a > 0 & mask, summed over tokens). Here each program
takes BM tokens, walks d_ff in BK-wide tiles, builds the one-hot tile from the labels in registers (no one-hot
matrix in memory), accumulates the scores with tl.dot in float32 and adds the tile's positive counts into int32
counters with atomics. The top-k selection stays the library's (compiled sort). Scores are float32 sums of the
same bf16 products in another order than cuBLAS's, so the activated set may differ at exact ties of the k-th
score (the benchmark reports how many activations differ). Checked on the CPU with TRITON_INTERPRET=1:
    TRITON_INTERPRET=1 PYTHONPATH=.:<triton> python -m benchmarks.fused
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from babel_lib.babel.moe import kth_largest
from babel_lib.babel.profiler import ExpertProfiler


@triton.jit
def _scores_and_positives(a_ptr, labels_ptr, mask_ptr, scores_ptr, positives_ptr, n, width, stride_a,
                          E: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < n
    counted = (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
    experts = tl.arange(0, E)
    acc = tl.zeros((BM, E), dtype=tl.float32)
    for start in range(0, width, BK):
        cols = start + tl.arange(0, BK)
        col_ok = cols < width
        a = tl.load(a_ptr + rows[:, None] * stride_a + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0)
        labels = tl.load(labels_ptr + cols, mask=col_ok, other=-1)
        onehot = (labels[:, None] == experts[None, :]).to(a.dtype)
        acc = tl.dot(a, onehot, acc)
        positives = tl.sum(((a > 0) & counted[:, None]).to(tl.int32), axis=0)
        tl.atomic_add(positives_ptr + cols, positives, mask=col_ok)
    tl.store(scores_ptr + rows[:, None] * E + experts[None, :], acc, mask=row_ok[:, None])


def scores_and_positives(a: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, n_experts: int,
                         block_m: int = 64, block_k: int = 32, warps: int = 8, stages: int = 3
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [N, E] float32, positive counts [d_ff] int32) of a [N, d_ff] in one pass; labels [d_ff] int64,
    mask [N] bool; E a power of two. The one-hot tile [block_k, E] lives in registers: keep block_k x E small
    (32 x 256 over 8 warps is 32 values a thread)."""
    n, width = a.shape
    scores = torch.empty(n, n_experts, dtype=torch.float32, device=a.device)
    positives = torch.zeros(width, dtype=torch.int32, device=a.device)
    _scores_and_positives[(triton.cdiv(n, block_m),)](a, labels, mask.view(torch.uint8), scores, positives, n,
                                                      width, a.stride(0), E=n_experts, BM=block_m, BK=block_k,
                                                      num_warps=warps, num_stages=stages)
    return scores, positives


def select(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Per expert, the counted tokens whose score is >= the k-th largest (the library's rule, sort on CUDA)."""
    return ((scores >= kth_largest(scores, k, by_sort=True)) & mask[:, None]).sum(0)


class FusedProfiler(ExpertProfiler):
    """ExpertProfiler (rule topk, score sum, experts + neurons) counting through `scores_and_positives`."""

    def __init__(self, model, experts, **settings):
        super().__init__(model, experts, **settings)
        if (self.rule, self.mode, self.neurons) != ("topk", "sum", True) or experts.n_experts & (experts.n_experts - 1):
            raise ValueError("the fused candidate covers rule topk, mode sum, with neurons, 2^m experts")
        self._select = torch.compile(select) if self.device.type == "cuda" else select

    def _observe(self, layer: int, a: torch.Tensor, mask: torch.Tensor) -> None:
        g = self._group
        scores, positives = scores_and_positives(a, self.experts.layer_labels(layer, a.device), mask,
                                                 self.experts.n_experts)
        self.expert_counts[g, layer] += self._select(scores, mask, self.k)
        self.neuron_counts[g, layer] += positives
        if layer == self.experts.n_layers - 1:
            self.tokens[g] += mask.sum()


def check() -> None:
    """Against a float64 brute force on random data (a GPU in bf16, or the CPU under TRITON_INTERPRET=1 in fp32:
    the interpreter misreads bf16)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    for n, width, n_experts in ((70, 300, 16), (64, 256, 32), (5, 130, 16)):  # tl.dot needs E >= 16
        a = torch.randn(n, width, generator=gen).round(decimals=1)  # ties at zero and between scores
        a = a.bfloat16() if device == "cuda" else a  # the model's dtype (the interpreter reads bf16 wrongly)
        labels = torch.randperm(width, generator=gen) % n_experts
        mask = torch.rand(n, generator=gen) > 0.2
        scores, positives = scores_and_positives(a.to(device), labels.to(device), mask.to(device), n_experts,
                                                 block_m=16, block_k=32)
        reference = torch.zeros(n, n_experts, dtype=torch.float64).index_add_(1, labels, a.double())
        assert torch.allclose(scores.double().cpu(), reference, atol=1e-4), "scores"  # fp32 sums
        assert torch.equal(positives.long().cpu(), ((a > 0) & mask[:, None]).sum(0)), "positive counts"
    print("fused scores and positive counts equal the float64 reference")


if __name__ == "__main__":
    check()
