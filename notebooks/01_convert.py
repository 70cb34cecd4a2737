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
# contiguous baselines, measures what the conversion is for (the perplexity of the routed model when each token
# runs only its top experts), and saves the partition for the next notebooks. All results below are computed by
# this run; the embedded models are 4-bit quantised GGUF weights, dequantised to float (every caption says so).

# %% tags=["parameters"]
# profile: configs/<profile>.yaml; model: empty for the profile's models, else a name or a comma-separated list
profile = "default"
model = ""

# %%
import pandas as pd

from babel_lib.babel.conversion import (
                                        ConvertParams,
                                        check_equivalence,
                                        convert,
                                        model_table,
                                        routed_perplexity,
                                        verdicts,
)
from babel_lib.babel.plots import cohesion_figure, equivalence_figure, routed_figure
from babel_lib.core import config
from babel_lib.core.artefacts import ArtefactStore
from babel_lib.core.figures import caption, save_figure
from babel_lib.core.models import load_model
from babel_lib.core.verdicts import save_verdicts, verdict_table

P = config.notebook_params("01_convert", profile, model)
config.apply_runtime(P)
params = P.typed(ConvertParams)
store = ArtefactStore(P.artefacts)
pd.Series({k: v for k, v in P.items()}).to_frame("value")

# %% [markdown]
# ## The models and their feed-forward layers
#
# The FFN adapter (`babel_lib.core.ffn`) knows, per architecture, where each layer's FFN is, whether it is gated,
# and which module receives the neuron activation (the down projection's input).

# %%
models = {name: load_model(name, P.device, P.dtype) for name in P.models}
model_table(models, params.n_experts)

# %% [markdown]
# ## Partition every layer
#
# Balanced k-means gives every expert exactly `d_ff / n_experts` neurons (sizes differ by at most one when
# `n_experts` does not divide `d_ff`). The partitions are artefacts keyed by the model's fingerprint and the
# parameters, so re-running reuses them and the next notebooks load them.
#
# Cohesion is the mean pairwise cosine similarity of the clustered rows inside an expert. A random
# partition sits near zero; clustering should lift every layer above it.

# %%
conversion = convert(store, models, params, seed=P.seed, languages=P.languages, source=config.text_source(P))
display(conversion.table())
fig = cohesion_figure(conversion.cohesion)
save_figure(fig, "cohesion", P, caption(P, ", ".join(P.models), n_experts=P.n_experts, method=P.method,
                                        iters=P.kmeans_iters, baselines="/".join(P.baselines)))
fig.show()
print("\n".join(conversion.findings()))

# %% [markdown]
# ## The converted model with every expert active
#
# The converted model routes every token through its experts: at each layer the neuron activations are
# scaled by their expert's gate. With every gate at 1 the output equals the dense model's by construction, so
# this is a check of the routing hooks (also a test), not a finding; as a control, dropping a random share of
# each layer's experts must change the logits. Tokens: held-out paragraphs of every language.

# %%
checks = check_equivalence(models, conversion, params, P.languages, seed=P.seed, source=config.text_source(P))
display(checks.table())
fig = equivalence_figure(checks.checks)
save_figure(fig, "equivalence", P, caption(P, ", ".join(P.models), n_experts=P.n_experts, method=P.method,
                                           dtype=P.dtype, paragraphs=f"{P.check_paragraphs}/language held-out"))
fig.show()
print("\n".join(checks.findings()))

# %% [markdown]
# ## What the conversion is for: running only the top experts
#
# A mixture of experts saves compute by running, per token, only the experts that matter. Here each token
# keeps, in every layer, the experts whose score (the sum of their neurons' activations) is among the top
# `routed_fractions` share, and the others are dropped; the control keeps the same share of experts chosen at
# random (fixed per layer). The y-axis is the perplexity over the dense model's on held-out windows of every
# language; error bars are standard errors of the per-window paired differences.

# %%
routed = routed_perplexity(models, conversion, params, P.languages, seed=P.seed, source=config.text_source(P))
display(routed.table())
fig = routed_figure(routed)
save_figure(fig, "routed_perplexity", P, caption(P, ", ".join(P.models), n_experts=P.n_experts, method=P.method,
                                                 windows=f"{P.routed_windows}/language x {P.routed_seq_len} tokens "
                                                 "held-out"), width=1200, height=500)
fig.show()
print("\n".join(routed.findings()))

# %% [markdown]
# ## Verdicts
#
# Each claim of the paper that this notebook can test, the paper's own number, ours with its uncertainty, and
# the verdict by the rule written next to it. The partitions are saved under
# `build/<profile>/artefacts/partition/`; `02_profile` loads them to count how often each expert is activated.

# %%
results = verdicts(conversion, routed)
save_verdicts(P, results)
verdict_table(results)
