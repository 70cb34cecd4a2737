"""Uncertainty of a statistic over sampled windows: a percentile bootstrap."""

from __future__ import annotations

from collections.abc import Callable

import torch


def mean(sample: torch.Tensor) -> torch.Tensor:
    """Mean of each row of [R, n] resamples."""
    return sample.mean(dim=1)


def cv(sample: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation (std / |mean|) of each row of [R, n] resamples."""
    return sample.std(dim=1) / sample.mean(dim=1).abs()


def bootstrap(values: torch.Tensor, statistic: Callable[[torch.Tensor], torch.Tensor] = mean,
              n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(estimate, low, high): `statistic` of 1-D `values` and its percentile-bootstrap interval at `level`;
    `statistic` maps [R, n] resamples to [R] (a single value gives a zero-width interval)."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise ValueError("bootstrap needs at least one value")
    gen = torch.Generator().manual_seed(seed)
    stats = statistic(x[torch.randint(x.numel(), (n_resamples, x.numel()), generator=gen)])
    tail = (1 - level) / 2
    low, high = torch.quantile(stats, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return float(statistic(x[None])[0]), low, high
