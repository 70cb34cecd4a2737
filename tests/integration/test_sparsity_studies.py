"""Notebook 04's studies: one call each, keyed by every parameter, equal to the metric run by hand."""

from __future__ import annotations

import math

import pytest
import torch

from babel_lib.core.artefacts import ArtefactStore
from babel_lib.core.batches import windows
from babel_lib.sparsing.sparsity import SparseEvaluator
from babel_lib.sparsing.studies import EvalParams, LanguageParams, ParetoParams, by_language, pareto

TEXTS = {"en": ["The quick brown fox jumps over the lazy dog, twice, and then it runs away into the wood."] * 3,
         "ja": ["日本語のテキストです。これは短い段落です。もう一つの文があります。"] * 3}
EVALUATION = EvalParams(seq_len=16, paragraphs=3, batch_size=1)
PARETO = ParetoParams(pareto_languages=("en", "ja"), windows_per_language=2, max_iter=2, tol=1e-3,
                      topk_ratios=(0.5,), fat_quantiles=(0.5,))


def _artefacts(root, kind: str) -> int:
    return len(list((root / kind).glob("*.json")))


def test_changing_batch_size_recomputes_the_pareto_study(tiny, tmp_path):
    """Regression: notebook 04's hand-built key left out batch_size, although CETT thresholds are per batch."""
    lm, store = tiny("llama"), ArtefactStore(tmp_path)
    one = pareto(store, lm, PARETO, EVALUATION, TEXTS, corpus="sha")
    four = pareto(store, lm, PARETO, EVALUATION.replace(batch_size=4), TEXTS, corpus="sha")
    assert _artefacts(tmp_path, ParetoParams.KIND) == 2
    ids = torch.cat([windows(lm.tokenizer, TEXTS[lang], 16, 2) for lang in ("en", "ja")])
    for result, batch in ((one, 1), (four, 4)):
        reference = SparseEvaluator(lm, ids, batch_size=batch).ppl_p(PARETO.p, PARETO.tol, max_iter=PARETO.max_iter)
        assert result.cett == reference.cett and result.activation_ratio == reference.activation_ratio
        assert torch.equal(torch.as_tensor(result.thresholds), reference.thresholds)
    assert not torch.equal(torch.as_tensor(one.thresholds), torch.as_tensor(four.thresholds))
    again = pareto(store, lm, PARETO, EVALUATION, TEXTS, corpus="sha")  # the same parameters: the cached result
    assert _artefacts(tmp_path, ParetoParams.KIND) == 2 and again.activation_ratio == one.activation_ratio
    pareto(store, lm, PARETO, EVALUATION, TEXTS, corpus="other")  # other text: another artefact
    assert _artefacts(tmp_path, ParetoParams.KIND) == 3


def test_pareto_points_are_the_methods_evaluated_on_the_pooled_windows(tiny, tmp_path):
    lm = tiny("llama")
    result = pareto(ArtefactStore(tmp_path), lm, PARETO.replace(cett_values=(0.3,)), EVALUATION, TEXTS, corpus="s")
    ids = torch.cat([windows(lm.tokenizer, TEXTS[lang], 16, 2) for lang in ("en", "ja")])
    evaluator = SparseEvaluator(lm, ids, batch_size=1)
    assert result.dense_perplexity == pytest.approx(math.exp(evaluator.dense.mean))
    points = result.points.set_index("method")
    top = evaluator.evaluate("topk", 0.5)
    assert points.loc["topk", "activation_ratio"] == pytest.approx(top.activation_ratio)
    assert points.loc["topk", "ppl_ratio"] == pytest.approx(evaluator.ratio(top))
    cett = points.loc["cett"]
    assert len(cett) == result.bisections + 1 and 0.3 in set(cett["value"])
    assert result.layer_ratio.shape == (len(lm.model.model.layers),)


def test_changing_batch_size_recomputes_the_language_study(tiny, tmp_path):
    lm, store = tiny("llama"), ArtefactStore(tmp_path)
    params = LanguageParams(language_windows=1)
    one = by_language(store, lm, params, EVALUATION, TEXTS, corpus="sha", cett=0.2)
    four = by_language(store, lm, params, EVALUATION.replace(batch_size=4), TEXTS, corpus="sha", cett=0.2)
    assert _artefacts(tmp_path, LanguageParams.KIND) == 2
    for result, batch in ((one, 1), (four, 4)):
        for lang in TEXTS:
            evaluator = SparseEvaluator(lm, windows(lm.tokenizer, TEXTS[lang], 16, 1), batch_size=batch)
            run = evaluator.evaluate("cett", 0.2)
            row = result.table.set_index("language").loc[lang]
            assert row["activation_ratio"] == pytest.approx(run.activation_ratio)
            assert row["ppl_ratio"] == pytest.approx(evaluator.ratio(run))
    assert result.frequency.shape[0] == len(TEXTS)
