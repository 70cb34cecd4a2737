"""Sparsity metrics: exact CETT thresholds against brute force, the inference-time methods, PPL-p%."""

from __future__ import annotations

import math

import pytest
import torch
from samples import TEXTS

from babel_lib.core.batches import encode, pad, windows
from babel_lib.core.evaluation import window_loss
from babel_lib.core.ffn import ffn_layers
from babel_lib.core.hooks import hooked, site
from babel_lib.core.models import load_model
from babel_lib.errors import BabelError
from babel_lib.sparsing.sparsity import (
    CettCurve,
    SparseEvaluator,
    batch_ranges,
    cett,
    cett_thresholds,
    layer_thresholds,
    ppl_p,
    sparsified,
)

C_VALUES = [0.0, 0.01, 0.1, 0.3, 0.7, 0.95, 1.0]


def _activations(seed: int, kind: str, tokens: int = 24, width: int = 32, d_model: int = 12, orthogonal=False):
    """Random neuron activations h [tokens, d_ff] (gated: signed; plain: ReLU with exact zeros) and W_out rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g, dtype=torch.float64)
    h = torch.relu(x) if kind == "plain" else torch.nn.functional.silu(x) * torch.randn(tokens, width, generator=g,
                                                                                         dtype=torch.float64)
    if orthogonal:  # orthonormal directions with random lengths: contributions never cancel
        q, _ = torch.linalg.qr(torch.randn(d_model, width, generator=g, dtype=torch.float64))
        w = q.T * torch.rand(width, 1, generator=g, dtype=torch.float64).add(0.1)
    else:
        w = torch.randn(width, d_model, generator=g, dtype=torch.float64)
    return h, w


def _brute_cett(h: torch.Tensor, w: torch.Tensor, eps: float) -> float:
    """CETT(ε) token by token, neuron by neuron, straight from the definition."""
    ratios = []
    column_norms = w.norm(dim=1)  # ‖n_i‖ = |h_i| · ‖W_out[:, i]‖, the paper's form
    for t in range(h.shape[0]):
        contributions = [h[t, i] * w[i] for i in range(h.shape[1])]
        total = torch.stack(contributions).sum(0).norm()
        skipped = [n for i, n in enumerate(contributions) if h[t, i].abs() * column_norms[i] < eps]
        part = torch.stack(skipped).sum(0).norm() if skipped else torch.tensor(0.0, dtype=h.dtype)
        ratios.append(0.0 if total == 0 else float(part / total))
    return sum(ratios) / len(ratios)


def _brute_curve(h: torch.Tensor, w: torch.Tensor) -> tuple[list[float], list[float]]:
    """Every candidate threshold (each distinct ‖n_i‖, then +inf) and CETT there, one candidate at a time."""
    norms = h.abs() * w.norm(dim=1)
    total = (h @ w).norm(dim=1)
    candidates = norms.flatten().unique().tolist() + [math.inf]
    curve = [float(((h * (norms < eps)) @ w).norm(dim=1).div(total).mean()) for eps in candidates]
    return candidates, curve


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["gated", "plain"])
def test_thresholds_equal_brute_force_search(seed, kind):
    h, w = _activations(seed, kind)
    candidates, curve = _brute_curve(h, w)
    found = layer_thresholds(h, w, C_VALUES)
    for c, t in zip(C_VALUES, found.tolist()):
        assert t == max(eps for eps, value in zip(candidates, curve) if value <= c)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["gated", "plain"])
def test_bisection_lands_on_an_exact_crossing(seed, kind, monkeypatch):
    monkeypatch.setattr(CettCurve, "SCAN", 4)  # force the bisection path down to brackets of 4 pairs
    h, w = _activations(seed, kind, tokens=24, width=40, d_model=16)
    candidates, curve = _brute_curve(h, w)
    for c, t in zip(C_VALUES, layer_thresholds(h, w, C_VALUES).tolist()):
        k = candidates.index(t)
        assert curve[k] <= c and (k + 1 == len(candidates) or curve[k + 1] > c)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", ["gated", "plain"])
def test_bisection_equals_brute_force_where_cett_is_monotone(seed, kind, monkeypatch):
    monkeypatch.setattr(CettCurve, "SCAN", 4)
    h, w = _activations(seed, kind, tokens=30, width=16, d_model=24, orthogonal=True)
    candidates, curve = _brute_curve(h, w)
    assert all(a <= b + 1e-12 for a, b in zip(curve, curve[1:]))  # CETT is monotone in ε here
    assert curve[0] == 0.0 and curve[-1] == pytest.approx(1.0, abs=1e-12)
    for c, t in zip(C_VALUES, layer_thresholds(h, w, C_VALUES).tolist()):
        assert t == max(eps for eps, value in zip(candidates, curve) if value <= c)


def test_cett_matches_the_definition_and_memo_is_reused(monkeypatch):
    monkeypatch.setattr(CettCurve, "SCAN", 4)
    h, w = _activations(3, "gated")
    candidates, curve = _brute_curve(h, w)
    for k in [0, 10, 200, 500, len(candidates) - 1]:  # the vectorised brute force is the definition, too
        assert cett(h, w, candidates[k]) == pytest.approx(_brute_cett(h, w, candidates[k]), abs=1e-12)
        assert curve[k] == pytest.approx(_brute_cett(h, w, candidates[k]), abs=1e-12)
    memo: dict = {}
    first = layer_thresholds(h, w, [0.2], memo)
    assert layer_thresholds(h, w, [0.2], memo).equal(first) and len(memo) > 3
    other, _ = _activations(4, "gated")
    assert layer_thresholds(other, w, [0.2], memo).equal(layer_thresholds(other, w, [0.2]))  # a stale memo is reset


@pytest.mark.parametrize("kind", ["gated", "plain"])
def test_kept_sort_gives_the_fresh_thresholds(kind, monkeypatch):
    """keep_sorted: c after c on one memo (the sort reused, scans reselecting their pairs) = each c searched alone."""
    monkeypatch.setattr(CettCurve, "SCAN", 4)
    h, w = _activations(5, kind)
    memo: dict = {}
    kept = [float(layer_thresholds(h, w, [c], memo, keep_sorted=True)[0]) for c in C_VALUES]
    assert "sorted" in memo
    assert kept == layer_thresholds(h, w, C_VALUES).tolist()
    other, _ = _activations(6, kind)
    assert layer_thresholds(other, w, [0.2], memo, keep_sorted=True).equal(layer_thresholds(other, w, [0.2]))


def test_model_thresholds_come_from_each_layers_counted_activations(tiny):
    lm = tiny("llama", "float64")
    batch = pad(encode(lm.tokenizer, TEXTS), lm.tokenizer)
    layers = ffn_layers(lm.model)
    captured = {}
    with hooked(lm.model, {site(f.index, "mlp.hook_post"): (lambda a, i=f.index: captured.__setitem__(i, a))
                           for f in layers}):
        lm.model(input_ids=batch.input_ids)
    ids = batch.input_ids
    counted = ~torch.isin(ids, torch.tensor(lm.tokenizer.all_special_ids))  # no BOS, no padding
    got = cett_thresholds(lm, ids, [0.1, 0.4])
    for f in layers:
        expected = layer_thresholds(captured[f.index][counted], f.down_columns(), [0.1, 0.4])
        assert got[:, f.index].equal(expected)
    assert cett_thresholds(lm, ids, 0.4).equal(got[1])


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "phi3"])
def test_zero_thresholds_change_nothing(tiny, model_type):
    lm = tiny(model_type, "float64")
    batch = pad(encode(lm.tokenizer, TEXTS), lm.tokenizer)
    bare = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    n_layers = len(ffn_layers(lm.model))
    for method, value in [("cett", torch.zeros(n_layers)), ("fat", 0.0)]:
        with sparsified(lm.model, method, value, count_mask=batch.count_mask) as meter:
            out = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        assert torch.equal(out, bare)
        assert meter.activation_ratio == 1.0 and int(meter.tokens[0]) == batch.n_tokens
    assert all(not f.down._forward_pre_hooks and not f.act._forward_hooks for f in ffn_layers(lm.model))


def _run_capturing(lm, method, value, batch):
    """Logits under `method`, the score s each layer saw, and the down projection's input after sparsifying."""
    layers = ffn_layers(lm.model)
    scores, inputs = {}, {}
    observe = {site(f.index, "mlp.hook_gate"): (lambda s, i=f.index: scores.__setitem__(i, s)) for f in layers}
    with sparsified(lm.model, method, value) as meter:
        # registered after the sparsifying hooks, so the down-projection pre-hook sees the zeroed input
        handles = [f.down.register_forward_pre_hook(lambda m, a, i=f.index: inputs.__setitem__(i, a[0]))
                   for f in layers]
        try:
            with hooked(lm.model, observe):
                lm.model(input_ids=batch.input_ids)
        finally:
            for handle in handles:
                handle.remove()
    return scores, inputs, meter


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_topk_keeps_exactly_the_k_largest_scores_per_token(tiny, model_type):
    lm = tiny(model_type, "float64")
    batch = pad(encode(lm.tokenizer, TEXTS[:1]), lm.tokenizer)
    width = ffn_layers(lm.model)[0].width
    k = round(0.25 * width)
    scores, inputs, meter = _run_capturing(lm, "topk", 0.25, batch)
    for layer, h in inputs.items():
        kept = h.reshape(-1, width) != 0
        assert (kept.sum(-1) == k).all()
        best = scores[layer].reshape(-1, width).abs().topk(k, dim=-1).indices
        assert torch.equal(kept, torch.zeros_like(kept).scatter_(-1, best, True))
    assert meter.activation_ratio == pytest.approx(k / width, abs=1e-12)


def test_fat_zeroes_small_gate_scores_and_the_meter_counts_them(tiny):
    lm = tiny("llama", "float64")
    batch = pad(encode(lm.tokenizer, TEXTS[:2]), lm.tokenizer)
    scores, inputs, meter = _run_capturing(lm, "fat", 0.05, batch)
    skipped = []
    for layer, h in inputs.items():
        small = scores[layer].abs() < 0.05
        assert torch.equal(h == 0, small)
        skipped.append(small.double().mean())
    assert meter.layer_sparsity.tolist() == pytest.approx(torch.stack(skipped).tolist(), abs=1e-12)


def test_relu_zero_threshold_is_free_on_a_relu_model(tiny):
    lm = tiny("opt", "float64")  # OPT's FFN is ReLU: skipping exact zeros changes nothing
    batch = pad(encode(lm.tokenizer, TEXTS[:1]), lm.tokenizer)
    bare = lm.model(input_ids=batch.input_ids).logits
    scores, inputs, meter = _run_capturing(lm, "relu", None, batch)
    with sparsified(lm.model, "relu"):
        assert torch.equal(lm.model(input_ids=batch.input_ids).logits, bare)
    zeros = torch.stack([(h == 0).double().mean() for h in inputs.values()])
    assert 0.2 < float(zeros.mean()) < 0.8
    assert meter.layer_sparsity.tolist() == pytest.approx(zeros.tolist(), abs=1e-12)


def test_cett_thresholds_are_applied_on_the_neuron_norms(tiny):
    lm = tiny("llama", "float64")
    batch = pad(encode(lm.tokenizer, TEXTS[:1]), lm.tokenizer)
    layers = ffn_layers(lm.model)
    thresholds = cett_thresholds(lm, batch.input_ids, 0.3)
    _, inputs, meter = _run_capturing(lm, "cett", thresholds, batch)
    _, dense, _ = _run_capturing(lm, "cett", torch.zeros(len(layers)), batch)
    for f in layers:
        norms = dense[f.index].abs() * f.down_columns().norm(dim=1)
        if f.index == 0:  # upstream of the first layer nothing changed, so the skip set is exactly ‖n_i‖ < t
            assert torch.equal(inputs[0] == 0, norms < thresholds[0])
    assert 0.0 < meter.activation_ratio < 1.0


def _greedy_windows(model, n: int, length: int) -> torch.Tensor:
    """Windows the model itself wrote greedily: the dense model predicts them best, so sparsity costs loss."""
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.ones(n, 1, dtype=torch.long), torch.randint(3, 259, (n, 1), generator=g)], 1)
    while ids.shape[1] < length:
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_ppl_p_lands_within_tolerance(model_type):
    lm = load_model(f"tiny:{model_type}", device="cpu", dtype="float64")  # a private copy: weights are edited
    for f in ffn_layers(lm.model):
        f.down.weight.mul_(10.0)  # make the FFNs matter, so sparsifying them moves the loss
    with torch.no_grad():
        windows = _greedy_windows(lm.model, 4, 32)
    for p in [1.0, 3.0]:
        result = ppl_p(lm, windows, p=p, tol=1e-3, batch_size=2)
        assert result.converged and abs(result.ppl_ratio - (1 + p / 100)) <= 1e-3
        assert result.ppl_ratio == pytest.approx(math.exp(result.sparse_loss - result.dense_loss), rel=1e-12)
        assert 0.0 < result.activation_ratio < 1.0
        assert result.activation_ratio == pytest.approx(1 - float(result.layer_sparsity.mean()), abs=1e-12)
        assert result.thresholds.shape == (3,) and result.trace[-1]["cett"] == result.cett


@pytest.mark.parametrize("model_type", ["llama", "gemma", "opt"])
def test_one_shared_dense_pass_gives_the_losses_of_the_plain_path(tiny, model_type):
    """Thresholds searched on the kept dense activations (and the dense loss and |s| sample of the same pass)
    equal the plain path: a dense pass per batch and evaluation (cett_thresholds), the loss from window_loss."""
    lm = tiny(model_type)
    ids = windows(lm.tokenizer, TEXTS, 10, 5)
    assert ids.shape[0] == 5
    shared = SparseEvaluator(lm, ids, batch_size=2, groups=[3, 2])
    plain = SparseEvaluator(lm, ids, batch_size=2, groups=[3, 2], keep_activations=False)
    assert shared.dense.nll == pytest.approx(window_loss(lm.model, ids, batch_size=2).nll, rel=1e-6)
    for c in (0.05, 0.3):  # the second c starts from the first one's memoised search points
        a, b = shared.evaluate("cett", c), plain.evaluate("cett", c)
        assert torch.equal(a.window_nll, b.window_nll) and torch.equal(a.thresholds, b.thresholds)
        assert torch.equal(a.window_active, b.window_active) and a.activation_ratio == b.activation_ratio
        for _, start, stop in shared.batches:  # each batch's thresholds are those of its own dense pass
            fresh = cett_thresholds(lm, ids[start:stop], c)
            assert torch.equal(shared._thresholds(ids[start:stop], start, shared._mask(ids[start:stop]), c), fresh)
    top = shared.evaluate("topk", 0.5)
    assert top.window_active.sum(1).tolist() == pytest.approx(
        [int(shared._mask(w[None]).sum()) * sum(round(0.5 * f.width) for f in shared.layers) for w in ids])
    assert [len(f[0]) for f in top.group_frequency] == [shared.layers[0].width] * 2


def test_batches_never_cross_a_group():
    assert batch_ranges(7, 2, [3, 4]) == [(0, 0, 2), (0, 2, 3), (1, 3, 5), (1, 5, 7)]
    assert batch_ranges(5, 4) == [(0, 0, 4), (0, 4, 5)]
    with pytest.raises(BabelError, match="summing to the 6 windows"):
        batch_ranges(6, 2, [3, 4])


def test_bad_input_raises_clear_errors(tiny):
    lm = tiny("llama")
    with pytest.raises(BabelError, match="unknown sparsity method"):
        with sparsified(lm.model, "magnitude", 0.1):
            pass
    with pytest.raises(BabelError, match="one threshold per layer"):
        with sparsified(lm.model, "cett", torch.zeros(2)):
            pass
    with pytest.raises(BabelError, match="kept fraction"):
        with sparsified(lm.model, "topk", 3):
            pass
    with pytest.raises(BabelError, match="outside"):
        layer_thresholds(torch.ones(2, 4), torch.ones(4, 3), [1.5])
    with pytest.raises(BabelError, match="LongTensor"):
        ppl_p(lm, torch.zeros(2, 8))
