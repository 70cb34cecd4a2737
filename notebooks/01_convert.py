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
# # 01 · Dense feed-forward layers → a fine-grained mixture of experts
#
# *Unraveling Babel* (Liu et al., EMNLP 2024) studies multilingual activation patterns by viewing each
# dense feed-forward (FFN) layer as a mixture of many small experts. No weight changes: the `d_ff` neurons
# of a layer are split into `n_experts` groups of equal size, and an expert is "the neurons of one group".
# Following MoEfication (parameter clustering), neurons whose gate-projection rows point the same way are
# put together: balanced k-means on the L2-normalised rows of `W_gate` (of `W_in` for ungated FFNs).
#
# This notebook partitions every layer of each model, compares the partition's cohesion with random and
# contiguous baselines, checks that the converted model reproduces the dense model, and saves the partition
# for the next notebooks. All results below are computed by this run; the embedded models are 4-bit
# quantised GGUF weights, dequantised to float.

# %% tags=["parameters"]
# profile: configs/<profile>.yaml; model: empty for the profile's models, else a name or a comma-separated list
profile = "default"
model = ""

# %%
import pandas as pd
import torch

from babel_lib.core import config
from babel_lib.core.artefacts import ArtefactStore
from babel_lib.core.batches import paragraph_batches
from babel_lib.babel.conversion import equivalence, layer_cohesion, partition_model
from babel_lib.data.corpus import load_corpus
from babel_lib.core.ffn import ffn_layers
from babel_lib.core.figures import caption, save_figure
from babel_lib.core.models import load_model
from babel_lib.babel.plots import cohesion_figure, equivalence_figure

P = config.notebook_params("01_convert", profile, model)
config.apply_runtime(P)
store = ArtefactStore(P.artefacts)
pd.Series({k: v for k, v in P.items()}).to_frame("value")

# %% [markdown]
# ## The models and their feed-forward layers
#
# The FFN adapter (`babel_lib.core.ffn`) knows, per architecture, where each layer's FFN is, whether it is gated,
# and which module receives the neuron activation (the down projection's input).

# %%
models = {name: load_model(name, P.device, P.dtype) for name in P.models}
rows = []
for name, lm in models.items():
    layers = ffn_layers(lm.model)
    width = layers[0].width
    rows.append({"model": name, "architecture": type(lm.model).__name__, "layers": len(layers),
                 "d_model": lm.model.config.hidden_size, "d_ff": width, "gated": layers[0].gated,
                 "activation": type(layers[0].act).__name__, "n_experts": P.n_experts,
                 "neurons per expert": f"{width / P.n_experts:g}", "weights": lm.card})
pd.DataFrame(rows).set_index("model")

# %% [markdown]
# ## Partition every layer
#
# Balanced k-means gives every expert exactly `d_ff / n_experts` neurons (sizes differ by at most one when
# `n_experts` does not divide `d_ff`). The partitions are artefacts keyed by the model's fingerprint and the
# parameters, so re-running reuses them and the next notebooks load them.

# %%
calibration_texts = [t for lang in P.languages
                     for t in load_corpus(P.languages, split="calibration", limit=P.calibration_paragraphs)[lang]]
experts, cohesion = {}, {}
for name, lm in models.items():
    cohesion[name] = {}
    for method in [P.method, *P.baselines]:
        calibration = paragraph_batches(lm.tokenizer, calibration_texts)  # read only by method="coactivation"
        found = partition_model(lm, P.n_experts, method, seed=P.seed, iters=P.kmeans_iters, store=store,
                                calibration=calibration)
        experts.setdefault(name, found)
        cohesion[name][method] = layer_cohesion(lm, found)

summary = pd.DataFrame({name: {method: float(c.mean()) for method, c in per.items()} for name, per in cohesion.items()})
summary.index.name = "mean within-expert cosine similarity"
summary

# %% [markdown]
# ### Cohesion per layer
#
# Cohesion is the mean pairwise cosine similarity of the clustered rows inside an expert. A random
# partition sits near zero; clustering should lift every layer above it.

# %%
fig = cohesion_figure(cohesion)
save_figure(fig, "cohesion", P, caption(P, ", ".join(P.models), n_experts=P.n_experts, method=P.method,
                                        iters=P.kmeans_iters, baselines="/".join(P.baselines)))
fig.show()

# %%
gain = {name: float(cohesion[name][P.method].mean() / cohesion[name][P.baselines[0]].mean()) for name in models}
for name, lm in models.items():
    per_layer = cohesion[name][P.method].mean(1) > cohesion[name][P.baselines[0]].mean(1)
    print(f"{name}: {P.method} cohesion is {gain[name]:.1f}x the {P.baselines[0]} baseline on average and higher "
          f"in {int(per_layer.sum())} of {per_layer.numel()} layers.")

# %% [markdown]
# ## The converted model reproduces the dense model
#
# The converted model routes every token through its experts: at each layer the neuron activations are
# scaled by their expert's gate. With every expert active the output must equal the dense model's; as a
# control, dropping half of each layer's experts must change it. Tokens: held-out paragraphs of every
# language.

# %%
corpus = load_corpus(P.languages, split="heldout", limit=P.check_paragraphs)
texts = [text for lang in P.languages for text in corpus[lang]]
checks = {}
for name, lm in models.items():
    batches = paragraph_batches(lm.tokenizer, texts, batch_tokens=512, max_length=128)
    checks[name] = equivalence(lm, experts[name], batches, drop_fraction=P.drop_fraction, seed=P.seed)
pd.DataFrame(checks).T

# %%
fig = equivalence_figure(checks)
save_figure(fig, "equivalence", P, caption(P, ", ".join(P.models), n_experts=P.n_experts, method=P.method,
                                           dtype=P.dtype, paragraphs=f"{P.check_paragraphs}/language held-out"))
fig.show()
for name, c in checks.items():
    verdict = "reproduces" if c["all_experts"] <= 1e-5 else "does NOT reproduce"
    print(f"{name}: the converted model {verdict} the dense logits (max |diff| {c['all_experts']:.1e} over "
          f"{c['tokens']} tokens, logits up to {c['logit_scale']:.1f}); dropping {P.drop_fraction:.0%} of the "
          f"experts moves them by up to {c['dropped']:.2f}.")

# %% [markdown]
# The partitions are saved under `build/<profile>/artefacts/partition/`; `02_profile` loads them to count
# how often each expert is activated, per language.
