"""Where a profile's zoo files live: the one place that knows. The Makefile asks `python -m
babel_lib.sparsing.zoo where --profile P` (which needs nothing but the standard library, so it answers before
`make setup` has built the environment); the notebook and the CLI call these functions."""

from __future__ import annotations

from pathlib import Path

COMMITTED = ("default", "gpu")  # profiles whose family is the committed table under data/zoo


def _root() -> Path:
    from babel_lib.core.config import ROOT  # imported here: `where` must not need PyYAML

    return ROOT


def table_location(profile: str) -> str:
    """The zoo table of `profile`, relative to the checkout: data/zoo/zoo.csv for the committed family (default,
    gpu), build/<profile>/zoo/zoo.csv for any other profile (e.g. the smoke test's toy family)."""
    return "data/zoo/zoo.csv" if profile in COMMITTED else f"build/{profile}/zoo/zoo.csv"


def table_path(profile: str) -> Path:
    """The zoo table a notebook reads for `profile`."""
    return _root() / table_location(profile)


def table_dir(profile: str) -> Path:
    """Where `table` writes zoo.csv and PROVENANCE.json for `profile`."""
    return table_path(profile).parent


def runs_dir(profile: str) -> Path:
    """Where `train` writes a profile's per-run rows by default."""
    return _root() / "build" / profile / "zoo" / "runs"


def data_dir(profile: str) -> Path:
    """Where `prepare` writes a profile's tokenised data (an ignored build folder the GPU command carries)."""
    return _root() / "build" / "zoo-data" / profile


def checkpoint_path(runs: Path, run_name: str, step: int) -> Path:
    """Where `train` saves a run's weights at `step` (safetensors), under the folder of per-run rows."""
    return runs / run_name / f"step{step:07d}.safetensors"
