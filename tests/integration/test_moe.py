"""The converted MoE: expert scores against brute force, and the converted model equals the dense one."""

from __future__ import annotations

import pytest
import torch
from samples import TEXTS

from babel_lib.core.batches import encode, pad
from babel_lib.babel.conversion import equivalence, partition_model
from babel_lib.errors import BabelError
from babel_lib.babel.moe import ExpertMap, routed
from babel_lib.babel.partition import expert_sizes
from babel_lib.core.tiny import TINY_TYPES


def _random_labels(width: int, n_experts: int, layers: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.repeat_interleave(torch.arange(n_experts), expert_sizes(width, n_experts))
    return torch.stack([base[torch.randperm(width, generator=g)] for _ in range(layers)])


@pytest.mark.parametrize("mode", ["sum", "abs", "pos"])
def test_scores_equal_brute_force(mode):
    labels = _random_labels(50, 8, 2)
    experts = ExpertMap(labels, 8)
    a = torch.randn(5, 50, dtype=torch.float64)
    got = experts.scores(1, a, mode)
    f = {"sum": lambda v: v, "abs": abs, "pos": lambda v: max(v, 0.0)}[mode]
    for t in range(5):
        for e in range(8):
            ref = sum(f(a[t, i].item()) for i in range(50) if labels[1, i] == e)
            assert abs(got[t, e].item() - ref) < 1e-5
    assert torch.equal(experts.expand(1, torch.arange(8.0))[labels[1] == 3], torch.full((int((labels[1] == 3).sum()),), 3.0))


def test_unbalanced_or_mismatched_partitions_are_refused():
    labels = _random_labels(48, 4, 3)
    labels[0, 0] = (labels[0, 0] + 1) % 4
    with pytest.raises(BabelError, match="not balanced"):
        ExpertMap(labels, 4)
    with pytest.raises(BabelError, match="another model"):
        ExpertMap(_random_labels(48, 4, 3), 4).check_model(2, 48)


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_converted_tiny_model_reproduces_dense_logits(tiny, model_type):
    lm = tiny(model_type)
    experts = partition_model(lm, n_experts=8, method="kmeans", iters=5)
    batch = pad(encode(lm.tokenizer, TEXTS), lm.tokenizer)
    check = equivalence(lm, experts, [batch])
    assert check["all_experts"] <= 1e-5
    assert check["dropped"] > 1e-4  # the control: routing really acts on the model


def test_top1_routing_keeps_only_the_best_expert(tiny):
    lm = tiny("llama", "float64")
    experts = partition_model(lm, n_experts=6, method="random")
    seen = []
    ids = torch.tensor([encode(lm.tokenizer, ["route me"])[0]])

    def top1(layer, scores):
        gates = torch.zeros_like(scores)
        gates.scatter_(1, scores.argmax(1, keepdim=True), 1.0)
        return gates

    def record(a):
        seen.append(a.reshape(-1, a.shape[-1]).clone())

    from babel_lib.core.hooks import hooked, site

    with routed(lm.model, experts, top1), hooked(lm.model, {site(0, "mlp.hook_post"): record}):
        lm.model(ids)
    # the recording hook ran after routing: per token only one expert's neurons are non-zero
    active = (seen[0] != 0).double() @ experts.onehot(0, "cpu").double()
    assert ((active > 0).sum(1) == 1).all()


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma-3-270m"])
def test_converted_embedded_model_reproduces_dense_logits(embedded, alias):
    lm = embedded(alias)
    experts = partition_model(lm, n_experts=64, method="random")
    batch = pad(encode(lm.tokenizer, TEXTS), lm.tokenizer)
    check = equivalence(lm, experts, [batch])
    assert check["all_experts"] <= 1e-5 and check["dropped"] > 1e-3


def test_too_many_experts_is_a_clear_error(tiny):
    with pytest.raises(BabelError, match=r"n_experts=49 is larger than the FFN width 48; choose at most 48"):
        partition_model(tiny("llama"), n_experts=49, method="contiguous")


def test_routed_perplexity_at_every_expert_equals_dense_and_top_k_beats_nothing(tiny, tmp_path):
    from babel_lib.babel.conversion import ConvertParams, convert, routed_perplexity
    from babel_lib.core.artefacts import ArtefactStore

    lm = tiny("llama")
    params = ConvertParams(n_experts=8, kmeans_iters=3, baselines=("random",), routed_fractions=(0.5, 1.0),
                           routed_seq_len=16)
    conversion = convert(ArtefactStore(tmp_path), {lm.name: lm}, params, languages=["en", "de"])
    assert conversion.partitions[lm.name].path.exists() and len(conversion.findings()) == 1
    routed = routed_perplexity({lm.name: lm}, conversion, params, ["en", "de"], paragraphs=8)
    losses = routed.losses[lm.name]
    assert set(losses) == {"dense", "top 50%", "top 100%", "random 50%"} and routed.languages == ["en", "de"]
    assert torch.equal(losses["top 100%"], losses["dense"])  # every expert kept: the dense model exactly
    assert routed.ratio(lm.name, "top 100%") == (1.0, 0.0)
    assert not torch.equal(losses["top 50%"], losses["dense"])
    assert "top 50%" in routed.findings()[0]
