# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: babel
#     language: python
#     name: babel
# ---

# %% [markdown]
# # 03 · Massive activations
#
# *Massive Activations in Large Language Models* (Sun, Chen, Kolter, Liu; COLM 2024) found a handful of entries
# of the residual stream that are about 10,000 times larger than the rest. They sit in a few fixed feature
# dimensions, on the starting token, on the first delimiter ("." or "\n") and sometimes on weak words; they
# appear suddenly in one early layer, stay nearly constant afterwards, act as fixed biases, and the attention
# of later layers concentrates on their tokens.
#
# **Definition used here** (the paper's): an entry h of a decoder block's output is a massive activation when
# |h| > `magnitude` (100) **and** |h| ≥ `ratio` (1000) × the median of |h| over all tokens × features of that
# sequence at that layer. The scan (`babel_lib.massive.scan`) hooks every block output and keeps, per sequence and
# layer and on the device, the `top_k` largest |h| with their token position and feature dimension, plus the
# median; no hidden state is stored. Sequences are equal-length windows cut from the parallel corpus, each
# starting at a paragraph, so no padding enters the median.
#
# This notebook reproduces the paper's findings on both embedded models and asks what the paper could not:
# are the massive activations the same in 17 languages? All numbers below are computed by this run. The
# embedded models are 4-bit quantised GGUF weights dequantised to float: small models, quantised, so their
# massive activations need not match those of the full-precision originals.

# %% tags=["parameters"]
profile = "default"  # configs/<profile>.yaml
model = ""  # "" = the profile's models; else a model name or a comma-separated list

# %%
import math

import pandas as pd
import torch

from babel_lib.core import config
from babel_lib.core.artefacts import ArtefactStore
from babel_lib.core.batches import adds_bos, encode
from babel_lib.core.figures import caption, save_figure
from babel_lib.core.models import load_model
from babel_lib.data.corpus import corpus_info, load_corpus
from babel_lib.massive.plots import (
    attention_heatmaps,
    attention_mass_figure,
    constancy_figure,
    language_figure,
    layerwise_figure,
    perplexity_figure,
    surface_figure,
)
from babel_lib.massive.scan import (
    CONDITIONS,
    Scan,
    attention_mass,
    between_within,
    constancy,
    group_dims,
    head_averaged_attention,
    intervention_nll,
    language_windows,
    locate,
    measure_means,
    paragraph_windows,
    perplexity,
    reference_layer,
    residual_at,
    scan_residuals,
    summarise,
    target_values,
    targets_from,
    token_kinds,
    token_texts,
    uniform_mass,
)

P = config.notebook_params("03_massive_activations", profile, model)
config.apply_runtime(P)
store = ArtefactStore(P.artefacts)
criterion = {"magnitude": P.magnitude, "ratio": P.median_ratio}
pd.Series({k: v for k, v in P.items()}).to_frame("value")

# %% [markdown]
# ## The models, and what "with BOS" means for each
#
# Attention probabilities are needed at the end, so the models run with eager attention. The paper tokenises
# **without** a BOS token for its main experiments; with one, some models move their massive activations onto
# it. We scan both ways for every model whose tokenizer adds a BOS token by default (it was trained with one);
# a model without a default BOS is scanned without one only.

# %%
models = {name: load_model(name, P.device, P.dtype, attn_implementation="eager") for name in P.models}
runs = {}  # (model, with BOS) for every scan
rows = []
for name, lm in models.items():
    tok = lm.tokenizer
    default_bos = adds_bos(tok)
    runs |= {(name, bos): None for bos in ([False, True] if default_bos else [False])}
    rows.append({"model": name, "layers": lm.model.config.num_hidden_layers, "d_model": lm.model.config.hidden_size,
                 "bos token": tok.bos_token, "adds BOS by default": default_bos,
                 "scanned": "with and without BOS" if default_bos else "without BOS only", "weights": lm.card})
    if not default_bos:
        print(f"{name}: its tokenizer adds no BOS; its bos_token {tok.bos_token!r} is not put in front of text "
              "by default, so it is scanned without BOS only.")
pd.DataFrame(rows).set_index("model")


# %% [markdown]
# ## Scan the residual stream in every language
#
# For each model and BOS setting: `scan_windows` windows of `seq_len` tokens per language from the calibration
# split, each starting at a paragraph. The scans are artefacts keyed by the model and parameters.

# %%
calibration = load_corpus(P.languages, split="calibration", limit=P.scan_paragraphs)
texts = {lang: calibration[lang] for lang in P.languages}
corpus_sha256 = corpus_info()["sha256"]  # artefacts are keyed by the corpus they were computed on


def bos_label(name, bos):
    return f"{name} · {'with' if bos else 'without'} BOS"


def scan_run(name, bos):
    lm = models[name]
    params = {"model": name, "fingerprint": lm.fingerprint, "bos": bos, "languages": P.languages,
              "seq_len": P.seq_len, "scan_windows": P.scan_windows, "scan_paragraphs": P.scan_paragraphs,
              "top_k": P.top_k, "median_sample": P.median_sample, "corpus": P.corpus, "corpus_sha256": corpus_sha256}

    def compute():
        ids, lang = language_windows(lm.tokenizer, texts, P.seq_len, P.scan_windows, add_bos=bos)
        scan = scan_residuals(lm.model, ids, batch_size=P.batch_size, top_k=P.top_k, median_sample=P.median_sample)
        return scan.tensors() | {"language": lang}, {}

    tensors, _ = store.cached("massive-scan", params, compute)
    return Scan(*(tensors[k] for k in ("values", "positions", "dims", "median", "ids"))), tensors["language"]


scans, languages_of = {}, {}
for key in runs:
    scans[key], languages_of[key] = scan_run(*key)
default = {name: (name, adds_bos(lm.tokenizer)) for name, lm in models.items()}  # each model's own tokenisation
for key, scan in scans.items():
    if scan.saturated(**criterion):
        print(f"warning: {bos_label(*key)}: {scan.saturated(**criterion)} (sequence, layer) pairs have all top_k="
              f"{P.top_k} entries massive; raise top_k to see them all")
pd.DataFrame({bos_label(*k): {"sequences": s.n_sequences, "tokens each": s.ids.shape[1], "layers": s.n_layers}
              for k, s in scans.items()}).T

# %% [markdown]
# ## Layer-wise: top-1/2/3 against the median
#
# The paper's first figure: per layer, the three largest magnitudes and the median magnitude of the hidden
# state (lines: mean over sequences; bands: min to max over sequences; log axis).

# %%
fig = layerwise_figure({bos_label(*k): (s.magnitudes(3), s.median) for k, s in scans.items()})
save_figure(fig, "layerwise", P, caption(P, ", ".join(P.models), seq_len=P.seq_len,
                                         windows=f"{P.scan_windows}/language calibration",
                                         languages=len(P.languages), median_sample=P.median_sample or "exact"),
            width=1400, height=550)
fig.show()
for key, scan in scans.items():
    top1 = scan.magnitudes(1)[..., 0].mean(0)
    layer = int(top1.argmax())
    ratio = top1[layer] / scan.median.mean(0)[layer]
    print(f"{bos_label(*key)}: the largest activation peaks at layer {layer} with |h| = {float(top1[layer]):,.0f} on "
          f"average, {float(ratio):,.0f}x the median magnitude there ({float(scan.median.mean(0)[layer]):.2f}).")

# %% [markdown]
# ## Where they are: dimensions, layers, tokens
#
# Each massive activation is located by feature dimension, token position and token text, and the layers
# where it meets the criterion. Token kinds: **start** (position 0: BOS, or the first token without BOS),
# **delimiter** (a token of only punctuation, or a newline), **other**. Per dimension: the first and last layer
# where it is ever massive, the core range where it is massive in at least `min_share` of the sequences, how
# many located activations of each kind, in what share of sequences it occurs, and on how many positions of a
# sequence that has it (a dimension flagged on many positions is an outlier feature of every token rather than
# a token-specific massive activation).

# %%
found, summaries = {}, {}
for key, scan in scans.items():
    found[key] = locate(scan, models[key[0]].tokenizer, **criterion)
    summaries[key] = summarise(scan, found[key], min_share=P.min_share, **criterion)
table = pd.DataFrame([{"run": bos_label(*k), **row} for k, rows in summaries.items() for row in rows])
table.set_index(["run", "dim"]) if len(table) else table

# %%
targets = {key: targets_from(rows) for key, rows in summaries.items()}
strongest = {}
for key, rows in summaries.items():
    core = [r for r in rows if r["core_first"] is not None]
    if not core:
        print(f"{bos_label(*key)}: no dimension is massive in at least {P.min_share:.0%} of the sequences.")
        continue
    top = max(core, key=lambda r: r["max_abs"])
    strongest[key] = next(t for t in targets[key] if t.dim == top["dim"])
    kinds = ", ".join(f"{top[k]} {k}" for k in ("start", "delimiter", "other") if top[k])
    print(f"{bos_label(*key)}: {len(core)} massive dimension(s) {sorted(r['dim'] for r in core)}; the largest, dim "
          f"{top['dim']} (|h| up to {top['max_abs']:,.0f}), is massive from layer {top['core_first']} to "
          f"{top['core_last']} in most sequences, found in {top['sequences']:.0%} of them ({kinds}).")

# %% [markdown]
# A sample of the located activations (the largest first) with their tokens:

# %%
located = pd.DataFrame([{"run": bos_label(*k), **vars(m)} for k, ms in found.items() for m in ms])
if len(located):
    located["|peak|"] = located["peak"].abs()
    located = located.sort_values("|peak|", ascending=False).groupby("run").head(8).drop(columns="|peak|")
located

# %% [markdown]
# ## A 3-D view of one layer
#
# |h| over token × feature for a short prompt, at the middle layer of the largest massive activation's range
# (or `surface_layer`), each model with its own tokenisation. Rotate and hover to read the token and dimension.

# %%
for name, lm in models.items():
    key = default[name]
    if key not in strongest:
        continue
    layer = P.surface_layer if P.surface_layer is not None else reference_layer(strongest[key])
    ids = torch.tensor(encode(lm.tokenizer, [P.prompt], add_bos=key[1]))
    size = residual_at(lm.model, ids, layer)[0].abs()
    tokens = token_texts(lm.tokenizer, ids)[0]
    fig = surface_figure(size, tokens, f"{name}: |h| after block {layer}, prompt {P.prompt!r}")
    save_figure(fig, f"surface-{name}", P, caption(P, name, layer=layer, bos=key[1], prompt=repr(P.prompt)),
                width=1000, height=700)
    fig.show()
    pos, dim = divmod(int(size.argmax()), size.shape[1])
    print(f"{name}: at layer {layer} the largest |h| of the prompt is {float(size.max()):,.0f} at token {pos} "
          f"({tokens[pos]!r}), dim {dim}; the median |h| is {float(size.median()):.2f}.")

# %% [markdown]
# ## Constancy across inputs
#
# The paper finds that each massive activation keeps nearly the same value whatever the input. For every
# massive dimension and token kind: mean ± std over all sequences and languages at the middle layer of its
# range, and the coefficient of variation (std / |mean|). Under causal attention the state at position 0
# depends only on the token there, so with a BOS token the start value is the same in every sequence by
# construction; without BOS the first token differs from window to window and language to language.

# %%
stable = {}
for key, scan in scans.items():
    kinds = token_kinds(models[key[0]].tokenizer, scan.ids)
    stable[bos_label(*key)] = constancy(scan, kinds, targets[key], **criterion)
fig = constancy_figure(stable)
save_figure(fig, "constancy", P, caption(P, ", ".join(P.models), seq_len=P.seq_len, languages=len(P.languages),
                                         windows=f"{P.scan_windows}/language", **criterion), width=1400, height=550)
fig.show()
for run, rows in stable.items():
    varied = [r for r in rows if r["n"] > 1 and r["std"] > 0]
    fixed = [f"dim {r['dim']} on {r['kind']}" for r in rows if r["n"] > 1 and r["std"] == 0]
    if fixed:
        print(f"{run}: identical in every sequence: {', '.join(fixed)}.")
    if varied:
        tight = min(varied, key=lambda r: r["cv"])
        print(f"{run}: the steadiest varying massive activation, dim {tight['dim']} on {tight['kind']} tokens at "
              f"layer {tight['layer']}, is {tight['mean']:,.1f} ± {tight['std']:,.1f} over {tight['n']} occurrences "
              f"(CV {tight['cv']:.1%}); the CVs range from {tight['cv']:.1%} to {max(r['cv'] for r in varied):.1%}.")
pd.DataFrame([{"run": run, **row} for run, rows in stable.items() for row in rows])

# %% [markdown]
# ## Across the 17 languages
#
# Are the massive dimensions the same in every language, and does their value depend on the language? Each
# language's windows are scanned on their own to find its massive dimensions. Values are compared on the scans
# without BOS (the paper's setting; with BOS the start value cannot depend on the text): the value of each
# model's largest massive activation, on its most frequent token kind, at the middle of its range, between and
# within languages.

# %%
values_by_lang, labels = {}, {}
for name, lm in models.items():
    key = (name, False)
    if key not in strongest:
        continue
    scan, lang = scans[key], languages_of[key]
    per_language = group_dims(scan, lang, lm.tokenizer, min_share=P.min_share, **criterion)
    presence = {dim: sum(dim in dims for dims in per_language) for dim in sorted(set.union(*per_language))}
    target, layer = strongest[key], reference_layer(strongest[key])
    by_kind = target_values(scan, token_kinds(lm.tokenizer, scan.ids), target, layer, **criterion)
    if not by_kind:
        print(f"{name}: dim {target.dim} is not massive at layer {layer} in any sequence without BOS.")
        continue
    kind = max(by_kind, key=lambda k: by_kind[k][0].numel())
    seq, vals = by_kind[kind]
    values_by_lang[name] = {code: vals[lang[seq] == i] for i, code in enumerate(P.languages) if (lang[seq] == i).any()}
    labels[name] = f"dim {target.dim} on {kind} tokens, layer {layer}, without BOS"
    spread = between_within(list(values_by_lang[name].values()))
    within = "n/a (one value per language)" if math.isnan(spread["within_cv"]) else f"{spread['within_cv']:.1%}"
    dims_text = ", ".join(f"dim {d} in {k} of {len(per_language)} languages" for d, k in presence.items())
    print(f"{name}: massive dimensions per language: {dims_text}. The value of {labels[name]} occurs in "
          f"{len(values_by_lang[name])} of {len(P.languages)} languages; the language means vary by CV "
          f"{spread['between_cv']:.1%} against a mean within-language CV of {within}.")
fig = language_figure(values_by_lang, labels)
save_figure(fig, "languages", P, caption(P, ", ".join(values_by_lang), bos=False, seq_len=P.seq_len,
                                         windows=f"{P.scan_windows}/language calibration", **criterion),
            width=1400, height=400 * max(len(values_by_lang), 1))
fig.show()

# %% [markdown]
# ## Intervention: zero them, or set them to their mean
#
# The paper sets the massive activations to zero, or to their mean value, at the layer where they first
# appear, and measures perplexity: zeroing destroys the model, the mean leaves it intact, so they act as
# fixed biases. As the stronger control we also edit them at every layer of their range.
#
# *Which entries* are decided per input at run time: at each massive dimension's first layer, the entries of
# that dimension that meet the criterion in the hidden state reaching that layer; the same (sequence,
# position) entries are edited at the later layers of the range ("every layer"). Means are measured on the
# calibration windows, per layer, dimension and position class (the start position, later positions).
# Perplexity: held-out windows of exactly `seq_len` tokens per language, each model with its own tokenisation,
# the LM head applied in chunks (`evaluation.window_loss`).

# %%
heldout = load_corpus(P.languages, split="heldout", limit=P.ppl_paragraphs)
ppl = {}
for name, lm in models.items():
    key = default[name]
    if not targets[key]:
        continue
    params = {"model": name, "fingerprint": lm.fingerprint, "bos": key[1], "targets": [vars(t) for t in targets[key]],
              "languages": P.languages, "seq_len": P.seq_len, "ppl_windows": P.ppl_windows,
              "ppl_paragraphs": P.ppl_paragraphs, "scan_windows": P.scan_windows,
              "scan_paragraphs": P.scan_paragraphs, "corpus_sha256": corpus_sha256, **criterion}

    def compute():
        means = measure_means(lm.model, scans[key].ids, targets[key], batch_size=P.batch_size, **criterion)
        windows = {lang: paragraph_windows(lm.tokenizer, heldout[lang], P.seq_len, P.ppl_windows, key[1])
                   for lang in P.languages}
        return {"means": means}, {"nll": intervention_nll(lm.model, windows, targets[key], means, **criterion)}

    _, meta = store.cached("massive-intervention", params, compute)
    ppl[bos_label(*key)] = {cond: {lang: perplexity(meta["nll"][cond][lang]) for lang in P.languages}
                            for cond in CONDITIONS}

fig = perplexity_figure(ppl)
save_figure(fig, "intervention", P, caption(P, ", ".join(ppl), seq_len=P.seq_len,
                                            windows=f"{P.ppl_windows}/language held-out", **criterion),
            width=1400, height=450 * max(len(ppl), 1))
fig.show()
for run, conditions in ppl.items():
    med = {c: float(torch.tensor(list(per.values())).median()) for c, per in conditions.items()}
    print(f"{run}: median perplexity over {len(P.languages)} languages at seq_len {P.seq_len}: "
          + "; ".join(f"{c} {v:,.2f}" for c, v in med.items()) + ".")
pd.DataFrame({(run, c): per for run, conds in ppl.items() for c, per in conds.items()}).T

# %% [markdown]
# ## Attention concentrates on them
#
# Head-averaged attention probabilities of the prompt at the layer where the largest massive activation first
# appears (its input does not carry it yet) and at the next layer (its input does), then, on
# `attention_windows` calibration windows per language, the share of attention mass that lands on the tokens
# holding that massive activation (at any layer), per layer, against what uniform causal attention would give
# those tokens.

# %%
maps, prompt_tokens, mass, baseline, spans = {}, {}, {}, {}, {}
for name, lm in models.items():
    key = default[name]
    if key not in strongest:
        continue
    first = strongest[key].first_layer
    ids = torch.tensor(encode(lm.tokenizer, [P.prompt], add_bos=key[1]))
    attn = head_averaged_attention(lm.model, ids)[0]
    shown = [first, min(first + 1, attn.shape[0] - 1)]
    maps[name] = {layer: attn[layer] for layer in shown}
    prompt_tokens[name] = token_texts(lm.tokenizer, ids)[0]
    rows = torch.cat([(languages_of[key] == i).nonzero().flatten()[: P.attention_windows]
                      for i in range(len(P.languages))])
    marked = torch.zeros(len(rows), scans[key].ids.shape[1], dtype=torch.bool)
    for m in found[key]:
        if m.sequence in rows.tolist() and m.dim == strongest[key].dim:
            marked[rows.tolist().index(m.sequence), m.position] = True
    windows_attn = torch.cat([head_averaged_attention(lm.model, scans[key].ids[rows[i:i + P.batch_size]])
                              for i in range(0, len(rows), P.batch_size)])
    mass[name] = attention_mass(windows_attn, marked)
    baseline[name] = float(uniform_mass(marked).mean())
    spans[name] = (strongest[key].first_layer, strongest[key].last_layer)

fig = attention_heatmaps(maps, prompt_tokens)
save_figure(fig, "attention-maps", P, caption(P, ", ".join(maps), prompt=repr(P.prompt), heads="averaged"),
            width=1300, height=550 * max(len(maps), 1))
fig.show()
fig = attention_mass_figure(mass, baseline, spans)
save_figure(fig, "attention-mass", P, caption(P, ", ".join(mass), seq_len=P.seq_len,
                                              windows=f"{P.attention_windows}/language", heads="averaged", **criterion),
            width=1400, height=500)
fig.show()
for name, values in mass.items():
    first, last = spans[name]
    per_layer = values.mean(0)
    before = float(per_layer[: first + 1].mean())
    after = float(per_layer[first + 1 : last + 2].mean())
    print(f"{name}: attention on the massive-activation tokens averages {before:.1%} up to layer {first} and "
          f"{after:.1%} from layer {first + 1} to {min(last + 1, len(per_layer) - 1)}; uniform attention would give "
          f"them {baseline[name]:.1%}.")

# %% [markdown]
# Scans and intervention results are saved under `build/<profile>/artefacts/massive-*`. The benchmark
# `benchmarks/massive.py` measures what the scan costs on top of a bare forward (`benchmarks/README.md`).
