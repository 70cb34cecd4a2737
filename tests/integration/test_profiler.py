"""The expert profiler: counts equal a token-by-token float64 reference, special tokens never count, and a
hooked model computes exactly what the bare model computes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from samples import TEXTS

from babel_lib.babel.analysis import compare_variants, frequencies
from babel_lib.core.artefacts import ArtefactStore
from babel_lib.core.batches import encode, pad
from babel_lib.babel.conversion import partition_model
from babel_lib.errors import BabelError
from babel_lib.core.ffn import ffn_layers
from babel_lib.babel.moe import ExpertMap
from babel_lib.babel.conversion import PartitionParams, partition
from babel_lib.babel.profiler import ExpertProfiler, ProfileParams, profile, profile_languages, variant_key

N_EXPERTS = 8


@pytest.fixture
def setup(tiny):
    lm = tiny("llama", "float64")
    return lm, partition_model(lm, N_EXPERTS, "random", seed=3)


def reference_activations(lm, batch) -> list[torch.Tensor]:
    """Per layer, a [tokens, d_ff] from the FFN's reference path (FFN.activation on the captured FFN input)."""
    layers = ffn_layers(lm.model)
    inputs = {}
    handles = [f.up.register_forward_pre_hook(lambda m, a, i=f.index: inputs.__setitem__(i, a[0])) for f in layers]
    try:
        lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for h in handles:
            h.remove()
    return [f.activation(inputs[f.index]).reshape(-1, f.width) for f in layers]


def brute_force(acts, labels, mask, rule, mode, k, threshold, n_experts=N_EXPERTS, scale=1.0):
    """Expert and neuron counts, one token at a time, in Python float64 arithmetic. A neuron is active when
    |a_i| > scale x sqrt(mean of a^2 over the token's layer)."""
    f = {"sum": lambda v: v, "abs": abs, "pos": lambda v: max(v, 0.0)}[mode]
    n_layers, width = len(labels), len(labels[0])
    N_EXPERTS = n_experts
    experts = [[0] * N_EXPERTS for _ in range(n_layers)]
    neurons = [[0] * width for _ in range(n_layers)]
    tokens = 0
    for t in range(len(mask)):
        if not mask[t]:
            continue
        tokens += 1
        scores = []
        for layer in range(n_layers):
            a = acts[layer][t].tolist()
            s = [0.0] * N_EXPERTS
            rms = math.sqrt(sum(v * v for v in a) / width)
            for i in range(width):
                s[labels[layer][i]] += f(a[i])
                neurons[layer][i] += abs(a[i]) > scale * rms
            scores.append(s)
        if rule == "zscore":
            z = []
            for s in scores:
                mean = sum(s) / N_EXPERTS
                std = math.sqrt(sum((v - mean) ** 2 for v in s) / N_EXPERTS)
                z.append([(v - mean) / std for v in s])
            kth = sorted((v for row in z for v in row), reverse=True)[k - 1]
            chosen = [[v >= kth for v in row] for row in z]
        elif rule == "topk":
            chosen = [[v >= sorted(s, reverse=True)[k - 1] for v in s] for s in scores]
        else:
            chosen = [[v > threshold for v in s] for s in scores]
        for layer in range(n_layers):
            for e in range(N_EXPERTS):
                experts[layer][e] += chosen[layer][e]
    return torch.tensor(experts), torch.tensor(neurons), tokens


@pytest.mark.parametrize("scorer", ["index_add", "matmul"])
@pytest.mark.parametrize("mode", ["sum", "abs", "pos"])
@pytest.mark.parametrize("rule", ["topk", "zscore", "threshold"])
def test_counts_equal_a_float64_brute_force_reference(setup, rule, mode, scorer):
    lm, experts = setup
    batch = pad(encode(lm.tokenizer, TEXTS), lm.tokenizer)
    acts = reference_activations(lm, batch)
    mask = batch.count_mask.reshape(-1).tolist()
    labels = experts.labels.tolist()
    # threshold: the median score of the counted tokens, so the rule splits them
    threshold = float(torch.cat([experts.scores(layer, a.abs() if mode == "abs" else a.clamp_min(0) if mode == "pos"
                                                else a).reshape(-1) for layer, a in enumerate(acts)]).median())
    ratio = 0.3
    with ExpertProfiler(lm, experts, n_groups=2, rule=rule, ratio=ratio, threshold=threshold, mode=mode,
                        scorer=scorer) as prof:
        prof.count(batch, group=1)
    k = round(ratio * N_EXPERTS * (experts.n_layers if rule == "zscore" else 1))
    ref_experts, ref_neurons, ref_tokens = brute_force(acts, labels, mask, rule, mode, k, threshold)
    assert torch.equal(prof.expert_counts[1], ref_experts)
    assert torch.equal(prof.neuron_counts[1], ref_neurons)
    assert prof.tokens.tolist() == [0, ref_tokens]
    assert not prof.expert_counts[0].any() and not prof.neuron_counts[0].any()
    # the rule really selects: neither nothing nor everything
    assert 0 < int(ref_experts.sum()) < ref_tokens * experts.n_layers * N_EXPERTS
    if rule == "topk":
        assert (prof.expert_counts[1].sum(1) >= k * ref_tokens).all()
    if rule == "zscore":
        assert int(prof.expert_counts[1].sum()) >= k * ref_tokens


def test_several_maps_and_countings_from_one_forward_equal_brute_force(setup):
    """One pass with two partitions (8 and 3 experts) and four (rule, mode) countings counts, for each, exactly
    what the float64 reference counts for it alone; neurons under a magnitude scale of 0.5."""
    lm, experts = setup
    coarse = partition_model(lm, 3, "random", seed=5)
    batch = pad(encode(lm.tokenizer, TEXTS), lm.tokenizer)
    acts = reference_activations(lm, batch)
    mask = batch.count_mask.reshape(-1).tolist()
    variants = [("zscore", "sum"), ("topk", "abs"), ("zscore", "abs")]
    ratio = 0.4
    with ExpertProfiler(lm, [experts, coarse], rule="topk", mode="sum", ratio=ratio, variants=variants,
                        neuron_scale=0.5) as prof:
        prof.count(batch, 0)
    assert set(prof.counts) == {(i, r, m) for i in (0, 1) for r, m in [("topk", "sum"), *variants]}
    assert prof.expert_counts is prof.counts[0, "topk", "sum"]
    for (i, rule, mode), counts in prof.counts.items():
        em = (experts, coarse)[i]
        k = round(ratio * em.n_experts * (em.n_layers if rule == "zscore" else 1))
        ref, ref_neurons, _ = brute_force(acts, em.labels.tolist(), mask, rule, mode, k, 0.0, em.n_experts, 0.5)
        assert torch.equal(counts[0], ref), (i, rule, mode)
    assert torch.equal(prof.neuron_counts[0], ref_neurons)
    # the magnitude rule is no coin flip: at scale 0.5 most neurons pass on a token, at 2 few do
    tokens = int(prof.tokens[0])
    with ExpertProfiler(lm, experts, neuron_scale=2.0) as strict:
        strict.count(batch, 0)
    assert float(strict.neuron_counts.sum()) < 0.5 * float(prof.neuron_counts.sum()) <= tokens * 48 * 3


@pytest.mark.parametrize("rule", ["topk", "threshold", "zscore"])
def test_compiled_counting_equals_eager(setup, rule):
    """compile=True (the fused path meant for CUDA) counts exactly what the eager path counts."""
    lm, experts = setup
    batch = pad(encode(lm.tokenizer, TEXTS), lm.tokenizer)
    counts = []
    for compiled in (False, True):
        with ExpertProfiler(lm, experts, rule=rule, threshold=0.0, compile=compiled) as prof:
            prof.count(batch, 0)
        counts.append((prof.expert_counts, prof.neuron_counts, prof.tokens))
    for eager, fused in zip(*counts):
        assert torch.equal(eager, fused)
    assert int(counts[0][0].sum()) > 0


def test_special_tokens_and_padding_never_count(setup):
    lm, experts = setup
    together = pad(encode(lm.tokenizer, TEXTS), lm.tokenizer)  # BOS on every row, padding on the short ones
    assert together.input_ids[:, 0].eq(lm.tokenizer.bos_token_id).all() and not together.attention_mask.all()
    with ExpertProfiler(lm, experts, n_groups=2) as prof:
        prof.count(together, 0)
        for text in TEXTS:  # one row each: no padding at all
            prof.count(pad(encode(lm.tokenizer, [text]), lm.tokenizer), 1)
    text_tokens = sum(len(t.encode()) for t in TEXTS)  # byte tokenizer: one token per byte, BOS excluded
    assert prof.tokens.tolist() == [text_tokens, text_tokens]
    assert torch.equal(prof.expert_counts[0], prof.expert_counts[1])
    assert torch.equal(prof.neuron_counts[0], prof.neuron_counts[1])
    k = round(0.25 * N_EXPERTS)
    assert (prof.expert_counts[0].sum(1) == k * text_tokens).all()  # float64: no ties at the k-th score


def test_hooked_model_returns_exactly_the_bare_output_and_hooks_come_off(setup):
    lm, experts = setup
    batch = pad(encode(lm.tokenizer, TEXTS), lm.tokenizer)
    bare = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    for rule in ("topk", "zscore"):
        with ExpertProfiler(lm, experts, rule=rule) as prof:
            prof.set_batch(batch.count_mask, 0)
            hooked = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        assert torch.equal(bare, hooked)
        assert int(prof.tokens[0]) == batch.n_tokens
    layers = ffn_layers(lm.model)
    assert all(not f.down._forward_pre_hooks for f in layers)
    with pytest.raises(RuntimeError, match="boom"):
        with ExpertProfiler(lm, experts) as prof:
            prof.count(batch, 0)
            raise RuntimeError("boom")
    assert all(not f.down._forward_pre_hooks for f in layers)
    assert torch.equal(lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, bare)


def test_bad_arguments_raise_one_line_errors(setup):
    lm, experts = setup
    batch = pad(encode(lm.tokenizer, TEXTS), lm.tokenizer)
    with pytest.raises(BabelError, match="unknown activation rule"):
        ExpertProfiler(lm, experts, rule="top")
    with pytest.raises(BabelError, match="unknown scorer"):
        ExpertProfiler(lm, experts, scorer="gather")
    with pytest.raises(BabelError, match="unknown score mode"):
        ExpertProfiler(lm, experts, mode="max")
    with pytest.raises(BabelError, match="unknown activation rule 'top'"):
        ExpertProfiler(lm, experts, variants=[("top", "sum")])
    with pytest.raises(BabelError, match="same layers and width"):
        ExpertProfiler(lm, [experts, ExpertMap(experts.labels[:2], N_EXPERTS)])
    with pytest.raises(BabelError, match="ratio=0.01 selects 0 of 8"):
        ExpertProfiler(lm, experts, ratio=0.01)
    with pytest.raises(BabelError, match="another model"):
        ExpertProfiler(lm, ExpertMap(experts.labels[:2], N_EXPERTS)).__enter__()
    with ExpertProfiler(lm, experts, n_groups=2) as prof:
        with pytest.raises(BabelError, match="outside 0..1"):
            prof.count(batch, 2)
        with pytest.raises(BabelError, match="no batch"):
            lm.model(input_ids=batch.input_ids)
        prof.set_batch(batch.count_mask[:1], 0)
        with pytest.raises(BabelError, match="count mask has"):
            lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    with pytest.raises(BabelError, match="inside `with"):
        prof.count(batch, 0)


def test_profile_languages_splits_halves_and_sums_them(setup):
    lm, experts = setup
    texts = {"a": TEXTS, "b": TEXTS[::-1] + ["Noch ein Absatz."]}
    out = profile_languages(lm, experts, texts, progress=False)
    assert out["expert_counts"].shape == (2, 3, N_EXPERTS) and out["neuron_counts"].shape == (2, 3, 48)
    assert torch.equal(out["expert_counts_halves"].sum(0), out["expert_counts"])
    assert torch.equal(out["tokens_halves"].sum(0), out["tokens"])
    even = sum(len(t.encode()) for t in TEXTS[0::2])
    assert out["tokens_halves"][:, 0].tolist() == [even, sum(len(t.encode()) for t in TEXTS) - even]
    with ExpertProfiler(lm, experts) as prof:  # half 0 of language a, counted on its own
        prof.count(pad(encode(lm.tokenizer, TEXTS[0::2]), lm.tokenizer), 0)
    assert torch.equal(out["expert_counts_halves"][0, 0], prof.expert_counts[0])
    with pytest.raises(BabelError, match="no counted token in one split half"):
        profile_languages(lm, experts, {"a": TEXTS[:1]}, progress=False)


def test_frequency_artefact_follows_the_contract(tiny, tmp_path):
    lm = tiny("llama", "float64")
    store = ArtefactStore(tmp_path)
    part = partition(store, lm, PartitionParams(n_experts=N_EXPERTS, method="random", seed=3))
    assert torch.equal(part.experts.labels, partition_model(lm, N_EXPERTS, "random", seed=3).labels)
    params = ProfileParams(ratio=0.5)
    texts = {"en": TEXTS[:2], "de": TEXTS[2:]}
    result = profile(store, lm, part, params, texts, split="calibration", progress=False)
    tensors, meta, path = result.tensors, result.meta, result.path
    assert path.exists() and path.suffix == ".safetensors"
    shapes = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    halves = (torch.int64, (2, 2, 3, N_EXPERTS))
    assert shapes == {"expert_counts": (torch.int64, (2, 3, N_EXPERTS)), "neuron_counts": (torch.int64, (2, 3, 48)),
                      "tokens": (torch.int64, (2,)), "expert_counts_halves": halves,
                      "tokens_halves": (torch.int64, (2, 2)), **{variant_key(r, m, N_EXPERTS): halves
                                                                 for r, m in params.countings()[1:]}}
    assert [c["tensor"] for c in meta["countings"]] == ["expert_counts_halves"] + [
        variant_key(r, m, N_EXPERTS) for r, m in params.countings()[1:]]
    for key, value in {"languages": ["en", "de"], "model": lm.name, "card": lm.card, "rule": "topk", "ratio": 0.5,
                       "mode": "sum", "n_experts": N_EXPERTS,
                       "neuron_rule": "|a_i| > 1 x RMS of the token's a over the layer's neurons"}.items():
        assert meta[key] == value
    assert [(c["rule"], c["mode"], c["n_experts"]) for c in meta["countings"]] == [
        ("topk", "sum", 8), ("zscore", "sum", 8), ("topk", "abs", 8), ("zscore", "abs", 8)]
    coarse = partition(store, lm, PartitionParams(n_experts=2, method="random", seed=3))
    both = profile(store, lm, [part, coarse], params, texts, split="calibration", progress=False)
    assert both.path != path and both.tensors[variant_key("zscore", "abs", 2)].shape == (2, 2, 3, 2)
    assert torch.equal(both.tensors["expert_counts"], tensors["expert_counts"])
    again = profile(store, lm, part, params, texts, split="calibration", progress=False)
    assert again.path == path and all(torch.equal(again.tensors[k], tensors[k]) for k in tensors)
    others = [profile(store, lm, part, params, {"en": TEXTS[:2], "de": TEXTS[1:]}, split="calibration"),
              profile(store, lm, part, params.replace(batch_tokens=64), texts, split="calibration"),
              profile(store, lm, partition(store, lm, PartitionParams(n_experts=N_EXPERTS, method="random", seed=4)),
                      params, texts, split="calibration")]
    assert len({o.path for o in others} | {path}) == 4  # other texts, setting or partition: another artefact


def test_instruction_tuning_path_on_two_tiny_models(tiny):
    """The notebook's base/instruct section: both variants profiled with the base model's partition, compared."""
    base, other = tiny("llama"), tiny("llama:1")
    experts = partition_model(base, N_EXPERTS, "random")
    texts = {"en": TEXTS[0::2] * 2, "de": TEXTS[1::2] * 2}
    profiles = {lm.name: profile_languages(lm, experts, texts, progress=False) for lm in (base, other)}
    freq = {name: frequencies(p["expert_counts"], p["tokens"]) for name, p in profiles.items()}
    same = compare_variants(freq[base.name], freq[base.name], tau_high=0.3)
    diff = compare_variants(freq[base.name], freq[other.name], tau_high=0.3)
    np.testing.assert_allclose(same["layer_correlation"], 1.0)
    assert same["mean_abs_difference"] == 0.0 and same["shared_jaccard"] == 1.0
    assert diff["mean_abs_difference"] > 0 and (diff["layer_correlation"] < 1).all()
    assert diff["layer_correlation"].shape == (3,)


def test_token_fragmentation_counts_text_tokens_only(tiny):
    """The tiny byte tokenizer: one token per UTF-8 byte, so Greek letters (2 bytes) take twice the tokens."""
    from babel_lib.babel.profiler import token_fragmentation

    lm = tiny("llama")
    f = token_fragmentation(lm.tokenizer, {"en": ["abc", "de"], "el": ["αβγ", "δε"]})
    assert f["tokens"].tolist() == [5, 10] and f["characters"].tolist() == [5, 5]
    assert f["ratio_to_reference"].tolist() == [1.0, 2.0] and f["tokens_per_character"].tolist() == [1.0, 2.0]
    assert token_fragmentation(lm.tokenizer, {"el": ["αβγ"]})["reference"] == "el"  # no English: the first
