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
# The corpus is parallel (the same LibreOffice help paragraphs in 17 languages), so differences between
# languages are not differences of topic. All numbers and sentences below are computed by this run; the
# embedded models are 4-bit quantised GGUF weights dequantised to float.

# %% tags=["parameters"]
profile = "default"  # configs/<profile>.yaml
model = ""  # "" = the profile's models; else a model name or a comma-separated list

# %%
from pathlib import Path

import numpy as np
import pandas as pd

from babel_lib.core import config
from babel_lib.babel.analysis import (compare_variants, cross_model_findings, dendrogram, expert_ids, frequencies,
                                reorder, spearman_brown, summarize)
from babel_lib.core.artefacts import ArtefactStore
from babel_lib.core.batches import paragraph_batches
from babel_lib.babel.conversion import partition_model, partition_params
from babel_lib.data.corpus import load_corpus
from babel_lib.babel.explorer import PLOTLY_CONFIG, Explorer, load_frequencies, write_frequency_index
from babel_lib.core.figures import caption, save_figure
from babel_lib.data.languages import language
from babel_lib.core.models import load_model
from babel_lib.babel.plots import (dendrograms, difference_grid, frequency_explorer, frequency_grid,
                                     high_frequency_layers, kernel_free_explorer, model_comparison, shared_specific_layers,
                                     similarity_matrices, stability, variant_comparison)
from babel_lib.babel.profiler import cached_profile

P = config.notebook_params("02_profile", profile, model)
config.apply_runtime(P)
store = ArtefactStore(P.artefacts)
P1 = config.notebook_params("01_convert", profile, model)  # the partition notebook 01 made
pd.Series({k: v for k, v in P.items()}).to_frame("value")

# %% [markdown]
# ## Text: evenly spaced calibration paragraphs
#
# `paragraphs` rows of the calibration split (all of it when null), evenly spaced over it (so they come from
# many help pages), each in all languages. The table gives each language's family, genus and script: the
# groupings we test later.

# %%
calibration = load_corpus(P.languages, split="calibration")
rows = np.linspace(0, len(calibration) - 1, min(P.paragraphs or len(calibration), len(calibration))).round().astype(int)
sample = calibration.select(sorted(set(rows.tolist())))
texts = {lang: sample[lang] for lang in P.languages}
meta_langs = pd.DataFrame([vars(language(code)) for code in P.languages]).set_index("code")
groups = {"family": meta_langs["family"].tolist(), "genus": meta_langs["genus"].tolist(),
          "script": meta_langs["script"].tolist()}
meta_langs[["name", "family", "genus", "script"]]

# %% [markdown]
# ## Count expert activations per language
#
# Each model is loaded with notebook 01's partition (same `n_experts`, method, seed and iterations; computed
# now if 01 has not run) and profiled once. The counts are an artefact keyed by the model, the partition and
# every setting; `frequencies/index-<run>.json` tells the explorer which file belongs to which model.

# %%
def coactivation_batches(lm):
    """Notebook 01's calibration text, read only when the partition method is "coactivation"."""
    if P1.method != "coactivation":
        return None
    corpus = load_corpus(P.languages, split="calibration", limit=P1.calibration_paragraphs)
    return paragraph_batches(lm.tokenizer, [t for lang in P.languages for t in corpus[lang]])


settings = {"rule": P.rule, "ratio": P.ratio, "threshold": P.threshold, "mode": P.mode}
details = {"paragraphs": f"{len(sample)}/language calibration", **settings, "n_experts": P1.n_experts}
profiles, metas, index, cards = {}, {}, {}, {}
for name in P.models:
    lm = load_model(name, P.device, P.dtype)
    experts = partition_model(lm, P1.n_experts, P1.method, seed=P1.seed, iters=P1.kmeans_iters, store=store,
                              calibration=coactivation_batches(lm))
    partition = partition_params(lm, P1.n_experts, P1.method, P1.seed, P1.kmeans_iters)
    profiles[name], metas[name], path = cached_profile(store, lm, experts, partition, texts, split="calibration",
                                                       max_length=P.max_length, batch_tokens=P.batch_tokens,
                                                       compile=P.compile, **settings)
    index[name], cards[name] = str(path), lm.card
    del lm, experts
write_frequency_index(P.artefacts, P.run, index)
pd.DataFrame({name: {"layers": m["expert_counts"].shape[1], "experts per layer": m["expert_counts"].shape[2],
                     "tokens counted": int(m["tokens"].sum()),
                     "tokens per language (min–max)": f"{int(m['tokens'].min())}–{int(m['tokens'].max())}",
                     "artefact": Path(index[name]).name}
              for name, m in profiles.items()})

# %% [markdown]
# ## The analyses
#
# Everything below is computed from the counts by `babel_lib.babel.analysis`. An expert is **high-frequency** in a
# language when f ≥ `tau_high`; **shared** when it is high-frequency in every language; **specific** to a
# language when it is high-frequency there (and in at most `max_specific` languages) and below `tau_low` in
# every other language. Standard errors come from the two paragraph halves (a binomial variance scaled by
# the design effect the halves reveal), and a difference counts as real when it exceeds `noise_z` of them.

# %%
summaries = {name: summarize(p["expert_counts"], p["tokens"], p["expert_counts_halves"], p["tokens_halves"],
                             P.languages, groups, tau_high=P.tau_high, tau_low=P.tau_low, metric=P.similarity,
                             center=P.center, max_specific=P.max_specific, n_permutations=P.n_permutations,
                             seed=P.seed, z=P.noise_z)
             for name, p in profiles.items()}


def cap(name, **extra):
    return caption(P, name, **details, **extra)


# %% [markdown]
# ## Frequency heatmaps
#
# One panel per language: layers are rows, experts columns, colour the activation frequency on a fixed
# [0, 1] scale. Within each layer the experts are sorted by their mean frequency over all languages, and this
# one order is used in every panel, so a column is the same expert everywhere. The HTML version of the second
# figure has a dropdown over languages.

# %%
for name, s in summaries.items():
    fig = frequency_grid(reorder(s["freq"], s["order"]), P.languages, name)
    save_figure(fig, f"frequency_{name}", P, cap(name), width=1400, height=900)
    fig.show()
    save_figure(frequency_explorer(reorder(s["freq"], s["order"]), P.languages, name),
                f"frequency_{name}_explorer", P, cap(name))

# %%
for name, s in summaries.items():
    f = s["freq"]
    per_expert = f.mean(0)
    print(f"{name}: the mean frequency is {f.mean():.3f} (rule {P.rule}, ratio {P.ratio}); "
          f"{(per_expert >= P.tau_high).mean():.1%} of experts have a mean frequency ≥ {P.tau_high}, the busiest is "
          f"activated on {f.max():.0%} of a language's tokens, and {(f.max(0) < 0.01).mean():.1%} are activated on "
          f"fewer than 1% of the tokens of every language.")

# %% [markdown]
# ## Differences between languages
#
# Each language minus the all-language mean, then the closest and the most distant pair of languages (by the
# similarity below). Cells whose difference is within `noise_z` standard errors are left blank, so what is
# coloured is a difference the paragraph sample supports.

# %%
for name, s in summaries.items():
    f, se = s["freq"], s["se"]
    diff = reorder(f - f.mean(0), s["order"])
    significant = reorder(np.abs(f - f.mean(0)) > P.noise_z * se, s["order"])
    fig = difference_grid(diff, significant, P.languages,
                          f"{name}: language minus the all-language mean (cells beyond {P.noise_z:g} s.e.)")
    save_figure(fig, f"difference_vs_mean_{name}", P, cap(name, noise_z=P.noise_z), width=1400, height=900)
    fig.show()
    sim = s["similarity"].copy()
    np.fill_diagonal(sim, np.nan)
    pairs = [np.unravel_index(np.nanargmax(sim), sim.shape), np.unravel_index(np.nanargmin(sim), sim.shape)]
    titles = [f"{P.languages[i]} − {P.languages[j]} ({kind})" for (i, j), kind in zip(pairs, ("closest", "farthest"))]
    diffs = np.stack([f[i] - f[j] for i, j in pairs])
    real = np.stack([np.abs(f[i] - f[j]) > P.noise_z * np.hypot(se[i], se[j]) for i, j in pairs])
    fig = difference_grid(reorder(diffs, s["order"]), reorder(real, s["order"]), titles,
                          f"{name}: language vs language (cells beyond {P.noise_z:g} s.e.)", cols=2)
    save_figure(fig, f"difference_pairs_{name}", P, cap(name, noise_z=P.noise_z), width=1200, height=500)
    fig.show()
    beyond = pd.Series(s["beyond_noise_vs_mean"], index=P.languages)
    pair = s["pairwise_beyond_noise"]
    print(f"{name}: the share of cells that differ from the all-language mean beyond noise ranges from "
          f"{beyond.min():.1%} ({beyond.idxmin()}) to {beyond.max():.1%} ({beyond.idxmax()}); the closest pair "
          f"{titles[0].split(' (')[0]} differs in {pair[pairs[0]]:.1%} of cells, the farthest pair "
          f"{titles[1].split(' (')[0]} in {pair[pairs[1]]:.1%}.")

# %% [markdown]
# ## High-frequency experts across layers
#
# The fraction of each layer's experts with f ≥ `tau_high`, per language.

# %%
n_experts = P1.n_experts
fig = high_frequency_layers({name: s["high"] / n_experts for name, s in summaries.items()}, P.languages, P.tau_high)
save_figure(fig, "high_frequency_layers", P, cap(", ".join(summaries), tau_high=P.tau_high), width=1300, height=600)
fig.show()
for name, s in summaries.items():
    per_layer = s["high"].mean(0)
    print(f"{name}: on average {per_layer.mean():.1f} of {n_experts} experts per layer are high-frequency; the most in "
          f"layer {int(per_layer.argmax())} ({per_layer.max():.1f}), the fewest in layer {int(per_layer.argmin())} "
          f"({per_layer.min():.1f}). Across languages the total ranges from {int(s['high'].sum(1).min())} "
          f"({P.languages[int(s['high'].sum(1).argmin())]}) to {int(s['high'].sum(1).max())} "
          f"({P.languages[int(s['high'].sum(1).argmax())]}).")

# %% [markdown]
# ## Shared and language-specific experts
#
# Per layer: how many experts are high-frequency in every language (shared), and how many are specific to one
# language (or at most `max_specific`), stacked by language (an expert specific to two languages counts for
# both). The table lists each language's specific experts as layer:expert.

# %%
fig = shared_specific_layers({n: s["shared_per_layer"] for n, s in summaries.items()},
                             {n: s["specific"].sum(-1) for n, s in summaries.items()}, P.languages, n_experts)
save_figure(fig, "shared_specific_layers", P, cap(", ".join(summaries), tau_high=P.tau_high, tau_low=P.tau_low,
                                                   max_specific=P.max_specific), width=1300, height=750)
fig.show()
for name, s in summaries.items():
    total = s["freq"].shape[1] * n_experts
    print(f"{name}: {int(s['shared'].sum())} of {total} experts ({s['shared'].mean():.1%}) are shared by all "
          f"{len(P.languages)} languages, most in layer {int(s['shared_per_layer'].argmax())}; language-specific "
          f"(high in at most {P.max_specific} language(s), below {P.tau_low} in all others): "
          f"{int(s['specific'].any(0).sum())}.")

# %%
tables = {}
for name, s in summaries.items():
    tables[name] = pd.DataFrame({
        "specific experts": s["specific"].sum((1, 2)),
        "layers holding them": [", ".join(map(str, np.flatnonzero(sp.any(-1)))) for sp in s["specific"]],
        "first (layer, expert)": [", ".join(f"{l}:{e}" for l, e in expert_ids(sp)[:6]) for sp in s["specific"]],
    }, index=P.languages)
pd.concat(tables, axis=1)

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
fig = similarity_matrices({n: s["similarity"] for n, s in summaries.items()}, P.languages,
                          P.similarity + (" of deviations from the mean" if P.center else ""))
save_figure(fig, "similarity", P, cap(", ".join(summaries), similarity=P.similarity, center=P.center),
            width=1300, height=620)
fig.show()
trees = {n: dendrogram(s["linkage"], P.languages) for n, s in summaries.items()}
fig = dendrograms(trees, dict(zip(P.languages, groups["family"])), "Average-linkage clustering of languages, "
                  "leaves coloured by family")
save_figure(fig, "dendrogram", P, cap(", ".join(summaries), similarity=P.similarity, center=P.center),
            width=1400, height=600)
fig.show()

# %%
agreement = pd.DataFrame([{"model": n, "grouping": g, **{k: a[k] for k in ("within", "across", "gap", "p_value")},
                           "within pairs": a["within_pairs"]}
                          for n, s in summaries.items() for g, a in s["agreement"].items()])
agreement = agreement.set_index(["model", "grouping"])
display(agreement.round(4))
for name, s in summaries.items():
    fam = s["agreement"]["family"]
    verdict = "are" if fam["p_value"] < P.alpha else "are not significantly"
    print(f"{name}: languages of one family {verdict} more similar than languages of different families "
          f"(within {fam['within']:.3f} vs across {fam['across']:.3f}, permutation p = {fam['p_value']:.4f}, "
          f"{fam['n_permutations']} permutations); the dendrogram cut into {len(set(groups['family']))} clusters "
          f"matches the families with ARI = {s['ari']:.2f}. Script: gap {s['agreement']['script']['gap']:+.3f}, "
          f"p = {s['agreement']['script']['p_value']:.4f}.")

# %% [markdown]
# ## Stability: which differences are real?
#
# The even and the odd paragraphs were profiled as separate samples. If the maps are reliable the two halves
# agree (split-half correlation; Spearman-Brown gives the reliability of the full sample), and the structure
# between languages survives too (the similarity matrices of the two halves correlate).

# %%
fig = stability({n: s["split_half"] for n, s in summaries.items()},
                {n: s["beyond_noise_vs_mean"] for n, s in summaries.items()}, P.languages, P.noise_z)
save_figure(fig, "stability", P, cap(", ".join(summaries), noise_z=P.noise_z), width=1200, height=650)
fig.show()
for name, s in summaries.items():
    r = s["split_half"]
    print(f"{name}: split-half r is {r.min():.3f} ({P.languages[int(r.argmin())]}) to {r.max():.3f}; full-sample "
          f"reliability ≥ {spearman_brown(r).min():.3f}. Design effect "
          f"{s['deff'].min():.1f}–{s['deff'].max():.1f} "
          f"(tokens of a paragraph are not independent). The two halves' similarity matrices correlate at "
          f"r = {s['similarity_stability']:.3f}; the family gap is {s['half_agreement'][0]:+.3f} and "
          f"{s['half_agreement'][1]:+.3f} in the two halves.")

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
    per_layer = {"shared": {n: s["shared_per_layer"] / n_experts for n, s in summaries.items()},
                 "high-frequency": {n: s["high"].mean(0) / n_experts for n, s in summaries.items()}}
    fig = model_comparison({n: s["similarity"] for n, s in summaries.items()}, P.languages, per_layer)
    save_figure(fig, "model_comparison", P, cap(", ".join(summaries), similarity=P.similarity, tau_high=P.tau_high),
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
    experts = partition_model(base, P1.n_experts, P1.method, seed=P1.seed, iters=P1.kmeans_iters, store=store,
                              calibration=coactivation_batches(base))
    partition = partition_params(base, P1.n_experts, P1.method, P1.seed, P1.kmeans_iters)
    freq = {}
    for lm in (base, load_model(instruct_name, P.device, P.dtype)):
        tensors, _, _ = cached_profile(store, lm, experts, partition, texts, split="calibration",
                                       max_length=P.max_length, batch_tokens=P.batch_tokens, compile=P.compile,
                                       **settings)
        freq[lm.name] = frequencies(tensors["expert_counts"], tensors["tokens"])
    result = compare_variants(freq[base_name], freq[instruct_name], P.tau_high)
    variants[f"{base_name} → {instruct_name}"] = result
    print(f"{base_name} → {instruct_name}: per-layer correlation {result['layer_correlation'].min():.3f}–"
          f"{result['layer_correlation'].max():.3f} (lowest in layer {int(result['layer_correlation'].argmin())}); "
          f"mean |Δf| {result['mean_abs_difference']:.4f}; shared experts {result['shared_a']} → {result['shared_b']} "
          f"(Jaccard {result['shared_jaccard']:.2f}); language-similarity matrices correlate at "
          f"r = {result['similarity_correlation']:.2f}.")
if variants:
    fig = variant_comparison(variants)
    save_figure(fig, "instruction_tuning", P, cap(", ".join(variants)), width=1200, height=500)
    fig.show()

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
# language, layer and expert, the per-neuron counts (a neuron counts as active when a > 0) and the split-half
# counts; notebook 05 (pruning) reads them too.

# %%
Explorer(load_frequencies(P.artefacts, P.run), noise_z=P.noise_z, source=f"run {P.run}")

# %% [markdown]
# A kernel-free version (works in the rendered HTML, offline): a slider over languages and a dropdown between
# the frequency and the difference to the all-language mean, cells within `noise_z` standard errors blank.

# %%
for name, s in summaries.items():
    f, se = s["freq"], s["se"]
    diff = np.where(np.abs(f - f.mean(0)) > P.noise_z * se, f - f.mean(0), np.nan)
    kernel_free_explorer(reorder(f, s["order"]), reorder(diff, s["order"]), P.languages, name,
                         P.noise_z).show(config=PLOTLY_CONFIG)
