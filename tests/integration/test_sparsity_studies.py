"""Notebook 04's studies: one call each, keyed by every parameter, equal to the metric run by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from babel_lib.core.artefacts import ArtefactStore
from babel_lib.core.batches import windows
from babel_lib.errors import BabelError
from babel_lib.sparsing.sparsity import SparseEvaluator
from babel_lib.sparsing.studies import (
    EvalParams,
    LanguageParams,
    ParetoParams,
    by_language,
    pareto,
    search_slope,
)

TEXTS = {"en": ["The quick brown fox jumps over the lazy dog, twice, and then it runs away into the wood."] * 3,
         "ja": ["日本語のテキストです。これは短い段落です。もう一つの文があります。"] * 3}
EVALUATION = EvalParams(seq_len=16, paragraphs=3, batch_size=2)
PARETO = ParetoParams(pareto_languages=("en", "ja"), windows_per_language=2, sweep_windows=1, max_iter=3,
                      refine_iter=2, tol=1e-3, topk_ratios=(0.5, 0.8), fat_quantiles=(0.2, 0.5), replicates=50)


def _artefacts(root, kind: str) -> int:
    return len(list((root / kind).glob("*.json")))


def _full(lm, per: int = 2) -> torch.Tensor:
    return torch.cat([windows(lm.tokenizer, TEXTS[lang], 16, per) for lang in ("en", "ja")])


def test_pareto_is_the_search_on_both_window_sets_by_hand(tiny, tmp_path):
    lm, store = tiny("llama"), ArtefactStore(tmp_path)
    result = pareto(store, lm, PARETO, EVALUATION, TEXTS, corpus="sha")
    full_ids = _full(lm)
    sweep_ids = full_ids[[0, 2]]  # the first window of each language
    sweep = SparseEvaluator(lm, sweep_ids, batch_size=2)
    found = sweep.ppl_p(PARETO.p, PARETO.tol, max_iter=PARETO.max_iter, start=PARETO.start)
    cett = result.points[result.points["method"] == "cett"]
    assert list(cett["value"]) == [t["cett"] for t in found.trace] and result.sweep_evaluations == len(found.trace)
    top = sweep.evaluate("topk", 0.5)
    row = result.points[(result.points["method"] == "topk") & (result.points["value"] == 0.5)].iloc[0]
    assert row["activation_ratio"] == pytest.approx(top.activation_ratio, abs=1e-12)
    assert row["ppl_ratio"] == pytest.approx(sweep.ratio(top), rel=1e-12)
    assert row["activation_lo"] <= row["activation_ratio"] <= row["activation_hi"]
    full = SparseEvaluator(lm, full_ids, batch_size=2, groups=[2, 2])
    final = full.ppl_p(PARETO.p, PARETO.tol, max_iter=PARETO.refine_iter, start=found.cett, step=1.0,
                       slope=search_slope(found.trace, 1 + PARETO.p / 100))
    assert result.cett == final.cett and result.full_cett == [t["cett"] for t in final.trace]
    assert result.activation_ratio == pytest.approx(final.activation_ratio, abs=1e-12)
    assert result.ppl_ratio == pytest.approx(final.ppl_ratio, rel=1e-12)
    assert result.dense_perplexity == pytest.approx(math.exp(full.dense.mean), rel=1e-12)
    assert np.array_equal(result.thresholds, final.thresholds.numpy())
    assert np.allclose(result.layer_ratio, 1 - final.layer_sparsity.numpy(), atol=1e-12)
    assert result.tokens == full_ids[:, 1:].numel()
    lo, hi = result.activation_ci
    assert lo <= hi and result.layer_ci.shape == (len(lm.model.model.layers), 2)
    again = pareto(store, lm, PARETO, EVALUATION, TEXTS, corpus="sha")  # the same parameters: the cached result
    assert _artefacts(tmp_path, ParetoParams.KIND) == 1 and again.activation_ratio == result.activation_ratio
    pareto(store, lm, PARETO, EVALUATION.replace(batch_size=1), TEXTS, corpus="sha")  # thresholds are per batch
    assert _artefacts(tmp_path, ParetoParams.KIND) == 2


def test_each_language_of_the_full_set_equals_that_language_evaluated_alone(tiny, tmp_path):
    """Batches never mix languages, so a language's numbers in the pooled run are those of its windows alone."""
    lm = tiny("gemma")
    result = pareto(ArtefactStore(tmp_path), lm, PARETO, EVALUATION, TEXTS, corpus="sha")
    languages = by_language(result, LanguageParams(rare=0.01)).table.set_index("language")
    full = _full(lm)
    for g, lang in enumerate(("en", "ja")):
        alone = SparseEvaluator(lm, full[2 * g : 2 * g + 2], batch_size=2)
        run = alone.evaluate("cett", result.cett)
        assert languages.loc[lang, "activation_ratio"] == pytest.approx(run.activation_ratio, abs=1e-12)
        assert languages.loc[lang, "ppl_ratio"] == pytest.approx(alone.ratio(run), rel=1e-9)
        assert languages.loc[lang, "activation_lo"] <= languages.loc[lang, "activation_hi"]
        assert np.allclose(result.frequency[g], torch.stack(run.neuron_frequency).numpy(), atol=1e-12)


def test_too_little_text_for_the_windows_is_one_clear_error(tiny, tmp_path):
    with pytest.raises(BabelError, match="raise `paragraphs`"):
        pareto(ArtefactStore(tmp_path), tiny("llama"), PARETO.replace(windows_per_language=50), EVALUATION, TEXTS,
               corpus="sha")
