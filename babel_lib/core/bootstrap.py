"""Bootstrap confidence intervals over sampled windows: resample the windows with replacement, recompute the
statistic from the resampled per-window sums, and take percentiles. The windows are the independent units
(tokens within a window are not), so a point measured on sampled windows gets its interval this way.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from babel_lib.errors import BabelError

REPLICATES = 1000  # resamples per interval; the seed is fixed, so intervals are reproducible
LEVEL = 0.95


def resamples(n: int, replicates: int = REPLICATES, seed: int = 0) -> np.ndarray:
    """Indices [replicates, n] of `replicates` resamples of n units with replacement (seeded)."""
    if n < 1 or replicates < 1:
        raise BabelError(f"a bootstrap needs at least one unit and one replicate (got n={n}, replicates={replicates})")
    return np.random.default_rng(seed).integers(0, n, size=(replicates, n))


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central `level` percentile interval of replicate values (NaN replicates, where undefined, left out)."""
    values = np.asarray(samples, dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap(units: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], replicates: int = REPLICATES,
              seed: int = 0) -> np.ndarray:
    """The statistic of each resample: `statistic` maps per-unit data [replicates, n, ...] to [replicates] values.

    units: per-unit data [n, ...] (e.g. per-window sums); the statistic sees all resamples at once.
    """
    units = np.asarray(units)
    return np.asarray(statistic(units[resamples(len(units), replicates, seed)]), dtype=float)


def ci(units: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], replicates: int = REPLICATES, seed: int = 0,
       level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over resampled units (see `bootstrap`)."""
    return interval(bootstrap(units, statistic, replicates, seed), level)
