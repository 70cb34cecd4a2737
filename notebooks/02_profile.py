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
# # 02 · Per-language expert activation frequencies
#
# *Unraveling Babel* (Liu et al., EMNLP 2024) reads a dense model's multilingual behaviour off its
# fine-grained experts: for every language, how often is each expert of each layer activated? The result is
# one frequency map per language, layers × experts, and the paper's findings are statements about these maps:
# where high-frequency experts sit, which experts every language shares and which belong to a few languages,
# whether related languages activate similar experts, and what instruction tuning changes.
#
# **Method** (our method card). An expert is a group of a layer's neurons from notebook 01's partition. For a
# token, expert e's score is the sum of its neurons' activations a (the input of the down projection); the
# activated experts are the layer's top `ratio` fraction by score (`rule: topk`; `zscore` is the paper's v1
# cross-layer rule, `threshold` an absolute one). The frequency f[language, layer, expert] is the share of that
# language's text tokens on which the expert is activated; BOS, padding and special tokens never count. The
# profiler (`babel_lib.babel.profiler`) keeps only counters on the device: no token-level activation is stored and
# the LM head never runs. Even and odd paragraphs are counted separately in the same pass, which gives the
# stability check at the end for free.
#
# The same forward also counts the `variants` (the paper's v1 rule: z-normalise each layer's scores, then take
# the top `ratio` of all experts across layers; and sums of |a| beside signed sums) and does all of it a second
# time for experts of about `expert_neurons` = 43 neurons, the paper's size (11,008 / 256), from a second
# partition made like notebook 01's (same method and seed). Our main experts are 8 neurons (Gemma) and 6
# (SmolLM2). Per neuron, the pass counts how often |a_i| exceeds `neuron_scale` times the root mean square of
# that token's activations in the layer: the sign a_i > 0 is a coin flip for gated FFNs.
#
# The corpus is parallel (the same LibreOffice help paragraphs in 17 languages), so differences between
# languages are not differences of topic. All numbers and sentences below are computed by this run; the
# embedded models are 4-bit quantised GGUF weights dequantised to float.

# %% tags=["parameters"]
profile = "default"  # configs/<profile>.yaml
model = ""  # "" = the profile's models; else a model name or a comma-separated list

# %%
import numpy as np
import pandas as pd

from babel_lib.babel import profiler
from babel_lib.babel.analysis import (
    AnalysisParams,
    analyse,
    compare_variants,
    cross_model_findings,
    dendrogram,
    expert_ids,
    frequencies,
    language_table,
    reorder,
    fragmentation_findings,
    fragmentation_table,
    rule_sensitivity,
    script_control,
    script_findings,
    script_table,
    sensitivity_findings,
    variant_findings,
    verdicts,
)
from babel_lib.babel.explorer import PLOTLY_CONFIG, Explorer, load_frequencies
from babel_lib.babel.plots import (
    dendrograms,
    difference_grid,
    fragmentation_bars,
    frequency_explorer,
    frequency_grid,
    high_frequency_layers,
    kernel_free_explorer,
    model_comparison,
    rule_layers,
    shared_specific_layers,
    similarity_matrices,
    stability,
    tau_sensitivity,
    variant_comparison,
)
from babel_lib.babel.profiler import ProfileParams, calibration_sample, save_index, token_fragmentation
from babel_lib.core import config
from babel_lib.core.artefacts import ArtefactStore
from babel_lib.core.figures import caption, save_figure
from babel_lib.core.models import load_model
from babel_lib.core.verdicts import save_verdicts, verdict_table

P = config.notebook_params("02_profile", profile, model)
config.apply_runtime(P)
counting, analysis = P.typed(ProfileParams), P.typed(AnalysisParams)
store = ArtefactStore(P.artefacts)
pd.Series({k: v for k, v in P.items()}).to_frame("value")

# %% [markdown]
# ## Text: evenly spaced calibration paragraphs
#
# `paragraphs` rows of the calibration split (all of it when null), evenly spaced over it (so they come from
# many help pages), each in all languages. The table gives each language's family, genus and script: the
# groupings we test later.

# %%
texts = calibration_sample(P.languages, P.paragraphs, config.text_source(P))
languages = language_table(P.languages)
groups = {g: languages[g].tolist() for g in ("family", "genus", "script")}
languages

# %% [markdown]
# ## Count expert activations per language
#
# Each model is loaded with notebook 01's partition (same `n_experts`, method, seed and iterations; computed
# now if 01 has not run) and profiled once. The counts are an artefact keyed by the model, the partition and
# every setting; `frequencies/index-<run>.json` tells the explorer which file belongs to which model.

# %%
profiles, fragmentation, n_experts = {}, {}, None
for name in P.models:
    lm = load_model(name, P.device, P.dtype)
    parts = profiler.partitions(store, lm, counting, profile, model)
    profiles[name] = profiler.profile(store, lm, parts, counting, texts, split="calibration")
    fragmentation[name] = token_fragmentation(lm.tokenizer, texts)
    n_experts = parts[0].params.n_experts
    del lm, parts
save_index(P.artefacts, P.run, profiles)
pd.DataFrame({name: p.summary() for name, p in profiles.items()})

# %% [markdown]
# ## The analyses
#
# Everything below is computed from the counts by `babel_lib.babel.analysis`. An expert is **high-frequency** in a
# language when f ≥ `tau_high`; **shared** when it is high-frequency in every language; **specific** to a
# language when it is high-frequency there (and in at most `max_specific` languages) and below `tau_low` in
# every other language. Standard errors come from the two paragraph halves (a binomial variance scaled by
# the design effect the halves reveal), and a difference counts as real when it exceeds `noise_z` of them.

# %%
summaries = {name: analyse(p.tensors, P.languages, groups, analysis, seed=P.seed, model=name)
             for name, p in profiles.items()}
details = {"paragraphs": f"{len(texts[P.languages[0]])}/language calibration", "rule": P.rule, "ratio": P.ratio,
           "threshold": P.threshold, "mode": P.mode, "n_experts": n_experts}


# %% [markdown]
# ## Frequency heatmaps
#
# One panel per language: layers are rows, experts columns, colour the activation frequency on a fixed
# [0, 1] scale. Within each layer the experts are sorted by their mean frequency over all languages, and this
# one order is used in every panel, so a column is the same expert everywhere. The HTML version of the second
# figure has a dropdown over languages.

# %%
for name, s in summaries.items():
    fig = frequency_grid(reorder(s.freq, s.order), P.languages, name)
    save_figure(fig, f"frequency_{name}", P, caption(P, name, **details), width=1400, height=900)
    fig.show()
    save_figure(frequency_explorer(reorder(s.freq, s.order), P.languages, name),
                f"frequency_{name}_explorer", P, caption(P, name, **details))

# %%
print("\n".join(f for s in summaries.values() for f in s.frequency_findings()))

# %% [markdown]
# ## Differences between languages
#
# Each language minus the all-language mean, then the closest and the most distant pair of languages (by the
# similarity below). Cells whose difference is within `noise_z` standard errors are left blank, so what is
# coloured is a difference the paragraph sample supports.

# %%
for name, s in summaries.items():
    f, se = s.freq, s.se
    diff = reorder(f - f.mean(0), s.order)
    significant = reorder(np.abs(f - f.mean(0)) > P.noise_z * se, s.order)
    fig = difference_grid(diff, significant, P.languages,
                          f"{name}: language minus the all-language mean (cells beyond {P.noise_z:g} s.e.)")
    save_figure(fig, f"difference_vs_mean_{name}", P, caption(P, name, **details, noise_z=P.noise_z), width=1400, height=900)
    fig.show()
    sim = s.similarity.copy()
    np.fill_diagonal(sim, np.nan)
    pairs = [np.unravel_index(np.nanargmax(sim), sim.shape), np.unravel_index(np.nanargmin(sim), sim.shape)]
    titles = [f"{P.languages[i]} − {P.languages[j]} ({kind})" for (i, j), kind in zip(pairs, ("closest", "farthest"))]
    diffs = np.stack([f[i] - f[j] for i, j in pairs])
    real = np.stack([np.abs(f[i] - f[j]) > P.noise_z * np.hypot(se[i], se[j]) for i, j in pairs])
    fig = difference_grid(reorder(diffs, s.order), reorder(real, s.order), titles,
                          f"{name}: language vs language (cells beyond {P.noise_z:g} s.e.)", cols=2)
    save_figure(fig, f"difference_pairs_{name}", P, caption(P, name, **details, noise_z=P.noise_z), width=1200, height=500)
    fig.show()
    print("\n".join(s.difference_findings()))

# %% [markdown]
# ## High-frequency experts across layers
#
# The fraction of each layer's experts with f ≥ `tau_high`, per language.

# %%
fig = high_frequency_layers({name: s.high / n_experts for name, s in summaries.items()}, P.languages, P.tau_high)
save_figure(fig, "high_frequency_layers", P, caption(P, ", ".join(summaries), **details, tau_high=P.tau_high), width=1300, height=600)
fig.show()
print("\n".join(f for s in summaries.values() for f in s.high_findings()))

# %% [markdown]
# ## Shared and language-specific experts
#
# Per layer: how many experts are high-frequency in every language (shared), and how many are specific to one
# language (or at most `max_specific`), stacked by language (an expert specific to two languages counts for
# both). The table lists each language's specific experts as layer:expert.

# %%
fig = shared_specific_layers({n: s.shared_per_layer for n, s in summaries.items()},
                             {n: s.specific.sum(-1) for n, s in summaries.items()}, P.languages, n_experts)
save_figure(fig, "shared_specific_layers", P, caption(P, ", ".join(summaries), **details, tau_high=P.tau_high, tau_low=P.tau_low,
                                                   max_specific=P.max_specific), width=1300, height=750)
fig.show()
print("\n".join(f for s in summaries.values() for f in s.shared_findings()))

# %%
tables = {}
for name, s in summaries.items():
    tables[name] = pd.DataFrame({
        "specific experts": s.specific.sum((1, 2)),
        "layers holding them": [", ".join(map(str, np.flatnonzero(sp.any(-1)))) for sp in s.specific],
        "first (layer, expert)": [", ".join(f"{l}:{e}" for l, e in expert_ids(sp)[:6]) for sp in s.specific],
    }, index=P.languages)
pd.concat(tables, axis=1)

# %% [markdown]
# ## How much do the shares depend on the rule, the score and the expert size?
#
# Per-layer top-k gives every layer the same budget (`ratio` of its experts per token), so it cannot say in
# which layers high-frequency experts sit, and with small experts a layer's budget is spread thin. The table
# compares every counting of the pass: the rule (`topk` per layer, `zscore` the paper's cross-layer rule), the
# score (`sum` of a, `abs` sum of |a|), and the expert size (experts × neurons per expert; the last row is the
# per-neuron magnitude rule). For each: the shared fraction (f ≥ `tau_high` in every language) and the dormant
# fraction (f < `tau_rare` in every language) with their split-half s.e., the largest τ at which half the experts
# are shared and the frequency below which 12.2% (the paper's 1,000 of 8,192) are dormant, where high-frequency
# experts peak, and the range of the layers' budgets (mean frequency of the layer over the overall mean: 1 for
# per-layer top-k). The figures sweep τ over `tau_grid` and show the high-frequency experts per layer.

# %%
rules = {name: rule_sensitivity(p.tensors, p.meta, analysis) for name, p in profiles.items()}
display(pd.concat({n: r.table for n, r in rules.items()}).round(4))
fig = tau_sensitivity({n: r.curves for n, r in rules.items()}, analysis.tau_grid,
                      {n: r.paper for n, r in rules.items()}, {"shared": 0.5, "dormant": 1000 / 8192})
save_figure(fig, "tau_sensitivity", P, caption(P, ", ".join(rules), paragraphs=details["paragraphs"],
                                                ratio=P.ratio, neuron_scale=P.neuron_scale,
                                                specific_low=f"{P.tau_low / P.tau_high:g}τ"),
            width=1400, height=750)
fig.show()
fig = rule_layers({n: r.high_per_layer for n, r in rules.items()}, P.tau_high)
save_figure(fig, "rule_layers", P, caption(P, ", ".join(rules), paragraphs=details["paragraphs"], ratio=P.ratio,
                                            tau_high=P.tau_high),
            width=1300, height=750)
fig.show()
print("\n".join(f for n, r in rules.items() for f in sensitivity_findings(n, r.table, r.paper)))

# %% [markdown]
# ## Language similarity and language families
#
# Similarity of two languages is the `similarity` metric of their flattened frequency maps (with
# `center: true`, of their deviations from the all-language mean, so the common expert popularity does not
# make every pair look alike). Average-linkage clustering on 1 − similarity gives the dendrogram. The
# agreement with known groupings is a number: the mean similarity within a group minus across groups, with a
# permutation p-value (labels shuffled over languages), and the adjusted Rand index between the families and
# the dendrogram cut into as many clusters. Script is a control: languages sharing a script share tokens.

# %%
fig = similarity_matrices({n: s.similarity for n, s in summaries.items()}, P.languages,
                          P.similarity + (" of deviations from the mean" if P.center else ""))
save_figure(fig, "similarity", P, caption(P, ", ".join(summaries), **details, similarity=P.similarity, center=P.center),
            width=1300, height=620)
fig.show()
trees = {n: dendrogram(s.linkage, P.languages) for n, s in summaries.items()}
fig = dendrograms(trees, dict(zip(P.languages, groups["family"])), "Average-linkage clustering of languages, "
                  "leaves coloured by family")
save_figure(fig, "dendrogram", P, caption(P, ", ".join(summaries), **details, similarity=P.similarity, center=P.center),
            width=1400, height=600)
fig.show()

# %%
agreement = pd.DataFrame([{"model": n, "grouping": g, **{k: a[k] for k in ("within", "across", "gap", "p_value")},
                           "within pairs": a["within_pairs"]}
                          for n, s in summaries.items() for g, a in s.agreement.items()])
agreement = agreement.set_index(["model", "grouping"])
display(agreement.round(4))
print("\n".join(f for s in summaries.values() for f in s.family_findings(P.alpha)))

# %% [markdown]
# ## Family or script?
#
# Languages of one family often share a script, and a shared script means shared tokens, so a family effect can
# be a script effect. Three checks hold script fixed: the family gap among the languages of the largest script
# (on the default run the twelve Latin-script languages, of six families); partial
# Mantel tests of activation similarity against "same family" after regressing out "same script" (and
# tokenizer fragmentation), with permutation p-values; and the adjusted Rand index of the dendrogram against
# families and against scripts. Fragmentation is how many tokens each tokenizer needs for the same paragraphs
# (tokens per English token, and per character): a language cut into many short tokens may look alike to others
# cut the same way whatever its family.

# %%
frag = fragmentation_table(fragmentation)
display(frag.round(3))
fig = fragmentation_bars({n: f["ratio_to_reference"] for n, f in fragmentation.items()}, P.languages,
                         next(iter(fragmentation.values()))["reference"])
save_figure(fig, "fragmentation", P, caption(P, ", ".join(fragmentation), paragraphs=details["paragraphs"]),
            width=1200, height=500)
fig.show()
print("\n".join(fragmentation_findings(fragmentation)))
controls = {n: script_control(s.similarity, groups, fragmentation[n]["ratio_to_reference"], s.linkage,
                              P.n_permutations, P.seed) for n, s in summaries.items()}
display(script_table(controls))
print("\n".join(f for n, c in controls.items() for f in script_findings(n, c, P.alpha)))

# %% [markdown]
# ## Stability: which differences are real?
#
# The even and the odd paragraphs were profiled as separate samples. If the maps are reliable the two halves
# agree (split-half correlation; Spearman-Brown gives the reliability of the full sample), and the structure
# between languages survives too (the similarity matrices of the two halves correlate).

# %%
fig = stability({n: s.split_half for n, s in summaries.items()},
                {n: s.beyond_noise_vs_mean for n, s in summaries.items()}, P.languages, P.noise_z)
save_figure(fig, "stability", P, caption(P, ", ".join(summaries), **details, noise_z=P.noise_z), width=1200, height=650)
fig.show()
print("\n".join(f for s in summaries.values() for f in s.stability_findings()))

# %% [markdown]
# ## The two models side by side
#
# The models differ in family (Gemma 3 vs LLaMA-style SmolLM2), depth and width, and one is a base model while
# the other is instruction-tuned, so findings are compared as statements: each row is computed per model, and
# `holds in all` says whether it is true for every model.

# %%
if len(summaries) >= 2:
    findings = cross_model_findings(summaries, alpha=P.alpha, n_permutations=P.n_permutations, seed=P.seed)
    display(findings)
    per_layer = {"shared": {n: s.shared_per_layer / n_experts for n, s in summaries.items()},
                 "high-frequency": {n: s.high.mean(0) / n_experts for n, s in summaries.items()}}
    fig = model_comparison({n: s.similarity for n, s in summaries.items()}, P.languages, per_layer)
    save_figure(fig, "model_comparison", P, caption(P, ", ".join(summaries), **details, similarity=P.similarity, tau_high=P.tau_high),
                width=1300, height=600)
    fig.show()
    both = findings.index[findings["holds in all"]].tolist()
    print(f"{len(both)} of {len(findings)} findings hold in every model:" + "".join(
        f"\n  - {f} ({'; '.join(f'{m}: {findings.loc[f, m]}' for m in summaries)})" for f in both))
else:
    print("Only one model is profiled in this run; the side-by-side comparison needs two.")

# %% [markdown]
# ## Instruction tuning
#
# For a base/instruct pair of one model (`instruct_pairs` in the profile), both variants are profiled with the
# **base** model's partition, so an expert is the same set of neurons in both, and compared layer by layer.

# %%
if not P.instruct_pairs:
    print("No base/instruct pair is configured in this profile (the embedded default ships one base and one "
          "instruct model of different families), so this section is skipped. Set instruct_pairs: "
          "[[<base>, <instruct>]] in configs/<profile>.yaml to run it.")
variants = {}
for base_name, instruct_name in P.instruct_pairs:
    base = load_model(base_name, P.device, P.dtype)
    parts = profiler.partitions(store, base, counting, profile, model)
    freq = {lm.name: frequencies(*(profiler.profile(store, lm, parts, counting, texts, split="calibration").tensors[k]
                                   for k in ("expert_counts", "tokens")))
            for lm in (base, load_model(instruct_name, P.device, P.dtype))}
    variants[f"{base_name} → {instruct_name}"] = compare_variants(freq[base_name], freq[instruct_name], P.tau_high)
print("\n".join(variant_findings(variants)))
if variants:
    fig = variant_comparison(variants)
    save_figure(fig, "instruction_tuning", P, caption(P, ", ".join(variants), **details), width=1200, height=500)
    fig.show()

# %% [markdown]
# ## Verdicts
#
# Each claim of the paper that this notebook can test, the paper's own number (its v1 figures for LLaMA-2-7B),
# ours with its uncertainty (split-half standard error, permutation p), and the verdict by the rule written
# next to it.

# %%
results = verdicts(summaries, rules, controls, P.alpha, variants)
save_verdicts(P, results)
verdict_table(results)

# %% [markdown]
# ## Explore
#
# The explorer below reads the frequency artefacts this notebook saved: pick a model, a language (or its
# difference to the mean of all languages, or to another language), a range of layers, the expert order, the
# colour scale and whether differences within `noise_z` standard errors are blanked; click a cell for that
# expert across languages and layers; download the displayed matrix as CSV. Its controls need a kernel
# (JupyterLab, or `make explore` for a standalone app); the rendered HTML shows the kernel-free heatmap after it.
#
# The artefacts (`build/<profile>/artefacts/frequencies/`, listed in `index-<run>.json`) hold the counts per
# language, layer and expert under every counting, the per-neuron counts (a neuron counts as active when |a| is
# above `neuron_scale` times the token's RMS in the layer) and the split-half counts; notebook 05 (pruning) reads
# them too.

# %%
Explorer(load_frequencies(P.artefacts, P.run), noise_z=P.noise_z, source=f"run {P.run}")

# %% [markdown]
# A kernel-free version (works in the rendered HTML, offline): a slider over languages and a dropdown between
# the frequency and the difference to the all-language mean, cells within `noise_z` standard errors blank.

# %%
for name, s in summaries.items():
    diff = np.where(np.abs(s.freq - s.freq.mean(0)) > P.noise_z * s.se, s.freq - s.freq.mean(0), np.nan)
    kernel_free_explorer(reorder(s.freq, s.order), reorder(diff, s.order), P.languages, name,
                         P.noise_z).show(config=PLOTLY_CONFIG)
