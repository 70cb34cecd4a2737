"""Uncertainty of a statistic over sampled windows: the percentile bootstrap of `babel_lib.core.bootstrap` on
one value per window, with the statistics notebook 03 uses."""

from __future__ import annotations

from collections.abc import Callable

import torch

from babel_lib.core.bootstrap import LEVEL, interval, resamples


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
    replicates = statistic(x[torch.from_numpy(resamples(x.numel(), n_resamples, seed))])
    low, high = interval(replicates.numpy(), level)
    return float(statistic(x[None])[0]), low, high


def mean_intervals(values: torch.Tensor, n_resamples: int = 2000, level: float = LEVEL,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of [N, L] (N sampled windows), the percentile-bootstrap interval of the mean over windows:
    (low [L], high [L]); the same resamples for every column."""
    x = torch.as_tensor(values, dtype=torch.float64)
    means = x[torch.from_numpy(resamples(x.shape[0], n_resamples, seed))].mean(dim=1)  # [R, L]
    bounds = [interval(means[:, j].numpy(), level) for j in range(x.shape[1])]
    return (torch.tensor([b[0] for b in bounds], dtype=torch.float64),
            torch.tensor([b[1] for b in bounds], dtype=torch.float64))
