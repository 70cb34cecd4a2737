"""A candidate for the profiler's CUDA path (benchmark only, not the library's): expert scores and per-neuron
counts from one kernel over the activation a, in Triton.

Today a layer reads a [N, d_ff] twice: the scores matmul with the one-hot assignment (cuBLAS; every M-tile also
re-reads the [d_ff, E] one-hot from L2) and the neuron count (the profiler's magnitude rule: |a_i| > neuron_scale
x the RMS of the token's a over the layer's neurons, masked, summed over tokens). Here each program takes BM
tokens and walks d_ff twice in BK-wide tiles: first for the tokens' sums of squares (the RMS; the BM rows it just
read are mostly still in L2 for the second walk), then building the one-hot tile from the labels in registers
(no one-hot matrix in memory), accumulating the scores with tl.dot in float32 and adding the tile's active-neuron
counts into int32 counters with atomics. The top-k selection stays the library's (`profiler.tally`, compiled).
Scores are float32 sums of the same bf16 products in another order than cuBLAS's, so the activated set may differ
at exact ties of the k-th score; the RMS is a float32 sum in another order than torch's, so a neuron exactly at
the bound could flip (the benchmark reports how many counts differ). Triton is imported when present; without it
this module still imports, and `scores_and_active_counts` and `FusedProfiler` raise ImportError. Checked on the
CPU with TRITON_INTERPRET=1:
    TRITON_INTERPRET=1 PYTHONPATH=.:<triton> python -m benchmarks.fused
"""

from __future__ import annotations

import torch

from babel_lib.babel.profiler import ExpertProfiler, magnitude_counts

try:
    import triton
    import triton.language as tl

    jit = triton.jit
    MISSING: ImportError | None = None
except ImportError as err:  # the CPU machines have no Triton; the benchmark reports the candidate as not run
    triton = tl = None
    MISSING = err

    def jit(fn):
        return fn


@jit
def _scores_and_active(a_ptr, labels_ptr, mask_ptr, scores_ptr, active_ptr, n, width, stride_a, scale,
                       E: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < n
    counted = (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
    squares = tl.zeros((BM,), dtype=tl.float32)
    for start in range(0, width, BK):  # the tokens' sums of squares, for the magnitude rule's RMS
        cols = start + tl.arange(0, BK)
        x = tl.load(a_ptr + rows[:, None] * stride_a + cols[None, :],
                    mask=row_ok[:, None] & (cols < width)[None, :], other=0.0).to(tl.float32)
        squares += tl.sum(x * x, axis=1)
    bound = scale * tl.sqrt_rn(squares / width)
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
        active = (tl.abs(a.to(tl.float32)) > bound[:, None]) & counted[:, None]
        tl.atomic_add(active_ptr + cols, tl.sum(active.to(tl.int32), axis=0), mask=col_ok)
    tl.store(scores_ptr + rows[:, None] * E + experts[None, :], acc, mask=row_ok[:, None])


def scores_and_active_counts(a: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, n_experts: int,
                             scale: float = 1.0, block_m: int = 64, block_k: int = 32, warps: int = 8,
                             stages: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [N, E] float32, active-neuron counts [d_ff] int32 by the magnitude rule with `scale`) of a
    [N, d_ff] (bf16/fp16/fp32); labels [d_ff] int64, mask [N] bool; E a power of two. The one-hot tile
    [block_k, E] lives in registers: keep block_k x E small (32 x 256 over 8 warps is 32 values a thread)."""
    if triton is None:
        raise ImportError(f"the fused candidate needs Triton ({MISSING})")
    n, width = a.shape
    scores = torch.empty(n, n_experts, dtype=torch.float32, device=a.device)
    active = torch.zeros(width, dtype=torch.int32, device=a.device)
    _scores_and_active[(triton.cdiv(n, block_m),)](a, labels, mask.view(torch.uint8), scores, active, n, width,
                                                   a.stride(0), float(scale), E=n_experts, BM=block_m, BK=block_k,
                                                   num_warps=warps, num_stages=stages)
    return scores, active


class FusedProfiler(ExpertProfiler):
    """ExpertProfiler (one expert map, rule topk, score sum, no variants, experts + neurons by the magnitude rule)
    counting through `scores_and_active_counts`; the activated set is the library's `tally` (compiled when
    compile=True)."""

    def __init__(self, model, experts, **settings):
        if triton is None:
            raise ImportError(f"the fused candidate needs Triton ({MISSING})")
        super().__init__(model, experts, **settings)
        n = self.maps[0].n_experts
        if (len(self.maps), self.countings, self.neurons) != (1, [("topk", "sum")], True) or n & (n - 1):
            raise ValueError("the fused candidate covers one expert map, rule topk, mode sum, no variants, with "
                             "neurons, 2^m experts")

    def _observe(self, layer: int, a: torch.Tensor, mask: torch.Tensor) -> None:
        g, em, home = self._group, self.maps[0], self.device
        scores, active = scores_and_active_counts(a, em.layer_labels(layer, a.device), mask, em.n_experts,
                                                  self.neuron_scale)
        self.expert_counts[g, layer] += self._tally(scores, mask, "topk", self.k[0, "topk"], 0.0).to(home)
        self.neuron_counts[g, layer] += active.to(home)
        if layer == em.n_layers - 1:
            self.tokens[g] += mask.sum().to(home)


def check() -> None:
    """Against a float64 brute force of the scores and the library's `magnitude_counts` on random data (a GPU in
    bf16, or the CPU under TRITON_INTERPRET=1 in fp32: the interpreter misreads bf16)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    for n, width, n_experts in ((70, 300, 16), (64, 256, 32), (5, 130, 16)):  # tl.dot needs E >= 16
        a = torch.randn(n, width, generator=gen).round(decimals=1)  # ties at zero and between scores
        a = a.bfloat16() if device == "cuda" else a  # the model's dtype (the interpreter reads bf16 wrongly)
        labels = torch.randperm(width, generator=gen) % n_experts
        mask = torch.rand(n, generator=gen) > 0.2
        for scale in (1.0, 0.5):
            scores, active = scores_and_active_counts(a.to(device), labels.to(device), mask.to(device), n_experts,
                                                      scale, block_m=16, block_k=32)
            reference = torch.zeros(n, n_experts, dtype=torch.float64).index_add_(1, labels, a.double())
            assert torch.allclose(scores.double().cpu(), reference, atol=1e-4), "scores"  # fp32 sums
            assert torch.equal(active.long().cpu(), magnitude_counts(a, mask, scale)), "active-neuron counts"
    print("fused scores and active-neuron counts (magnitude rule) equal the references")


if __name__ == "__main__":
    check()
