"""Data parallel: two gloo processes give exactly the one-process results; a failing rank ends the run at once
with one clear error and no artefact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from ranks import run_ranks

WORKER = Path(__file__).with_name("distributed_worker.py")


def launch(args: list[str], world: int) -> list[subprocess.CompletedProcess]:
    """Start `world` worker processes with the environment torchrun gives (world=0: no process group)."""
    return run_ranks([sys.executable, str(WORKER), *args], world)


def test_two_gloo_ranks_give_exactly_the_single_process_results(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    runs = launch(["results", str(one)], 0) + launch(["results", str(two)], 2)
    assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr[-2000:] for r in runs]
    single, parallel = torch.load(one), torch.load(two)
    assert single["windows"] >= 6 and single["tokens"].min() > 0  # several batches per rank, every group counted
    assert single.keys() == parallel.keys()
    for key, value in single.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == parallel[key].dtype and torch.equal(value, parallel[key]), key
        else:
            assert value == parallel[key], key  # float sums bit for bit


def test_a_failing_rank_ends_every_rank_with_one_error_and_no_artefact(tmp_path):
    runs = launch(["fail", str(tmp_path / "store")], 2)
    assert [r.returncode for r in runs] == [1, 1]
    errors = [line for r in runs for line in r.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: rank 1 of 2 failed: a hook on rank 1 met bad input"], errors
    assert not any("Traceback" in r.stderr for r in runs)
    assert not any(p.is_file() for p in (tmp_path / "store").rglob("*"))
