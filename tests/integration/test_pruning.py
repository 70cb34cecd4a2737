"""Pruning kernels on tiny random models of every supported family: masks, slices, reloads, dynamic top-k."""

from __future__ import annotations

import pytest
import torch
from samples import TEXTS

from babel_lib.babel.moe import ExpertMap
from babel_lib.babel.pruning import (Frequencies, adaptive_counts, dynamic, frequency_keep, load_sliced, masked,
                                     random_keep, sliced, uniform_counts)
from babel_lib.core.batches import encode, pad
from babel_lib.core.ffn import ffn_layers
from babel_lib.core.hooks import hooked, site
from babel_lib.core.tiny import LAYERS, TINY_TYPES, WIDTH
from babel_lib.errors import BabelError

N_EXPERTS = 8


def expert_map(seed: int = 0) -> ExpertMap:
    gen = torch.Generator().manual_seed(seed)
    return ExpertMap(torch.stack([torch.randperm(WIDTH, generator=gen) % N_EXPERTS for _ in range(LAYERS)]),
                     N_EXPERTS)


def logits(model, lm):
    batch = pad(encode(lm.tokenizer, TEXTS), lm.tokenizer)
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def skewed_keep(rate: float, seed: int = 0) -> torch.Tensor:
    """A frequency-guided keep mask with per-layer counts (adaptive) from random skewed frequencies."""
    gen = torch.Generator().manual_seed(seed)
    freq = torch.rand(LAYERS, N_EXPERTS, generator=gen) ** torch.tensor([[1.0], [4.0], [8.0]])
    return frequency_keep(freq, adaptive_counts(freq, rate))


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_zero_rate_is_the_dense_model_exactly(tiny, model_type):
    lm = tiny(model_type)
    experts, keep = expert_map(), torch.ones(LAYERS, N_EXPERTS, dtype=torch.bool)
    dense = logits(lm.model, lm)
    with masked(lm.model, experts, keep):
        assert torch.equal(logits(lm.model, lm), dense)
    assert torch.equal(logits(sliced(lm.model, experts, keep), lm), dense)


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_masked_and_sliced_agree_uniform_and_per_layer(tiny, model_type):
    lm = tiny(model_type)
    experts = expert_map(1)
    dense = logits(lm.model, lm)
    for keep in (random_keep(uniform_counts(0.5, LAYERS, N_EXPERTS), N_EXPERTS, seed=3), skewed_keep(0.5)):
        with masked(lm.model, experts, keep):
            reference = logits(lm.model, lm)
        small = sliced(lm.model, experts, keep, align=1)
        widths = [f.width for f in ffn_layers(small)]
        assert widths == [int(keep[i].sum()) * WIDTH // N_EXPERTS for i in range(LAYERS)]
        assert (logits(small, lm) - reference).abs().max() <= 1e-5
        assert (reference - dense).abs().max() > 1e-3  # the pruning does something
    assert torch.equal(logits(lm.model, lm), dense)  # the original is untouched, its hooks are off


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_uniform_slice_reloads_with_plain_transformers(tiny, model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = tiny(model_type)
    keep = random_keep(uniform_counts(0.25, LAYERS, N_EXPERTS), N_EXPERTS, seed=0)
    small = sliced(lm.model, expert_map(), keep, align=1)
    small.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert [f.width for f in ffn_layers(again)] == [WIDTH * 3 // 4] * LAYERS
    assert torch.equal(logits(again, lm), logits(small, lm))


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2", "opt", "gemma3_text"])
def test_per_layer_slice_needs_and_reloads_with_babel_loader(tiny, model_type, tmp_path):
    lm = tiny(model_type)
    small = sliced(lm.model, expert_map(), skewed_keep(0.5), align=1)
    assert len({f.width for f in ffn_layers(small)}) > 1
    small.save_pretrained(tmp_path)
    again = load_sliced(tmp_path)
    assert [f.width for f in ffn_layers(again)] == [f.width for f in ffn_layers(small)]
    assert torch.equal(logits(again, lm), logits(small, lm))


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2", "opt", "gemma3_text"])
def test_sliced_widths_are_padded_with_zero_neurons(tiny, model_type, tmp_path):
    """align=16: every layer's width rounds up to a multiple of 16 (or d_ff) with neurons that add exactly nothing."""
    lm = tiny(model_type)
    experts, keep = expert_map(2), skewed_keep(0.5)
    with masked(lm.model, experts, keep):
        reference = logits(lm.model, lm)
    small = sliced(lm.model, experts, keep, align=16)
    kept = [int(keep[i].sum()) * WIDTH // N_EXPERTS for i in range(LAYERS)]
    assert [f.width for f in ffn_layers(small)] == [min(-(-k // 16) * 16, WIDTH) for k in kept]
    assert any(k % 16 for k in kept)  # some layer really is padded
    for f, k in zip(ffn_layers(small), kept):
        assert not f.down_columns()[k:].any()
    assert (logits(small, lm) - reference).abs().max() <= 1e-5
    small.save_pretrained(tmp_path)
    assert torch.equal(logits(load_sliced(tmp_path), lm), logits(small, lm))


def brute_force_top_k(experts: ExpertMap, k: int, mode: str):
    """Per token, sum each expert's neuron activations (or their absolute values) one by one, sort, and zero every
    neuron outside the top k."""
    f = abs if mode == "abs" else (lambda x: x)
    def hook(layer: int):
        def apply(a):
            flat = a.reshape(-1, a.shape[-1]).clone()
            labels = experts.labels[layer]
            for t in range(flat.shape[0]):
                scores = [float(sum(f(flat[t, i]) for i in range(flat.shape[1]) if labels[i] == e))
                          for e in range(experts.n_experts)]
                top = sorted(range(experts.n_experts), key=lambda e: -scores[e])[:k]
                for i in range(flat.shape[1]):
                    if int(labels[i]) not in top:
                        flat[t, i] = 0
            return flat.reshape(a.shape)
        return apply
    return {site(layer, "mlp.hook_post"): hook(layer) for layer in range(experts.n_layers)}


@pytest.mark.parametrize("mode", ["sum", "abs"])
@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2", "opt"])
def test_dynamic_top_k_equals_a_per_token_brute_force(tiny, model_type, mode):
    lm = tiny(model_type, "float64")
    experts = expert_map(2)
    batch = pad(encode(lm.tokenizer, TEXTS[:2]), lm.tokenizer)
    run = lambda: lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # noqa: E731
    with torch.no_grad():
        with dynamic(lm.model, experts, 0.25, mode):
            fast = run()
        with hooked(lm.model, brute_force_top_k(experts, 2, mode)):
            slow = run()
        dense = run()
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    assert (fast - dense).abs().max() > 1e-6


def test_random_masks_are_reproducible_and_follow_the_counts():
    counts = torch.tensor([0, 3, 7])
    a, b, c = (random_keep(counts, N_EXPERTS, seed) for seed in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (~a).sum(1).tolist() == [0, 3, 7]


def test_bad_input_is_one_line_error(tiny):
    lm = tiny("llama")
    experts = expert_map()
    freqs = Frequencies(("en", "de"), torch.rand(2, LAYERS, N_EXPERTS), {"n_experts": N_EXPERTS, "seed": 0})
    with pytest.raises(BabelError, match=r"no frequencies for language 'fr'.*notebook 02") as info:
        freqs.of("fr")
    assert "\n" not in str(info.value)
    for rate in (-0.1, 1.0, 1.5):
        with pytest.raises(BabelError, match=r"outside \[0, 1\)"):
            uniform_counts(rate, LAYERS, N_EXPERTS)
    with pytest.raises(BabelError, match="another partition.*rerun notebook 02"):
        freqs.check(experts, {"n_experts": N_EXPERTS, "seed": 1})
    freqs.check(experts, {"n_experts": N_EXPERTS, "seed": 0})
    with pytest.raises(BabelError, match="keep mask is"):
        with masked(lm.model, experts, torch.ones(LAYERS, 4, dtype=torch.bool)):
            pass
    with pytest.raises(BabelError, match="active ratio"):
        with dynamic(lm.model, experts, 0.0):
            pass


def test_prune_study_on_a_tiny_model(tiny, tmp_path):
    from babel_lib.babel.pruning_study import PruneParams, prune
    from babel_lib.core.artefacts import ArtefactStore

    lm, experts, partition = tiny("llama"), expert_map(), {"n_experts": N_EXPERTS, "seed": 0}
    freqs = Frequencies(("en", "ja", "de"), torch.rand(3, LAYERS, N_EXPERTS, generator=torch.Generator().manual_seed(0)),
                        partition)
    heldout = {"en": [TEXTS[0]] * 4, "ja": [TEXTS[2]] * 4}
    params = PruneParams(eval_languages=("en", "ja"), rates=(0.0, 0.5), random_seeds=2, cross_rate=0.5,
                         active_ratios=(1.0, 0.5), seq_len=16, windows_per_language=2)
    store = ArtefactStore(tmp_path)
    r = prune(store, lm, experts, freqs, partition, heldout, params)
    import numpy as np
    assert np.array_equal(r.frequency[0], r.dense) and np.array_equal(r.random[0, 0], r.dense)
    assert np.array_equal(r.dynamic[0], r.dense)  # every expert active
    assert np.array_equal(np.diag(r.cross), r.frequency[1])
    assert (r.random[1] > r.dense).any() and r.tokens == [30, 30]
    assert len(list((tmp_path / "pruning").glob("*.safetensors"))) == 1
    again = prune(store, lm, experts, freqs, partition, heldout, params)
    assert np.array_equal(again.cross, r.cross)
    with pytest.raises(BabelError, match="no frequencies for language 'fr'"):
        prune(store, lm, experts, freqs, partition, {"fr": ["x"]}, params.replace(eval_languages=("fr",)))
