"""The FFN adapter and hooks: every supported family, on tiny random models built from a config."""

from __future__ import annotations

import pytest
import torch
from samples import TEXTS

from babel_lib.core.batches import encode, pad
from babel_lib.errors import BabelError
from babel_lib.core.ffn import ARCHITECTURES, ffn_layers
from babel_lib.core.hooks import hooked, site
from babel_lib.core.tiny import TINY_TYPES


def test_every_adapter_has_a_tiny_model():
    assert set(TINY_TYPES) == set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_hook_post_is_the_neuron_activation_and_hooks_change_nothing(tiny, model_type):
    lm = tiny(model_type, "float64")
    batch = pad(encode(lm.tokenizer, TEXTS), lm.tokenizer)
    layers = ffn_layers(lm.model)
    inputs, posts = {}, {}
    handles = [f.up.register_forward_pre_hook(lambda m, a, i=f.index: inputs.__setitem__(i, a[0])) for f in layers]
    try:
        bare = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        hooks = {site(f.index, "mlp.hook_post"): (lambda a, i=f.index: posts.__setitem__(i, a)) for f in layers}
        hooks |= {site(f.index, "hook_resid_post"): (lambda h: None) for f in layers}
        with hooked(lm.model, hooks):
            observed = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(bare, observed)
    for f in layers:
        # the reference activation computed from the FFN input equals what the down projection receives
        torch.testing.assert_close(f.activation(inputs[f.index]), posts[f.index], rtol=1e-12, atol=1e-12)
        assert posts[f.index].shape[-1] == f.width == 48
    # every hook came off
    assert all(not f.down._forward_pre_hooks and not f.block._forward_hooks for f in layers)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3", "opt"])
def test_hook_can_replace_and_is_removed_on_error(tiny, model_type):
    lm = tiny(model_type)
    ids = torch.tensor([encode(lm.tokenizer, ["hello"])[0]])
    bare = lm.model(ids).logits
    with hooked(lm.model, {site(0, "mlp.hook_post"): torch.zeros_like}):
        zeroed = lm.model(ids).logits
    assert not torch.equal(bare, zeroed)
    with pytest.raises(RuntimeError, match="boom"):
        with hooked(lm.model, {site(0, "mlp.hook_post"): lambda a: (_ for _ in ()).throw(RuntimeError("boom"))}):
            lm.model(ids)
    assert torch.equal(lm.model(ids).logits, bare)


def test_gate_site_is_the_activation_function_output(tiny):
    lm = tiny("llama", "float64")
    ids = torch.tensor([encode(lm.tokenizer, ["gate"])[0]])
    seen = {}
    ffn = ffn_layers(lm.model)[1]
    handle = ffn.mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    try:
        with hooked(lm.model, {site(1, "mlp.hook_gate"): lambda s: seen.__setitem__("s", s)}):
            lm.model(ids)
    finally:
        handle.remove()
    gate, _ = ffn.input_rows()
    torch.testing.assert_close(seen["s"], ffn.act(seen["x"] @ gate.T))


def test_unknown_site_and_unsupported_architecture(tiny):
    lm = tiny("llama")
    with pytest.raises(BabelError, match="unknown activation site"):
        with hooked(lm.model, {"blocks.99.mlp.hook_post": print}):
            pass
    import transformers as tf

    bert = tf.BertForMaskedLM(tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32))
    with pytest.raises(BabelError, match=r"BertForMaskedLM \(model_type 'bert'\) has no FFN adapter.*babel_lib/core/ffn.py"):
        ffn_layers(bert)
