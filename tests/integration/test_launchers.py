"""The launchers (`python -m babel_lib.core.distributed STUDY ...`): two gloo ranks write exactly the artefacts one
process writes (same files under the same keys, byte for byte), on a tiny model and a tiny profile."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from ranks import run_ranks

from babel_lib.core import config

PROFILE = """extends: default
models: [tiny:llama]
languages: [en, de, ja]
threads: 1
notebooks:
  01_convert: {n_experts: 8, method: random, baselines: [contiguous]}
  02_profile: {paragraphs: 8, max_length: 40, batch_tokens: 96}
  03_massive_activations: {seq_len: 24, scan_windows: 3, scan_paragraphs: 12, batch_size: 2, top_k: 6}
  04_sparsity_scaling: {seq_len: 24, pareto_languages: [en, ja], windows_per_language: 2, paragraphs: 12,
                        batch_size: 1, max_iter: 2, tol: 0.05, topk_ratios: [0.5], fat_quantiles: [0.5],
                        sweep_windows: 1, replicates: 20}
  05_prune: {eval_languages: [en, ja], rates: [0.5], random_seeds: 1, active_ratios: [0.5], seq_len: 24,
             windows_per_language: 2, paragraphs: 12, batch_size: 1}
"""


def root(path: Path) -> Path:
    """A BABEL_ROOT with the shipped default profile and the tiny one."""
    (path / "configs").mkdir(parents=True)
    (path / "configs" / "default.yaml").write_text((config.ROOT / "configs" / "default.yaml").read_text())
    (path / "configs" / "tiny.yaml").write_text(PROFILE)
    return path


def launch(where: Path, studies: list[str], world: int) -> None:
    """The launcher on `world` gloo ranks started with torchrun's environment (world=0: one plain process)."""
    runs = run_ranks([sys.executable, "-m", "babel_lib.core.distributed", *studies, "--profile", "tiny"], world,
                     {"BABEL_ROOT": str(where), "PYTHONPATH": str(config.ROOT)}, timeout=600)
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]


def artefacts(where: Path) -> dict[str, bytes]:
    """Every artefact file of the tiny run, by path under the artefact folder."""
    base = where / "build" / "tiny" / "artefacts"
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("studies, kinds", [
    (["scan"], {"massive-scan"}),
    (["sparsity"], {"sparsity-pareto"}),
    (["profile", "perplexity"], {"partition", "frequencies", "pruning"}),
])
def test_two_gloo_ranks_write_the_single_process_artefacts(tmp_path, studies, kinds):
    one, two = root(tmp_path / "one"), root(tmp_path / "two")
    launch(one, studies, 0)
    launch(two, studies, 2)
    single, parallel = artefacts(one), artefacts(two)
    assert {name.split("/")[0] for name in single} >= kinds, sorted(single)
    assert sorted(single) == sorted(parallel)  # the same keys
    different = [name for name in single if single[name] != parallel[name]]
    assert not different, different
