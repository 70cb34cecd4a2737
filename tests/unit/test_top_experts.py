"""The activated set of the top-k rule: the k-th largest score by a sort (the GPU's way) and by a partial
selection (the CPU's) both equal a brute-force reference, ties included."""

from __future__ import annotations

import pytest
import torch

from babel_lib.babel.moe import kth_largest, top_experts


def brute_kth(row: list[float], k: int) -> float:
    return sorted(row, reverse=True)[k - 1]


@pytest.mark.parametrize("n, experts, k", [(50, 256, 64), (31, 8, 1), (17, 8, 8), (40, 43, 11), (5, 513, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_largest_equals_brute_force_with_ties(n, experts, k, dtype):
    gen = torch.Generator().manual_seed(n * experts + k)
    scores = torch.randn(n, experts, generator=gen, dtype=dtype)
    scores[::3] = scores[::3].round()  # many exact ties, also at the k-th score
    scores[1, :] = 0.5  # a constant row: every expert ties
    ref = torch.tensor([[brute_kth(row, k)] for row in scores.tolist()], dtype=dtype)
    for by_sort in (True, False):
        assert torch.equal(kth_largest(scores, k, by_sort=by_sort), ref)
        assert torch.equal(kth_largest(scores.view(1, n, experts), k, by_sort=by_sort), ref.view(1, n, 1))
    chosen = top_experts(scores, k)
    assert torch.equal(chosen, scores >= ref)
    assert (chosen.sum(-1) >= k).all() and chosen[1].all()
