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
# # 05 · Expert pruning guided by per-language activation frequencies
#
# *Unraveling Babel*'s applications: if a language activates some experts rarely, removing them should cost that
# language little. The paper claims that frequency-guided pruning beats random pruning, that in some languages it
# even beats the unpruned model, and that per-layer rates set from activation differences beat one uniform rate;
# its first version reports about 30% faster inference at comparable quality.
#
# **Method.** Notebook 01's partition gives the experts, notebook 02's counts give each language's frequency
# f[layer, expert]. Pruning language L at rate ρ removes, in every layer, the round(ρ·E) experts with the lowest
# f_L; the **random** baseline removes as many experts per layer, drawn at random (several seeds, mean ± std);
# **layer-adaptive** rates prune more in layers whose frequencies concentrate on few experts (1 − normalised
# entropy of the layer's frequencies; same total number pruned; rule in `babel_lib.babel.pruning.adaptive_counts`).
# **Dynamic** sparsity keeps, per token and layer, only the top-k experts by the profiler's score. A static
# pruning is applied as a mask on the down projection's input; the **sliced** model, which holds only the kept
# neurons' weights, computes the same logits (tested to 1e-5) and is what the speed section times.
#
# Perplexity is the one path of the project (`window_loss`, chunked LM head) on held-out windows of a fixed
# `seq_len`. **Sizes.** On the default CPU profile Gemma-3-270M evaluates ~125 tokens/s (its 262k-token LM head
# dominates), so each model sees 4 languages of 4 scripts × 2 windows of 128 tokens, 3 rates, 3 random seeds and
# 3 dynamic ratios: about 25 evaluations per language, within a ~5-minute budget. Small evaluation sets make
# per-language differences of a few percent uncertain: the random seeds' spread is the yardstick below. The gpu
# profile evaluates all 17 languages on 16 windows of 512 tokens.

# %% tags=["parameters"]
profile = "default"  # configs/<profile>.yaml
model = ""  # "" = the profile's models; else a model name or a comma-separated list

# %%
import time

import numpy as np
import pandas as pd

from babel_lib.babel import pruning_plots as plots
from babel_lib.babel.conversion import run_partition
from babel_lib.babel.pruning import Frequencies
from babel_lib.babel.pruning_study import PruneParams, prune, sliced_speed, verdicts
from babel_lib.core import config
from babel_lib.core.artefacts import ArtefactStore
from babel_lib.core.batches import windows
from babel_lib.core.figures import caption, save_figure
from babel_lib.core.models import load_model
from babel_lib.core.verdicts import save_verdicts, verdict_table

P = config.notebook_params("05_prune", profile, model)
config.apply_runtime(P)
store = ArtefactStore(P.artefacts)
params = P.typed(PruneParams)
started = time.perf_counter()
pd.Series(dict(P)).to_frame("value")

# %% [markdown]
# ## Evaluate every pruning
#
# Each model is loaded with notebook 01's partition and notebook 02's frequencies (an error names the notebook to
# run when they are missing or were made with other settings). One study call per model evaluates every pruning
# on the held-out windows and caches the losses as an artefact; a second call times the decoder body of sliced
# models (frequency-guided, English) against the dense one on this machine.

# %%
heldout = config.text_source(P).load(params.eval_languages, "heldout", params.paragraphs)
texts = {lang: heldout[lang] for lang in params.eval_languages}
results, speeds = [], []
for name in P.models:
    lm = load_model(name, P.device, P.dtype)
    part = run_partition(store, lm, profile, model)  # notebook 01's partition (computed now if 01 has not run)
    experts, n_experts = part.experts, part.experts.n_experts
    freqs = Frequencies.of_run(P.artefacts, P.run, name)
    results.append(prune(store, lm, experts, freqs, part.params.as_dict(), texts, params))
    ids = windows(lm.tokenizer, texts[params.eval_languages[0]], params.speed_tokens, 1)
    speeds.append(sliced_speed(lm, experts, freqs.of(params.eval_languages[0]), ids, params))
    del lm, experts
details = {"seq_len": params.seq_len, "windows": f"{params.windows_per_language}/language held-out",
           "n_experts": n_experts}
pd.DataFrame({r.model: {"languages": ", ".join(r.languages), "predicted tokens per language": r.tokens[0],
                        "rates": ", ".join(f"{x:.0%}" for x in r.rates), "random seeds": r.random.shape[1]}
              for r in results})

# %% [markdown]
# ## Perplexity vs pruning rate, per language
#
# Frequency-guided pruning (each language pruned with its own frequencies; uniform and layer-adaptive counts)
# against random pruning with the same per-layer counts (mean ± one standard deviation over seeds) and the unpruned
# model (dotted). The first finding counts where the frequency-guided curve lies below the random mean, and where
# it lies below the random band by more than two seed standard deviations.

# %%
for r in results:
    fig = plots.rate_curves(r)
    save_figure(fig, f"rate_curves_{r.model}", P, caption(P, r.model, **details, seeds=params.random_seeds))
    fig.show()
for r in results:
    for line in r.findings()[:2]:
        print(line)

# %% [markdown]
# ## Uniform vs layer-adaptive rates at the same total
#
# The green curves above: the same number of experts pruned in total, distributed over layers by how concentrated
# each layer's frequencies are. The table gives the perplexity ratio adaptive / uniform per language and rate
# (below 1: adaptive is better).

# %%
pd.concat({r.model: pd.DataFrame(np.exp(r.adaptive - r.frequency), index=[f"{x:.0%}" for x in r.rates],
                                 columns=r.languages).round(3) for r in results})

# %%
for r in results:
    print(r.findings()[2])

# %% [markdown]
# ## Cross-lingual matrix
#
# Prune with language A's frequencies (rows) and evaluate on language B (columns), at one rate; each cell is the
# perplexity divided by B's unpruned perplexity. If experts were language-specific, the diagonal would be the best
# cell of every column.

# %%
fig = plots.cross_matrix(results)
save_figure(fig, "cross_lingual", P, caption(P, ", ".join(P.models), **details, rate=params.cross_rate))
fig.show()
for r in results:
    print(r.findings()[3])

# %% [markdown]
# ## Dynamic expert sparsity beside static pruning
#
# Dynamic top-k chooses the experts per token from the activation itself (it needs the full activation first, so
# by itself it saves no FFN input computation); static pruning chooses once per language. Both are plotted against
# the share of experts kept, as the median over languages of the perplexity ratio to the unpruned model.

# %%
fig = plots.dynamic_vs_static(results)
save_figure(fig, "dynamic_vs_static", P, caption(P, ", ".join(P.models), **details))
fig.show()
for r in results:
    for line in r.findings()[4:]:
        print(line)

# %% [markdown]
# ## The sliced model's speed on this machine
#
# Sliced models (frequency-guided, first evaluation language) hold fewer FFN weights; the decoder body (no LM
# head) is timed on one window of `speed_tokens` tokens, fastest of `speed_repeats` forwards after a warm-up. The
# ideal speed-up keeps everything outside the FFN unchanged and scales the FFN's measured time share by the kept
# fraction. `benchmarks/pruning.py` measures the same on an H200 at LLaMA-2-7B shape.

# %%
fig = plots.speed(speeds)
save_figure(fig, "speed", P, caption(P, ", ".join(P.models), tokens=params.speed_tokens))
fig.show()
for s in speeds:
    print(s.findings()[0])

# %% [markdown]
# ## Verdicts
#
# The paper's application claims (../shared/papers/babel.md, summary point 3 and the v1 details) beside our
# numbers, each decided by the rule in its row.

# %%
table = verdicts(results, speeds)
save_verdicts(P, table)
print(f"notebook 05 computed in {time.perf_counter() - started:.0f} s")
verdict_table(table)
