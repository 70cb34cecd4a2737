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
# |h| > `magnitude` (100) **and** |h| ≥ `median_ratio` (1000) × the median of |h| over all tokens × features of that
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
import pandas as pd

from babel_lib.core import config
from babel_lib.core.artefacts import ArtefactStore
from babel_lib.core.figures import caption, save_figure
from babel_lib.core.models import load_model
from babel_lib.core.verdicts import save_verdicts, verdict_table
from babel_lib.massive import verdicts
from babel_lib.massive.attention import AttentionParams, attention
from babel_lib.massive.bias import ImplicitBias, implicit_bias
from babel_lib.massive.constancy import across_languages, constancy
from babel_lib.massive.intervene import InterventionParams, interventions
from babel_lib.massive.locate import CriterionParams, find
from babel_lib.massive.plots import (attention_heatmaps, attention_mass_figure, constancy_figure, language_figure,
                                     layerwise_figure, perplexity_figure, surface_figure)
from babel_lib.massive.scan import Run, ScanParams, model_rows, own_tokenisation, runs, scan
from babel_lib.massive.surface import PromptParams, surface

P = config.notebook_params("03_massive_activations", profile, model)
config.apply_runtime(P)
store = ArtefactStore(P.artefacts)
SCAN, CRITERION, PROMPT = P.typed(ScanParams), P.typed(CriterionParams), P.typed(PromptParams)
pd.Series({k: v for k, v in P.items()}).to_frame("value")

# %% [markdown]
# ## The models, and what "with BOS" means for each
#
# Attention probabilities are needed at the end, so the models run with eager attention. The paper tokenises
# **without** a BOS token for its main experiments; with one, some models move their massive activations onto
# it. We scan both ways for every model whose tokenizer adds a BOS token by default (it was trained with one);
# a model without a default BOS is scanned without one only. Figure captions name each model's weights and
# their quantisation.

# %%
models = {name: load_model(name, P.device, P.dtype, attn_implementation="eager") for name in P.models}
weights = "; ".join(lm.card for lm in models.values())
rows, notes = model_rows(models)
print("\n".join(notes))
pd.DataFrame(rows).set_index("model")

# %% [markdown]
# ## Scan the residual stream in every language
#
# For each model and BOS setting: `scan_windows` windows of `seq_len` tokens per language from the calibration
# split, each starting at a paragraph. The scans are artefacts keyed by the model, the corpus and the parameters.

# %%
source = config.text_source(P)
calibration = source.load(P.languages, "calibration", P.scan_paragraphs)
texts = {lang: calibration[lang] for lang in P.languages}
corpus_sha256 = source.identity  # the corpus file and the profile's filter
scans = {run: scan(store, models[run.model], SCAN, texts, bos=run.bos, corpus_sha256=corpus_sha256)
         for run in runs(models)}
pd.DataFrame({run.label: {"sequences": s.scan.n_sequences, "tokens each": s.scan.ids.shape[1],
                          "layers": s.scan.n_layers} for run, s in scans.items()}).T

# %% [markdown]
# ## Layer-wise: top-1/2/3 against the median
#
# The paper's first figure: per layer, the three largest magnitudes and the median magnitude of the hidden
# state (lines: mean over windows; bands: min to max over windows; log axes). Under the figure: the layer where
# the mean top-1 peaks, and how the top-1/median ratio varies from window to window there.

# %%
fig = layerwise_figure({run.label: (s.scan.magnitudes(3), s.scan.median) for run, s in scans.items()})
save_figure(fig, "layerwise", P, caption(P, weights, seq_len=P.seq_len, windows=f"{P.scan_windows}/language calibration",
                                         languages=len(P.languages), median_sample=P.median_sample or "exact"),
            width=1400, height=550)
fig.show()
print("\n".join(line for s in scans.values() for line in s.findings()))

# %% [markdown]
# ## Where they are: dimensions, layers, tokens
#
# Each massive activation is located by feature dimension, token position and token text, and the layers
# where it meets the criterion. Token kinds: **start** (position 0: BOS, or the first token without BOS),
# **delimiter** (a token of only punctuation, or a newline), **other**. Per dimension: the first and last layer
# where it is ever massive, how many located activations of each kind, in what share of sequences it occurs, and
# on how many positions of a sequence that has it. A dimension massive on many positions of a sequence is an
# *outlier feature* (large on most tokens), not a token-specific massive activation: at a layer where it is massive
# on more than `max_positions` positions in at least `min_share` of the sequences it is an outlier feature there
# (`outlier_layers`). Its core range, where it counts as a massive activation and becomes a target of the analyses
# below, is the longest run of layers where it is massive on 1 to `max_positions` positions in at least
# `min_share` of the sequences (the paper's sit on the starting token and the first delimiter: 2 positions).

# %%
located = {run: find(s, models[run.model].tokenizer, CRITERION) for run, s in scans.items()}
print("\n".join(line for found in located.values() for line in found.findings()))
table = pd.DataFrame([{"run": run.label, **row} for run, found in located.items() for row in found.summary])
table.set_index(["run", "dim"]) if len(table) else table

# %% [markdown]
# A sample of the located activations (the largest first) with their tokens:

# %%
pd.DataFrame([{"run": run.label, **vars(m)} for run, found in located.items() for m in found.largest(8)])

# %% [markdown]
# ## A 3-D view of one layer
#
# |h| over token × feature for a short prompt, at the middle layer of the largest massive activation's range
# (or `surface_layer`), each model with its own tokenisation. Rotate and hover to read the token and dimension.

# %%
own = {name: own_tokenisation(lm) for name, lm in models.items()}
for name, lm in models.items():
    view = surface(lm, PROMPT, located[own[name]])
    if view is None:
        continue
    fig = surface_figure(view.size, view.tokens, f"{name}: |h| after block {view.layer}, prompt {view.prompt!r}")
    save_figure(fig, f"surface-{name}", P, caption(P, lm.card, layer=view.layer, bos=view.bos,
                                                   prompt=repr(view.prompt)), width=1000, height=700)
    fig.show()
    print("\n".join(view.findings()))

# %% [markdown]
# ## Constancy across inputs
#
# The paper finds that each massive activation keeps nearly the same value whatever the input. For every
# massive dimension and token kind: mean ± std over all sequences and languages at the middle layer of its
# range, and the coefficient of variation (std / |mean|). Under causal attention the state at position 0
# depends only on the token there, so with a BOS token the start value is the same in every sequence by
# construction; without BOS the first token differs from window to window and language to language.

# %%
stable = {run: constancy(found, models[run.model].tokenizer) for run, found in located.items()}
fig = constancy_figure({c.label: c.rows for c in stable.values()})
save_figure(fig, "constancy", P, caption(P, weights, seq_len=P.seq_len, languages=len(P.languages),
                                         windows=f"{P.scan_windows}/language", magnitude=P.magnitude,
                                         median_ratio=P.median_ratio), width=1400, height=550)
fig.show()
print("\n".join(line for c in stable.values() for line in c.findings()))
pd.DataFrame([{"run": c.label, **row} for c in stable.values() for row in c.rows])

# %% [markdown]
# ## Across the 17 languages
#
# Are the massive dimensions the same in every language, and does their value depend on the language? Each
# language's windows are scanned on their own to find its massive dimensions. Values are compared on the scans
# without BOS (the paper's setting; with BOS the start value cannot depend on the text): the value of each
# model's largest massive activation, on its most frequent token kind, at the middle of its range, between and
# within languages.

# %%
by_language = {name: across_languages(located[Run(name, False)], lm.tokenizer, P.languages)
               for name, lm in models.items()}
by_language = {name: result for name, result in by_language.items() if result is not None}
print("\n".join(line for result in by_language.values() for line in result.findings()))
shown = {name: result for name, result in by_language.items() if result.values}
fig = language_figure({name: r.values for name, r in shown.items()}, {name: r.label for name, r in shown.items()})
save_figure(fig, "languages", P, caption(P, weights, bos=False, seq_len=P.seq_len,
                                         windows=f"{P.scan_windows}/language calibration", magnitude=P.magnitude,
                                         median_ratio=P.median_ratio), width=1400, height=400 * max(len(shown), 1))
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
heldout = source.load(P.languages, "heldout", P.ppl_paragraphs)
heldout = {lang: heldout[lang] for lang in P.languages}
edited = {name: interventions(store, lm, P.typed(InterventionParams), located[own[name]], heldout)
          for name, lm in models.items()}
edited = {name: result for name, result in edited.items() if result is not None}
fig = perplexity_figure({result.label: result.perplexity for result in edited.values()})
save_figure(fig, "intervention", P, caption(P, "; ".join(models[n].card for n in edited), seq_len=P.seq_len,
                                            windows=f"{P.ppl_windows}/language held-out", magnitude=P.magnitude,
                                            median_ratio=P.median_ratio), width=1400, height=450 * max(len(edited), 1))
fig.show()
print("\n".join(line for result in edited.values() for line in result.findings()))
pd.DataFrame({(r.label, c): per for r in edited.values() for c, per in r.perplexity.items()}).T

# %% [markdown]
# ## Where attention goes
#
# Head-averaged attention probabilities of the prompt at the layer where the largest massive activation first
# appears (its input does not carry it yet) and at the next layer (its input does), then, on
# `attention_windows` calibration windows per language, the share of attention mass that lands on the tokens
# holding that massive activation (at any layer), per layer, against what uniform causal attention would give
# those tokens. Under the figures: the mean share per layer around the layer where the activation
# appears, and the change per window with a bootstrap interval.

# %%
attended = {name: attention(lm, P.typed(AttentionParams), located[own[name]], PROMPT.prompt)
            for name, lm in models.items()}
attended = {name: result for name, result in attended.items() if result is not None}
fig = attention_heatmaps({n: a.maps for n, a in attended.items()}, {n: a.tokens for n, a in attended.items()})
save_figure(fig, "attention-maps", P, caption(P, "; ".join(models[n].card for n in attended), prompt=repr(P.prompt),
                                              heads="averaged"), width=1300, height=550 * max(len(attended), 1))
fig.show()
fig = attention_mass_figure({n: a.mass for n, a in attended.items()}, {n: a.baseline for n, a in attended.items()},
                            {n: a.span for n, a in attended.items()})
save_figure(fig, "attention-mass", P, caption(P, "; ".join(models[n].card for n in attended), seq_len=P.seq_len,
                                              windows=f"{P.attention_windows}/language", heads="averaged",
                                              magnitude=P.magnitude, median_ratio=P.median_ratio),
            width=1400, height=500)
fig.show()
print("\n".join(line for result in attended.values() for line in result.findings()))

# %% [markdown]
# ## An implicit attention bias?
#
# The paper argues that attention to these tokens adds a nearly fixed vector to every query's output, a bias
# term. Each layer's attention output is split exactly into the part that comes from the massive-activation tokens,
# o_proj(Σ_j∈marked a_tj v_j), and the rest, on the same windows as above, for every query after position 0 that
# does not itself hold the activation. How constant each part is: the mean cosine of its vectors to their mean
# vector (1 = the same direction for every query and window).

# %%
biases = {name: implicit_bias(lm, P.typed(AttentionParams), located[own[name]]) for name, lm in models.items()}
biases = {name: result for name, result in biases.items() if result is not None}
print("\n".join(line for result in biases.values() for line in result.findings()))
pd.DataFrame([row for result in biases.values() for row in result.rows()],
             columns=ImplicitBias.COLUMNS).set_index(["model", "layer"])

# %% [markdown]
# ## Verdicts
#
# Each claim of the paper (numbers from `../shared/papers/massive-activations.md`) beside ours, with the rule
# that decides the verdict. The location claims are judged on each model's scan without BOS (the paper's
# setting), the intervention and attention claims on its own tokenisation; the uncertainty is over the sampled
# windows (bootstrap or percentiles) or, for perplexity, the range over languages.

# %%
found_verdicts = [v for name, lm in models.items()
                  for v in verdicts.verdicts(located[Run(name, False)], lm.tokenizer, edited.get(name),
                                             attended.get(name), biases.get(name))]
save_verdicts(P, found_verdicts)
verdict_table(found_verdicts)

# %% [markdown]
# Scans and intervention results are saved under `build/<profile>/artefacts/massive-*`. The benchmark
# `benchmarks/massive.py` measures what the scan costs on top of a bare forward (`benchmarks/README.md`).
