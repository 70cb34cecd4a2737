"""Massive activations: the scan finds a planted one exactly, interventions touch only their targets."""

from __future__ import annotations

import math

import pytest
import torch

from babel_lib.core.batches import windows as token_windows
from babel_lib.core.hooks import hooked, site
from babel_lib.massive.attention import attention_mass, head_averaged_attention, uniform_mass
from babel_lib.massive.intervene import MassiveEdit, measure_means
from babel_lib.massive.locate import Target, locate, massive_entries, summarize, targets_from, token_kind
from babel_lib.massive.scan import median_abs, paragraph_windows, sample_index, scan_residuals, top_entries
from babel_lib.core.models import load_model, run_decoder
from babel_lib.errors import BabelError

from samples import TEXTS

LAYER, DIM, CARRIER, NEURON = 1, 5, 7, 11  # plant at block 1, residual dim 5, keyed on embedding dim 7
TEXT = " ".join(TEXTS * 3)


def planted(attn_implementation: str = "sdpa"):
    """tiny:llama in float64 whose block 1 writes ~1e4 into residual dim 5 at the BOS token, and nowhere else.

    The BOS embedding alone carries dim 7 (=1; every other token has 0 there) and nothing writes dim 7 before
    block 1's FFN, so the normalised FFN input has x7 = 1/rms (about 5.7) at BOS and exactly 0 elsewhere. One
    neuron reads only x7 (gate 10, up 1) and writes only dim 5 (x 32): silu(57) * 5.7 * 32 is about 1e4 at BOS,
    silu(0) * 0 = 0 elsewhere.
    """
    lm = load_model("tiny:llama", device="cpu", dtype="float64")
    model = lm.model
    model.set_attn_implementation(attn_implementation)  # load_model builds tiny models with the default (sdpa)
    bos = lm.tokenizer.bos_token_id
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, CARRIER] = 0.0
        emb[bos, CARRIER] = 1.0
        layers = model.model.layers
        for writer in (layers[0].self_attn.o_proj, layers[0].mlp.down_proj, layers[1].self_attn.o_proj):
            writer.weight[CARRIER] = 0.0
        mlp = layers[LAYER].mlp
        for proj, scale in ((mlp.gate_proj, 10.0), (mlp.up_proj, 1.0)):
            proj.weight[NEURON] = 0.0
            proj.weight[NEURON, CARRIER] = scale
        mlp.down_proj.weight[:, NEURON] = 0.0
        mlp.down_proj.weight[DIM, NEURON] = 32.0
    return lm


@pytest.fixture(scope="module")
def lm():
    return planted()


def residuals(model, ids):
    """Every block output [L, B, T, D] (brute-force reference)."""
    from babel_lib.core.ffn import decoder_layers

    out = {}
    hooks = {site(l, "hook_resid_post"): (lambda l: lambda h: out.__setitem__(l, h.detach().clone()))(l)
             for l in range(len(decoder_layers(model)))}
    with hooked(model, hooks), torch.no_grad():
        run_decoder(model, ids)
    return torch.stack([out[l] for l in sorted(out)])


def brute_massive(hidden, magnitude, ratio):
    """Set of (sequence, layer, dim, position) meeting the criterion, from full hidden states [L, B, T, D]."""
    size = hidden.abs()
    median = size.flatten(2).median(dim=2).values  # [L, B]
    hit = (size > magnitude) & (size >= ratio * median[..., None, None])
    return {(b, l, d, t) for l, b, t, d in hit.nonzero().tolist()}


def scanned_set(scan, magnitude, ratio):
    e = massive_entries(scan, magnitude, ratio)
    return set(zip(e.sequence.tolist(), e.layer.tolist(), e.dim.tolist(), e.position.tolist()))


def test_planted_activation_is_found_exactly(lm):
    ids = token_windows(lm.tokenizer, [TEXT], seq_len=24, n_windows=3, add_bos=True)
    scan = scan_residuals(lm.model, ids, batch_size=2)
    found = locate(scan, lm.tokenizer)
    assert [(m.dim, m.position, m.kind, m.first_layer, m.last_layer) for m in found] == \
        [(DIM, 0, "start", LAYER, 2)] * 3
    assert all(m.peak > 5e3 for m in found)
    assert scanned_set(scan, 100, 1000) == brute_massive(residuals(lm.model, ids), 100, 1000)
    summary = summarize(scan, found)
    assert [(r["dim"], r["first_layer"], r["last_layer"], r["start"], r["sequences"]) for r in summary] == \
        [(DIM, LAYER, 2, 3, 1.0)]
    assert summary[0]["positions_per_sequence"] == 1.0
    assert targets_from(summary) == [Target(DIM, LAYER, 2)]


def test_without_bos_there_is_none(lm):
    ids = token_windows(lm.tokenizer, [TEXT], seq_len=24, n_windows=2, add_bos=False)
    assert locate(scan_residuals(lm.model, ids), lm.tokenizer) == []


@pytest.mark.parametrize("magnitude, ratio", [(100, 1000), (2e4, 1), (1e-3, 1e9), (1.0, 2.0), (0.05, 3.0)])
def test_thresholds_match_brute_force(lm, magnitude, ratio):
    ids = token_windows(lm.tokenizer, [TEXT], seq_len=16, n_windows=2, add_bos=True)
    scan = scan_residuals(lm.model, ids, top_k=64)
    assert scan.saturated(magnitude, ratio) == 0
    assert scanned_set(scan, magnitude, ratio) == brute_massive(residuals(lm.model, ids), magnitude, ratio)


def test_scan_statistics_match_brute_force(lm):
    ids = token_windows(lm.tokenizer, [TEXT], seq_len=20, n_windows=3, add_bos=True)
    hidden = residuals(lm.model, ids)  # [L, B, T, D]
    scan = scan_residuals(lm.model, ids, batch_size=2, top_k=5)
    flat = hidden.abs().flatten(2)
    top = flat.topk(5, dim=2)
    assert torch.allclose(scan.magnitudes(5), top.values.permute(1, 0, 2).float())
    assert torch.equal(scan.positions, (top.indices // hidden.shape[-1]).permute(1, 0, 2))
    assert torch.equal(scan.dims, (top.indices % hidden.shape[-1]).permute(1, 0, 2))
    assert torch.allclose(scan.median, flat.median(dim=2).values.T.float())


@pytest.mark.parametrize("batch_size, top_k", [(2, 5), (3, 40)])
def test_sampled_scan_matches_a_per_layer_reference(lm, batch_size, top_k):
    """The scan with a sampled median (entries and median sorts batched over layers) equals, layer by layer and
    sequence by sequence, the top entries of every |h| and the lower median of the sampled |h|."""
    ids = token_windows(lm.tokenizer, [TEXT], seq_len=20, n_windows=5, add_bos=True)
    hidden = residuals(lm.model, ids)  # [L, B, T, D]
    index = sample_index(hidden.shape[2] * hidden.shape[3], hidden.shape[3], 97)
    scan = scan_residuals(lm.model, ids, batch_size=batch_size, top_k=top_k, median_sample=97)
    flat = hidden.flatten(2)  # [L, B, T * D]
    top = flat.abs().topk(top_k, dim=2)
    assert torch.equal(scan.values, flat.gather(2, top.indices).permute(1, 0, 2).float())
    assert torch.equal(scan.positions * hidden.shape[-1] + scan.dims, top.indices.permute(1, 0, 2))
    assert torch.equal(scan.median, flat[..., index].abs().median(dim=2).values.T.float())


def test_scan_observes_without_changing_the_model(lm):
    ids = token_windows(lm.tokenizer, [TEXT], seq_len=16, n_windows=2, add_bos=True)
    from babel_lib.massive.scan import ResidualScan

    with torch.no_grad():
        bare = run_decoder(lm.model, ids)
        with hooked(lm.model, ResidualScan(3).hooks()):
            scanned = run_decoder(lm.model, ids)
    assert torch.equal(bare, scanned)


@pytest.mark.parametrize("shape, k", [((3, 9, 13), 6), ((2, 3, 4), 8), ((2, 40, 5), 7), ((1, 2, 50), 3)])
def test_top_entries_is_exact(shape, k):
    gen = torch.Generator().manual_seed(k)
    h = torch.randn(*shape, generator=gen, dtype=torch.float64)
    h[0, 1, :3] = torch.tensor([50.0, -60, 70], dtype=torch.float64)  # several winners in one token
    values, positions, dims = top_entries(h, k)
    ref = h.abs().flatten(1).topk(min(k, shape[1] * shape[2]), dim=1)
    assert torch.allclose(values.abs().double(), ref.values)
    assert torch.equal(positions * shape[2] + dims, ref.indices)
    assert torch.equal(values.double(), h.flatten(1).gather(1, ref.indices).float().double())


@pytest.mark.parametrize("tokens, width, size", [(64, 48, 1024), (9, 64, 512), (100, 30, 2999)])
def test_median_exact_and_sampled(tokens, width, size):
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(2, tokens, width, generator=gen) * torch.linspace(0.5, 2, tokens)[:, None]
    assert torch.equal(median_abs(h), h.abs().flatten(1).median(dim=1).values)
    index = sample_index(tokens * width, width, size)
    assert index.unique().numel() == size  # distinct entries
    assert set((index % width).tolist()) == set(range(width))  # every feature
    per_token = torch.bincount(index // width, minlength=tokens).float()
    assert per_token.max() - per_token.min() <= 2  # spread evenly over the tokens
    assert torch.equal(median_abs(h, index), h.flatten(1)[:, index].abs().median(dim=1).values)
    assert torch.allclose(median_abs(h, index), median_abs(h), rtol=0.1)
    assert sample_index(100, 10, 1000) is None


def captured_edit(model, ids, edit):
    """Block outputs just before and just after the edit's hooks, at every edited layer."""
    before, after = {}, {}
    grab = lambda store, l: lambda h: store.__setitem__(l, h.detach().clone())  # noqa: E731
    layers = sorted(edit.at)
    with hooked(model, {site(l, "hook_resid_post"): grab(before, l) for l in layers}), \
            hooked(model, edit.hooks()), \
            hooked(model, {site(l, "hook_resid_post"): grab(after, l) for l in layers}), torch.no_grad():
        run_decoder(model, ids)
    return before, after


@pytest.mark.parametrize("mode, where", [("zero", "first"), ("zero", "every"), ("mean", "first"), ("mean", "every")])
def test_intervention_changes_only_the_targets(lm, mode, where):
    ids = token_windows(lm.tokenizer, [TEXT], seq_len=16, n_windows=2, add_bos=True)
    target = Target(DIM, LAYER, 2)
    means = torch.full((3, 1, 2), 123.0)
    before, after = captured_edit(lm.model, ids, MassiveEdit([target], mode, where, means=means))
    assert sorted(before) == list(target.layers(where))
    for layer in before:
        changed = (before[layer] != after[layer]).nonzero().tolist()
        assert changed == [[b, 0, DIM] for b in range(2)]
        assert torch.all(after[layer][:, 0, DIM] == (0.0 if mode == "zero" else 123.0))


def test_observing_edit_returns_the_bare_output(lm):
    ids = token_windows(lm.tokenizer, [TEXT], seq_len=16, n_windows=2, add_bos=True)
    edit = MassiveEdit([Target(DIM, LAYER, 2)], "observe")
    with torch.no_grad():
        bare = lm.model(ids).logits
        with hooked(lm.model, edit.hooks()):
            observed = lm.model(ids).logits
    assert torch.equal(bare, observed)


def test_means_match_brute_force(lm):
    ids = token_windows(lm.tokenizer, [TEXT], seq_len=16, n_windows=3, add_bos=True)
    means = measure_means(lm.model, ids, [Target(DIM, LAYER, 2)], batch_size=2)
    hidden = residuals(lm.model, ids)
    for layer in (1, 2):
        assert torch.allclose(means[layer, 0, 0], hidden[layer, :, 0, DIM].mean().float())
        assert torch.allclose(means[layer, 0, 1], means[layer, 0, 0])  # no later-position entries: pooled
    with pytest.raises(BabelError, match="never massive"):
        measure_means(lm.model, ids, [Target(3, LAYER, 2)])


def test_zeroing_hurts_and_mean_restores(lm):
    from babel_lib.core.evaluation import window_loss

    ids = token_windows(lm.tokenizer, [TEXT], seq_len=16, n_windows=2, add_bos=True)
    target = [Target(DIM, LAYER, 2)]
    means = measure_means(lm.model, ids, target)
    bare = window_loss(lm.model, ids).mean
    with hooked(lm.model, MassiveEdit(target, "mean", "every", means=means).hooks()):
        mean = window_loss(lm.model, ids).mean
    with hooked(lm.model, MassiveEdit(target, "zero", "every").hooks()):
        zero = window_loss(lm.model, ids).mean
    assert abs(mean - bare) < 1e-9 < abs(zero - bare)  # the planted value is the same in every window


def test_bad_intervention_arguments():
    with pytest.raises(BabelError, match="unknown intervention"):
        MassiveEdit([Target(1, 0, 1)], "half")
    with pytest.raises(BabelError, match="needs the means"):
        MassiveEdit([Target(1, 0, 1)], "mean")
    with pytest.raises(BabelError, match="no massive dimensions"):
        MassiveEdit([], "zero")


def test_attention_mass_matches_loops():
    gen = torch.Generator().manual_seed(2)
    attn = torch.rand(2, 3, 6, 6, generator=gen).tril()
    attn = attn / attn.sum(-1, keepdim=True)
    marked = torch.zeros(2, 6, dtype=torch.bool)
    marked[0, 0] = marked[1, 0] = marked[1, 3] = True
    mass = attention_mass(attn, marked)
    for b in range(2):
        for l in range(3):
            ref = sum(float(attn[b, l, q, marked[b]].sum()) for q in range(1, 6)) / 5
            assert math.isclose(float(mass[b, l]), ref, rel_tol=1e-6)
        ref = sum(float(marked[b, : q + 1].sum()) / (q + 1) for q in range(1, 6)) / 5
        assert math.isclose(float(uniform_mass(marked)[b]), ref, rel_tol=1e-6)


def test_head_averaged_attention_is_causal_and_normalised():
    lm = planted("eager")
    ids = token_windows(lm.tokenizer, [TEXT], seq_len=16, n_windows=2, add_bos=True)
    attn = head_averaged_attention(lm.model, ids)
    assert attn.shape == (2, 3, 16, 16)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 3, 16))
    assert torch.all(attn.triu(1) == 0)


def test_head_averaged_attention_needs_eager():
    lm = load_model("tiny:llama", device="cpu")
    lm.model.set_attn_implementation("sdpa")
    with pytest.raises(BabelError, match="eager"):
        head_averaged_attention(lm.model, torch.tensor([[1, 5, 6]]))


@pytest.mark.parametrize("text, position, kind", [
    ("The", 0, "start"), (".", 3, "delimiter"), ("\n", 2, "delimiter"), (" ,", 5, "delimiter"),
    ("。", 4, "delimiter"), (" and", 6, "other"), ("  ", 1, "other"), ("3.5", 2, "other")])
def test_token_kinds(text, position, kind):
    assert token_kind(text, position) == kind


def test_paragraph_windows_start_at_paragraphs(lm):
    texts = [f"Paragraph number {i} says something long enough." for i in range(6)]
    ids = paragraph_windows(lm.tokenizer, texts, seq_len=20, n_windows=3, add_bos=False)
    starts = [lm.tokenizer.decode(row[:9]) for row in ids]
    assert starts == ["Paragraph"] * 3 and ids.shape == (3, 20)
    with pytest.raises(BabelError, match="paragraphs"):
        paragraph_windows(lm.tokenizer, texts[:2], seq_len=20, n_windows=3)


def test_study_chain_on_the_planted_model(tmp_path):
    """scan -> find -> interventions / attention as the notebook calls them: cached, and finding the planted one."""
    from babel_lib.core.artefacts import ArtefactStore
    from babel_lib.massive.attention import AttentionParams, attention
    from babel_lib.massive.intervene import InterventionParams, interventions
    from babel_lib.massive.locate import CriterionParams, find
    from babel_lib.massive.scan import ScanParams, scan

    lm = planted("eager")
    texts = {"en": [f"{t} Paragraph {i}." for i, t in enumerate(TEXTS * 2)],
             "de": [f"{t} Absatz {i}." for i, t in enumerate(TEXTS * 2)]}
    store, params = ArtefactStore(tmp_path), ScanParams(seq_len=12, scan_windows=2, scan_paragraphs=4, top_k=8)
    result = scan(store, lm, params, texts, bos=True, corpus_sha256="abc")
    again = scan(store, lm, params, texts, bos=True, corpus_sha256="abc")
    assert torch.equal(result.scan.values, again.scan.values) and result.key == again.key
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1  # the second call loaded the artefact
    assert scan(store, lm, params, texts, bos=True, corpus_sha256="other").key != result.key
    assert result.language.tolist() == [0, 0, 1, 1]
    located = find(result, lm.tokenizer, CriterionParams())
    assert located.targets == [Target(DIM, LAYER, 2)]
    edited = interventions(store, lm, InterventionParams(ppl_windows=1, ppl_paragraphs=4), located, texts)
    ppl = edited.perplexity
    assert ppl["mean, every layer"]["en"] == pytest.approx(ppl["original"]["en"], rel=1e-9)
    assert ppl["zero, every layer"]["en"] != pytest.approx(ppl["original"]["en"], rel=1e-9)
    attended = attention(lm, AttentionParams(attention_windows=1), located, "Summer is warm.")
    assert attended.mass.shape == (2, 3) and attended.span == (LAYER, 2) and list(attended.maps) == [1, 2]
    assert 0 < attended.baseline < 1
    from babel_lib.massive.bias import implicit_bias

    bias = implicit_bias(lm, AttentionParams(attention_windows=1), located)
    assert list(bias.layers()) == [2] and bias.massive.shape == (3,) and bias.per_window.shape == (2,)
    # one marked token (BOS, the same in every window): its part differs across queries only by the heads' weights
    assert bias.massive[2] > 0.99 and bias.massive[2] > bias.rest[2]


def test_attention_parts_add_up_to_the_attention_output():
    """The implicit-bias split: part from marked keys + rest == o_proj's output, captured by a brute-force hook."""
    from babel_lib.massive.bias import attention_parts, mean_cosine

    lm = planted("eager")
    ids = token_windows(lm.tokenizer, [TEXT], seq_len=12, n_windows=2, add_bos=True)
    marked = torch.zeros(2, 12, dtype=torch.bool)
    marked[:, 0] = marked[1, 5] = True
    outputs = {}
    handles = [block.self_attn.o_proj.register_forward_hook(
        lambda _m, _a, out, l=l: outputs.__setitem__(l, out.detach())) for l, block in enumerate(lm.model.model.layers)]
    try:
        massive, rest = attention_parts(lm.model, ids, marked)
    finally:
        for handle in handles:
            handle.remove()
    assert massive.shape == rest.shape == (2, 3, 12, lm.model.config.hidden_size)
    for layer, out in outputs.items():
        assert torch.allclose(massive[:, layer] + rest[:, layer], out.float(), atol=1e-5)
    nothing = attention_parts(lm.model, ids, torch.zeros(2, 12, dtype=torch.bool))[0]
    assert torch.all(nothing == 0)
    assert mean_cosine(torch.tensor([[1.0, 0.0], [2.0, 0.0]])) == pytest.approx(1.0)
    assert mean_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.1]])) < 0.2
