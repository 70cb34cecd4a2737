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
# # 04 · Activation sparsity and its scaling
#
# *Sparsing Law* (Luo et al., 2024) measures how many FFN neurons a model really needs. Neuron i of a layer adds
# n_i = h_i · W_out[:, i] to the layer's output (h: the input of the down projection). **CETT** — the cumulative
# errors of tail truncation — skips every neuron with ‖n_i‖ below a threshold ε and measures the relative size of
# what was skipped, ‖Σ_skipped n_i‖ / ‖Σ_i n_i‖, averaged over tokens. One CETT value c is shared by all layers;
# each layer gets the threshold at which its CETT reaches c. **PPL-p%** is the sparsity at the c that makes the
# perplexity (1 + p/100) times the dense one: a sparsity metric that accounts for what the skipped neurons did.
#
# This notebook (i) compares CETT with the top-k and FAT-ε baselines on the paper's perplexity–activation-ratio
# Pareto curves, (ii) shows PPL-1% sparsity per layer and, new here, per language with the neuron
# activation-frequency distributions per language (the paper shows them per domain), and (iii) fits the paper's
# power laws of the activation ratio over training tokens on a micro model family trained on our corpus
# (`make zoo`). All numbers are computed by this run (the scaling section reads the committed zoo table); the
# embedded models are 4-bit quantised GGUF weights dequantised to float.
#
# How the metrics are computed (`babel_lib.sparsing.sparsity`): thresholds are exact — CETT changes only at the values
# of ‖n_i‖, so each layer's threshold is searched over those values (bisection, then an exact scan of the last
# bracket), not on a grid. As in the paper's reference code, each batch's thresholds are derived from that
# batch's dense activations at the current c, then applied (h_i zeroed where ‖n_i‖ < t_l) in a second pass that
# measures the loss and the activation ratio. PPL-p% bisects c in [0, 1] until the perplexity ratio is within
# `tol` of 1 + p/100.

# %% tags=["parameters"]
profile = "default"  # configs/<profile>.yaml
model = ""  # "" = the profile's models; else a model name or a comma-separated list

# %%
import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from babel_lib.core import config
from babel_lib.core.artefacts import ArtefactStore
from babel_lib.core.batches import windows
from babel_lib.data.corpus import corpus_info, load_corpus
from babel_lib.core.ffn import ffn_layers
from babel_lib.core.figures import caption, save_figure
from babel_lib.core.models import load_model
from babel_lib.sparsing.plots import (FORM_NAME, frequency_figure, language_figure, layer_figure, limit_figure,
                                      paper_figure, pareto_figure, tokens_figure)
from babel_lib.sparsing.scaling import DIRECTION, PAPER, fit_runs, fitted_curve, measure_checkpoints
from babel_lib.sparsing.sparsity import SparseEvaluator, score_quantiles

P = config.notebook_params("04_sparsity_scaling", profile, model)
config.apply_runtime(P)
store = ArtefactStore(P.artefacts)
pd.Series({k: v for k, v in P.items()}).to_frame("value")

# %% [markdown]
# ## The models and the evaluation windows
#
# Perplexity is only comparable at a fixed sequence length and text, so every number below is measured on
# windows of exactly `seq_len` tokens cut from the **held-out** split: `windows_per_language` window(s) in each
# of `pareto_languages` for the Pareto curves and PPL-p%, and `language_windows` per language for the
# per-language analysis. Statistics count text tokens only (BOS is excluded); the loss covers every next-token
# prediction of a window.

# %%
models = {name: load_model(name, P.device, P.dtype) for name in P.models}
heldout = load_corpus(P.languages, split="heldout", limit=P.paragraphs)
corpus_sha256 = corpus_info()["sha256"]


def eval_windows(lm, languages, per_language):
    return torch.cat([windows(lm.tokenizer, heldout[lang], P.seq_len, per_language) for lang in languages])


rows = []
for name, lm in models.items():
    layers = ffn_layers(lm.model)
    rows.append({"model": name, "layers": len(layers), "d_ff": layers[0].width, "gated": layers[0].gated,
                 "activation": type(layers[0].act).__name__, "Pareto windows": len(P.pareto_languages) *
                 P.windows_per_language, "seq_len": P.seq_len, "weights": lm.card})
pd.DataFrame(rows).set_index("model")

# %% [markdown]
# ## Perplexity against activation ratio (the paper's Fig. 2)
#
# For each model: the PPL-p% bisection over c (every c it visits is a point of the CETT curve, plus any
# `cett_values`), top-k at kept fractions `topk_ratios` (the k largest |s_i| per token, s the gate activation
# act(W_gate x); the same fraction in every layer), and FAT-ε at one ε for all layers, placed at the
# `fat_quantiles` of the pooled |s| distribution. Results are artefacts keyed by the model and parameters.

# %%
def pareto_run(name):
    lm = models[name]
    params = {"model": name, "fingerprint": lm.fingerprint, "languages": P.pareto_languages,
              "windows_per_language": P.windows_per_language, "paragraphs": P.paragraphs, "seq_len": P.seq_len,
              "p": P.p, "tol": P.tol, "max_iter": P.max_iter, "cett_values": P.cett_values,
              "topk_ratios": P.topk_ratios, "fat_quantiles": P.fat_quantiles, "corpus_sha256": corpus_sha256}

    def compute():
        ids = eval_windows(lm, P.pareto_languages, P.windows_per_language)
        evaluator = SparseEvaluator(lm, ids, batch_size=P.batch_size)
        found = evaluator.ppl_p(P.p, P.tol, max_iter=P.max_iter)
        points = [{"method": "cett", "value": t["cett"], "activation_ratio": t["activation_ratio"],
                   "ppl_ratio": t["ppl_ratio"]} for t in found.trace]
        eps = score_quantiles(lm, ids, P.fat_quantiles, batch_size=P.batch_size).tolist()
        sweeps = [("cett", c) for c in P.cett_values] + [("topk", r) for r in P.topk_ratios] + [("fat", e) for e in eps]
        for method, value in sweeps:
            run = evaluator.evaluate(method, value)
            points.append({"method": method, "value": value, "activation_ratio": run.activation_ratio,
                           "ppl_ratio": evaluator.ratio(run)})
        meta = {"points": points, "cett": found.cett, "activation_ratio": found.activation_ratio,
                "ppl_ratio": found.ppl_ratio, "dense_loss": found.dense_loss, "converged": found.converged,
                "tokens": found.tokens}
        return {"layer_sparsity": found.layer_sparsity, "thresholds": found.thresholds}, meta

    return store.cached("sparsity-pareto", params, compute)


pareto = {name: pareto_run(name) for name in models}
summary = pd.DataFrame({name: {"PPL-p% CETT value c": meta["cett"], "activation ratio": meta["activation_ratio"],
                               "perplexity ratio": meta["ppl_ratio"], "converged": meta["converged"],
                               "dense perplexity": np.exp(meta["dense_loss"]), "predicted tokens": meta["tokens"]}
                        for name, (_, meta) in pareto.items()})
summary.index.name = f"PPL-{P.p:g}%"
summary

# %%
points, dense_ppl, chosen = {}, {}, {}
for name, (_, meta) in pareto.items():
    table = pd.DataFrame(meta["points"])
    dense_ppl[name] = float(np.exp(meta["dense_loss"]))
    table["perplexity"] = table["ppl_ratio"] * dense_ppl[name]
    points[name] = table
    chosen[name] = (meta["activation_ratio"], meta["ppl_ratio"] * dense_ppl[name])
fig = pareto_figure(points, dense_ppl, chosen)
save_figure(fig, "pareto", P, caption(P, ", ".join(P.models), seq_len=P.seq_len,
                                      windows=f"{P.windows_per_language}/language held-out",
                                      languages="/".join(P.pareto_languages), p=P.p, tol=P.tol,
                                      methods="CETT, top-k, FAT-ε"), width=1400, height=550)
fig.show()

# %%
for name, table in points.items():
    ratio = pareto[name][1]["activation_ratio"]
    cett_ppl = chosen[name][1]
    parts = []
    for method in ("topk", "fat"):
        base = table[table["method"] == method].sort_values("activation_ratio")
        if base["activation_ratio"].min() <= ratio <= base["activation_ratio"].max():
            at = float(np.interp(ratio, base["activation_ratio"], base["perplexity"]))
            parts.append(f"{method} {at:.2f} ({at / cett_ppl:.2f}x)")
        else:
            parts.append(f"{method}: its sweep does not reach that activation ratio")
    print(f"{name}: CETT keeps the perplexity at {cett_ppl:.2f} (dense {dense_ppl[name]:.2f}) with an activation "
          f"ratio of {ratio:.3f}; at the same activation ratio (interpolated): " + ", ".join(parts) + ".")

# %% [markdown]
# ## PPL-1% sparsity per layer
#
# The activation ratio of each layer at the PPL-p% thresholds (1 − the layer's sparsity), over relative depth
# so the two models share one axis.

# %%
layer_ratio = {name: (1 - tensors["layer_sparsity"]).numpy() for name, (tensors, _) in pareto.items()}
fig = layer_figure(layer_ratio)
save_figure(fig, "layers", P, caption(P, ", ".join(P.models), seq_len=P.seq_len, p=P.p, tol=P.tol,
                                      languages="/".join(P.pareto_languages), method="CETT"))
fig.show()
for name, ratio in layer_ratio.items():
    print(f"{name}: per-layer activation ratio from {ratio.min():.3f} (layer {int(ratio.argmin())}) to "
          f"{ratio.max():.3f} (layer {int(ratio.argmax())}); model-level {pareto[name][1]['activation_ratio']:.3f}.")

# %% [markdown]
# ## Sparsity per language
#
# A PPL-p% bisection per language would multiply the cost by 17, so c is fixed at each model's pooled PPL-p%
# value from above; then, per language, thresholds are re-derived on that language's own windows (as always,
# per batch), and we report its activation ratio, its perplexity ratio at that c, and every neuron's activation
# frequency (the share of the language's tokens on which the neuron is kept).

# %%
def language_run(name):
    lm = models[name]
    c = pareto[name][1]["cett"]
    params = {"model": name, "fingerprint": lm.fingerprint, "languages": P.languages, "cett": c,
              "language_windows": P.language_windows, "paragraphs": P.paragraphs, "seq_len": P.seq_len,
              "corpus_sha256": corpus_sha256}

    def compute():
        rows, frequency = [], []
        for lang in P.languages:
            evaluator = SparseEvaluator(lm, eval_windows(lm, [lang], P.language_windows), batch_size=P.batch_size)
            run = evaluator.evaluate("cett", c)
            rows.append({"language": lang, "activation_ratio": run.activation_ratio,
                         "ppl_ratio": evaluator.ratio(run), "dense_perplexity": evaluator.dense.perplexity})
            frequency.append(torch.stack(run.neuron_frequency))
        return {"frequency": torch.stack(frequency)}, {"rows": rows}

    return store.cached("sparsity-languages", params, compute)


languages = {name: language_run(name) for name in models}
by_language = pd.concat([pd.DataFrame(meta["rows"]).assign(model=name) for name, (_, meta) in languages.items()])
fig = language_figure(by_language)
save_figure(fig, "languages", P, caption(P, ", ".join(P.models), seq_len=P.seq_len,
                                         windows=f"{P.language_windows}/language held-out", p=P.p,
                                         cett="pooled PPL-p% value per model", method="CETT"), width=1300)
fig.show()
by_language.pivot(index="language", columns="model", values=["activation_ratio", "ppl_ratio"]).round(4)

# %%
for name, group in by_language.groupby("model", sort=False):
    g = group.set_index("language")
    print(f"{name} at c = {pareto[name][1]['cett']:.4f}: activation ratio from {g['activation_ratio'].min():.3f} "
          f"({g['activation_ratio'].idxmin()}) to {g['activation_ratio'].max():.3f} ({g['activation_ratio'].idxmax()}); "
          f"perplexity ratio from {g['ppl_ratio'].min():.4f} ({g['ppl_ratio'].idxmin()}) to "
          f"{g['ppl_ratio'].max():.4f} ({g['ppl_ratio'].idxmax()}) against the pooled target {1 + P.p / 100:g}.")

# %% [markdown]
# ### Neuron activation frequency per language
#
# The distribution (ECDF over all neurons of all layers) of how often each neuron is kept, per language. The
# paper finds these distributions differ by domain; here the domain is the language.

# %%
frequencies = {name: {lang: tensors["frequency"][i].flatten().numpy() for i, lang in enumerate(P.languages)}
               for name, (tensors, _) in languages.items()}
fig = frequency_figure(frequencies)
save_figure(fig, "frequency", P, caption(P, ", ".join(P.models), seq_len=P.seq_len,
                                         windows=f"{P.language_windows}/language held-out", p=P.p,
                                         cett="pooled PPL-p% value per model"), width=1400, height=550)
fig.show()
for name, per_language in frequencies.items():
    rare = {lang: float((f < P.rare).mean()) for lang, f in per_language.items()}
    low, high = min(rare, key=rare.get), max(rare, key=rare.get)
    print(f"{name}: the share of neurons kept on fewer than {P.rare:.0%} of tokens ranges from {rare[low]:.1%} "
          f"({low}) to {rare[high]:.1%} ({high}).")

# %% [markdown]
# ## Scaling: activation ratio over training, width/depth and parameters
#
# The paper trains ReLU and SiLU models from 0.1B to 2.4B parameters and finds that the PPL-1% activation
# ratio A follows A(D) = exp(−c·D^α + b) + A₀ for ReLU (decreasing to A₀) and A(D) = −c·D^(−α) + A₀ for SiLU
# (increasing to A₀) over training tokens D; that ReLU is much sparser than SiLU; that A₀ grows with the
# width/depth ratio up to a bottleneck; and that at similar width/depth A₀ depends only weakly on parameter
# scale. We test this on a LLaMA-style micro family trained on our corpus (`make zoo`, table `zoo_table`):
# each run's activation ratio at its checkpoints is fitted with its activation's form (scipy `curve_fit`), and
# the limits A₀ are compared across shapes. The paper's published constants are shown as a reference (their
# models are 10³ times larger and trained on 10³ times more tokens, so only shapes and limits compare).
#
# Two differences from the paper's protocol, both stated so the comparison is fair: each checkpoint gets its
# own PPL-1% bisection (the paper bisects once, on the mean perplexity ratio of the last five checkpoints, and
# applies that CETT value to all of them), and a fitted A₀ is reported only where the fit identifies one —
# the data move in the form's direction and A₀ does not sit on its bound — otherwise the figures show the
# ratio measured at the last checkpoint.

# %%
zoo_path = config.ROOT / P.zoo_table
zoo = pd.read_csv(zoo_path) if zoo_path.exists() else None
if zoo is None:
    print(f"No zoo table at {zoo_path}: the scaling section is skipped. Train the micro family with `make zoo` "
          "(a GPU run) or restore the committed data/zoo/zoo.csv, then run this notebook again.")
else:
    provenance = zoo_path.parent / "PROVENANCE.json"
    print(f"{zoo_path.relative_to(config.ROOT)}: {len(zoo)} checkpoints of {zoo['run'].nunique()} runs"
          + (f"; provenance in {provenance.relative_to(config.ROOT)}" if provenance.exists() else ""))
    fits = fit_runs(zoo, unit=P.token_unit)
    curves = {row["run"]: fitted_curve(row, unit=P.token_unit) for _, row in fits.iterrows()}
fits if zoo is not None else None

# %%
if zoo is not None:
    fig = tokens_figure(zoo, fits, curves, P.token_unit, P.token_unit_name)
    save_figure(fig, "zoo_tokens", P, caption(P, "micro LLaMA family (make zoo)", table=P.zoo_table,
                                              p="PPL-1% per checkpoint", fit="scipy curve_fit, paper's forms"),
                width=1400, height=550)
    fig.show()
    axes = zoo.groupby("run")["axes"].first()
    last = fits.set_index("run").join(axes)
    for axis, x, title, name in (("ratio", "width_depth", "width / depth", "zoo_width_depth"),
                                 ("scale", "params", "non-embedding parameters", "zoo_params")):
        fig = limit_figure(last[last["axes"].str.contains(axis)].reset_index(), x, title, PAPER)
        save_figure(fig, name, P, caption(P, "micro LLaMA family (make zoo)", table=P.zoo_table,
                                          reference="Sparsing Law published A₀ (0.1B-1.2B)"))
        fig.show()
    for form, group in last.groupby("activation"):
        limits = group[group["a0_identified"]]
        published = [law.a0 for (f, _), law in PAPER.items() if f == form]
        print(f"{FORM_NAME[form]}: at the last checkpoint ({group['max_tokens'].max():,} tokens) the PPL-1% "
              f"activation ratio is {group['last_ratio'].min():.3f}-"
              f"{group['last_ratio'].max():.3f} over {len(group)} runs; it rises over training in "
              f"{int((group['trend'] > 0).sum())} of them (Spearman ρ {group['trend'].min():+.2f} to "
              f"{group['trend'].max():+.2f}; the paper's {FORM_NAME[form]} form "
              f"{'decreases' if DIRECTION[form] < 0 else 'increases'}). The fit identifies a limit A₀ in "
              f"{len(limits)} run(s)" + (f" ({limits['a0'].min():.3f}-{limits['a0'].max():.3f})" if len(limits) else "")
              + f"; the paper's A₀: {min(published):.3f}-{max(published):.3f}.")
    if {"relu", "silu"} <= set(last["activation"]):
        shape = last.assign(shape=[r.split("-", 1)[1] for r in last.index]).pivot(index="shape", columns="activation",
                                                                                  values="last_ratio")
        sparser = int((shape["relu"] < shape["silu"]).sum())
        print(f"ReLU is sparser than SiLU in {sparser} of {len(shape)} shapes at the last checkpoint (mean "
              f"{shape['relu'].mean():.3f} vs {shape['silu'].mean():.3f}, {shape['silu'].mean() / shape['relu'].mean():.1f}x).")
    for axis, x, label in (("ratio", "width_depth", "width/depth"), ("scale", "params", "parameters")):
        for form, group in last[last["axes"].str.contains(axis)].groupby("activation"):
            if len(group) >= 3:
                group = group.sort_values(x)
                rho = spearmanr(group[x], group["last_ratio"]).statistic
                print(f"{FORM_NAME[form]} along {label} ({', '.join(f'{v:,.0f}' for v in group[x])}): last-checkpoint "
                      f"ratio {', '.join(f'{v:.3f}' for v in group['last_ratio'])} (Spearman ρ {rho:+.2f}).")

# %% [markdown]
# ### The paper's constants (reference)
#
# The published curves, D in billions of tokens, and the constants next to ours.

# %%
fig = paper_figure(PAPER, np.geomspace(1e9, 400e9, 200))
save_figure(fig, "paper_reference", P, caption(P, "Sparsing Law published constants (MiniCPM-style 0.1B-1.2B)",
                                               source="Luo et al. 2024, arXiv 2411.02335"), width=1300, height=500)
fig.show()
constants = pd.DataFrame([{"source": "paper", "run": f"{form} {scale}", **law.as_row()}
                          for (form, scale), law in PAPER.items()])
if zoo is not None:
    ours = fits.assign(source="ours", form=fits["activation"])[["source", "run", "form", "alpha", "b", "c", "a0", "rmse"]]
    constants = pd.concat([constants, ours], ignore_index=True)
constants

# %% [markdown]
# ### Your own checkpoints
#
# With hub access, set `checkpoints` to a list of `[model, revision, tokens seen]` — for instance Pythia's
# `stepN` revisions — to measure the PPL-p% activation ratio at each (one bisection per checkpoint, on the
# pooled evaluation text) and fit the same forms (ReLU models with the ReLU form, others with the SiLU form).

# %%
if P.checkpoints:
    texts = [t for lang in P.pareto_languages for t in heldout[lang]]
    hub = measure_checkpoints(P.checkpoints, texts, seq_len=P.seq_len,
                              n_windows=len(P.pareto_languages) * P.windows_per_language, p=P.p, tol=P.tol,
                              device=P.device, dtype=P.dtype, batch_size=P.batch_size)
    hub_fits = fit_runs(hub, unit=P.token_unit)
    hub_curves = {row["run"]: fitted_curve(row, unit=P.token_unit) for _, row in hub_fits.iterrows()}
    fig = tokens_figure(hub, hub_fits, hub_curves, P.token_unit, P.token_unit_name)
    save_figure(fig, "checkpoints", P, caption(P, ", ".join(sorted(set(hub["run"]))), seq_len=P.seq_len, p=P.p,
                                               tol=P.tol, checkpoints=len(P.checkpoints)), width=1400, height=550)
    fig.show()
else:
    print("checkpoints is empty: no hub checkpoints measured (set it to [[model, revision, tokens], ...]).")
hub_fits if P.checkpoints else None
