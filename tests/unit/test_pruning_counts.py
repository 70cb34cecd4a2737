"""Which experts a pruning removes: per-layer counts (uniform, layer-adaptive) and frequency-guided masks."""

from __future__ import annotations

import itertools

import pytest
import torch

from babel_lib.babel.pruning import adaptive_counts, concentration, frequency_keep, uniform_counts


def test_uniform_counts_round_and_keep_one_expert():
    assert uniform_counts(0.25, 3, 8).tolist() == [2, 2, 2]
    assert uniform_counts(0.0, 2, 8).tolist() == [0, 0]
    assert uniform_counts(0.99, 2, 8).tolist() == [7, 7]


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_adaptive_counts_total_equals_uniform_and_follow_concentration(rate):
    gen = torch.Generator().manual_seed(0)
    sharp = torch.tensor([[1.0], [3.0], [6.0], [12.0]])
    freq = torch.rand(4, 64, generator=gen) ** sharp  # later layers concentrate on fewer experts
    counts = adaptive_counts(freq, rate)
    assert int(counts.sum()) == int(uniform_counts(rate, 4, 64).sum())
    assert int(counts.max()) <= 63 and int(counts.min()) >= 0
    assert counts.tolist() == sorted(counts.tolist())  # more concentrated -> at least as many pruned
    c = concentration(freq)
    assert torch.all(c[1:] > c[:-1])


def test_adaptive_counts_stay_within_twice_the_uniform_rate():
    freq = torch.ones(6, 32)
    freq[0, 1:] = 1e-9  # layer 0 uses one expert: without a cap it would lose nearly all of them
    counts = adaptive_counts(freq, 0.25)
    assert int(counts.sum()) == 6 * 8 and int(counts.max()) <= 16 and int(counts[0]) == 16


def test_adaptive_counts_are_uniform_for_equal_layers():
    freq = torch.rand(1, 16).repeat(5, 1)
    assert torch.equal(adaptive_counts(freq, 0.5), uniform_counts(0.5, 5, 16))
    assert torch.equal(adaptive_counts(torch.ones(5, 16), 0.5), uniform_counts(0.5, 5, 16))


def test_concentration_bounds():
    flat, one_hot = torch.ones(1, 8), torch.eye(8)[:1]
    assert float(concentration(flat)) == pytest.approx(0, abs=1e-12)
    assert float(concentration(one_hot)) == pytest.approx(1)


def test_frequency_keep_removes_the_lowest_frequencies_brute_force():
    gen = torch.Generator().manual_seed(1)
    freq = torch.rand(3, 6, generator=gen)
    counts = torch.tensor([0, 2, 5])
    keep = frequency_keep(freq, counts)
    for layer, n in enumerate(counts.tolist()):
        # the removed set is the n-subset with the smallest total frequency
        best = min(itertools.combinations(range(6), n), key=lambda s: sum(float(freq[layer, i]) for i in s))
        assert sorted((~keep[layer]).nonzero().squeeze(-1).tolist()) == sorted(best)
