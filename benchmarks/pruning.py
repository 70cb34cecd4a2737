"""Benchmark sliced (physically smaller) FFNs and dynamic expert sparsity against the dense model.

Embedded models on this CPU:      python -m benchmarks.pruning --device cpu   (from the repository root)
LLaMA-2-7B shape on a GPU:        python benchmarks/pruning.py --device cuda [--out DIR]
Quick check of the GPU code path: python benchmarks/pruning.py --device cuda --shape llama-small (runs on the CPU too)

CPU: each embedded model is sliced with babel_lib.babel.pruning.sliced at 25/50/75% of the experts pruned (a random
expert choice; speed does not depend on which experts), the decoder body (no LM head) is timed on 2 x 256 tokens,
median of interleaved rounds, and compared with the ideal speed-up 1 / (1 - s + s * kept), s the measured share of
the dense body's time spent in the FFNs.
CUDA (self-contained: only torch and transformers, so it runs on a bare GPU machine): a LlamaForCausalLM with random
bf16 weights, full forward of 8 x 1024 tokens (sdpa); per rate (b) a model sliced from the dense one exactly as
babel's `sliced` does (index_select of gate/up rows and down columns of the kept experts of a random 256-expert
partition, then contiguous) and a plain model built with that intermediate size; (c) decode at batch 1: one token
through 32 layers of (RMSNorm, q/k/v/o projections, RMSNorm, FFN) captured in a CUDA graph, dense FFN against
dynamic FFN (gate projection in full, expert score = sum of act(gate) over the expert's neurons, top-k experts,
then up rows and down rows of only those experts; torch.compile'd). Attention over a KV cache is left out of (c):
at short context it reads little next to the weights. Timing: CUDA events, median of repeats after warm-up.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

SHAPES = {  # LlamaConfig keywords and the (batch, seq) of the prefill benchmark
    "llama2-7b": ({"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}, (8, 1024)),
    "llama-small": ({"hidden_size": 64, "intermediate_size": 512, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000}, (2, 32)),
}
RATES = (0.25, 0.5, 0.75)
N_EXPERTS = 256


def versions() -> str:
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"


def gpu_time(fn, repeats: int = 10, warmup: int = 3) -> float:
    """Median seconds of fn() with CUDA events (host clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def expert_neurons(width: int, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Sorted neuron indices kept when round(rate * 256) experts of a random balanced partition are pruned."""
    labels = torch.randperm(width, generator=gen) % N_EXPERTS
    pruned = torch.randperm(N_EXPERTS, generator=gen)[: round(rate * N_EXPERTS)]
    return (~torch.isin(labels, pruned)).nonzero().squeeze(-1)


def slice_llama(model, keeps):
    """What babel_lib.babel.pruning.sliced does to a LLaMA model, in place: kept gate/up rows, down columns."""
    for layer, kept in zip(model.model.layers, keeps):
        mlp, kept = layer.mlp, kept.to(layer.mlp.down_proj.weight.device)
        for proj, dim in ((mlp.gate_proj, 0), (mlp.up_proj, 0), (mlp.down_proj, 1)):
            proj.weight = torch.nn.Parameter(proj.weight.detach().index_select(dim, kept).contiguous(),
                                             requires_grad=False)
            if dim == 0:
                proj.out_features = kept.numel()
            else:
                proj.in_features = kept.numel()
    model.config.intermediate_size = keeps[0].numel()
    return model


def build(cfg_kwargs: dict, device: str, dtype: torch.dtype, intermediate: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**cfg_kwargs, **({"intermediate_size": intermediate} if intermediate else {})})
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    return model.eval().requires_grad_(False)


@torch.inference_mode()
def prefill(shape: str, device: str) -> list[str]:
    """(b): full forward tokens/s of dense, sliced and plain-smaller models at every rate, with the ideal."""
    kwargs, (batch, seq) = SHAPES[shape]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dense = build(kwargs, device, dtype)
    ids = torch.randint(0, kwargs["vocab_size"], (batch, seq), device=device)
    t_dense = gpu_time(lambda: dense(input_ids=ids))
    h = torch.randn(batch, seq, kwargs["hidden_size"], device=device, dtype=dtype)
    t_ffn = gpu_time(lambda: [layer.mlp(h) for layer in dense.model.layers])
    share = t_ffn / t_dense
    gen = torch.Generator().manual_seed(0)
    lines = [f"FFN share of the dense forward: {share:.1%} ({len(dense.model.layers)} FFNs on a random hidden state / full forward)", "",
             "| experts pruned | d_ff kept | model | tokens/s | speed-up | ideal | of ideal |", "|---|---|---|---|---|---|---|",
             f"| 0% | {kwargs['intermediate_size']} | dense | {batch * seq / t_dense:,.0f} | 1.00x | 1.00x | 100% |"]
    for rate in RATES:
        keeps = [expert_neurons(kwargs["intermediate_size"], rate, gen) for _ in range(kwargs["num_hidden_layers"])]
        width = keeps[0].numel()
        kept = width / kwargs["intermediate_size"]
        ideal = 1 / (1 - share + share * kept)
        sliced = slice_llama(build(kwargs, device, dtype), keeps)  # a copy of dense's shape, then sliced
        plain = build(kwargs, device, dtype, intermediate=width)
        for name, model in (("sliced (babel)", sliced), ("plain, smaller d_ff", plain)):
            t = gpu_time(lambda: model(input_ids=ids))
            lines.append(f"| {rate:.0%} | {width} | {name} | {batch * seq / t:,.0f} | {t_dense / t:.2f}x | "
                         f"{ideal:.2f}x | {t_dense / t / ideal:.0%} |")
        del sliced, plain
        torch.cuda.empty_cache() if device == "cuda" else None
    del dense
    return lines


def rms(x, w):
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, 1e-6)


def dense_ffn(x, wg, wu, wd):
    return torch.nn.functional.linear(torch.nn.functional.silu(torch.nn.functional.linear(x, wg)) *
                                      torch.nn.functional.linear(x, wu), wd)


def dynamic_ffn(x, wg, wu3, wd3, k: int):
    """x [1, d]; wg [d_ff, d] in expert order; wu3 [E, m, d] up rows per expert; wd3 [E, m, d] down columns per expert
    (transposed): gate in full, top-k experts by the sum of act(gate), up and down of only those experts."""
    g = torch.nn.functional.silu(torch.nn.functional.linear(x, wg)).view(wu3.shape[0], wu3.shape[1])  # [E, m]
    top = g.sum(-1).topk(k).indices  # [k]
    u = torch.einsum("kmd,d->km", wu3[top], x[0])  # gathered rows
    a = g[top] * u  # [k, m]
    return torch.einsum("km,kmd->d", a, wd3[top])[None]


@torch.no_grad()
def decode(shape: str, device: str) -> list[str]:
    """(c): one token through the layer stack in a CUDA graph: dense FFN vs dynamic top-k at 25% and 50% active."""
    kwargs, _ = SHAPES[shape]
    d, f, n = kwargs["hidden_size"], kwargs["intermediate_size"], kwargs["num_hidden_layers"]
    m = f // N_EXPERTS
    f = m * N_EXPERTS  # 11008 = 256 x 43
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    r = lambda *s: torch.randn(*s, device=device, dtype=dtype) * 0.02  # noqa: E731
    layers = [dict(qkvo=[r(d, d) for _ in range(4)], n1=torch.ones(d, device=device, dtype=dtype),
                   n2=torch.ones(d, device=device, dtype=dtype), wg=r(f, d), wu=r(f, d), wd=r(d, f)) for _ in range(n)]
    for L in layers:  # expert-ordered views for the dynamic FFN (neurons of one expert contiguous)
        L["wu3"] = L["wu"].view(N_EXPERTS, m, d)
        L["wd3"] = L["wd"].T.contiguous().view(N_EXPERTS, m, d)
    x0 = r(1, d)
    fast_dense = torch.compile(dense_ffn) if device == "cuda" else dense_ffn
    fast_dyn = torch.compile(dynamic_ffn) if device == "cuda" else dynamic_ffn

    def stack(ffn):
        def step():
            x = x0
            for L in layers:
                h = rms(x, L["n1"])
                q, k_, v, o = L["qkvo"]
                x = x + torch.nn.functional.linear(torch.nn.functional.linear(h, q) + torch.nn.functional.linear(h, k_)
                                                   + torch.nn.functional.linear(h, v), o)
                x = x + ffn(rms(x, L["n2"]), L)
            return x
        return step

    variants = {"dense": stack(lambda h, L: fast_dense(h, L["wg"], L["wu"], L["wd"]))}
    for active in (0.5, 0.25):
        k = round(active * N_EXPERTS)
        variants[f"dynamic, {active:.0%} experts active"] = stack(
            lambda h, L, k=k: fast_dyn(h, L["wg"], L["wu3"], L["wd3"], k))
    variants["attention projections only (no FFN)"] = stack(lambda h, L: torch.zeros_like(h))
    times = {}
    for name, step in variants.items():
        for _ in range(3):
            step()  # compile and warm up outside the graph
        if device == "cuda":
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            times[name] = gpu_time(graph.replay, repeats=50, warmup=5)
        else:
            times[name] = gpu_time(step, repeats=5, warmup=1)
    base = times["dense"]
    weights = n * (4 * d * d + 3 * f * d) * (2 if dtype == torch.bfloat16 else 4) / 1e9
    lines = [f"Decode, batch 1, one token through {n} layers (CUDA graph); dense weights {weights:.1f} GB", "",
             "| variant | ms/token | tokens/s | speed-up vs dense |", "|---|---|---|---|"]
    for name, t in times.items():
        lines.append(f"| {name} | {t * 1e3:.3f} | {1 / t:,.0f} | {base / t:.2f}x |")
    return lines


@torch.inference_mode()
def cpu_embedded(repeats: int) -> list[str]:
    """(a): the embedded models sliced by babel on this CPU, decoder body tokens/s vs dense and vs the ideal."""
    from babel_lib.babel.moe import ExpertMap
    from babel_lib.babel.pruning import random_keep, sliced, uniform_counts
    from babel_lib.babel.pruning_study import _ffn_time
    from babel_lib.core.ffn import ffn_layers
    from babel_lib.core.models import load_model, run_decoder

    torch.set_num_threads(2)
    lines = ["| model | experts pruned | d_ff kept | tokens/s | speed-up | ideal | of ideal |",
             "|---|---|---|---|---|---|---|"]
    for alias in ("gemma-3-270m", "smollm2-135m"):
        lm = load_model(alias, "cpu", "float32")
        layers = ffn_layers(lm.model)
        width = layers[0].width
        gen = torch.Generator().manual_seed(0)
        experts = ExpertMap(torch.stack([torch.randperm(width, generator=gen) % N_EXPERTS for _ in layers]),
                            N_EXPERTS)
        ids = torch.randint(0, lm.model.config.vocab_size, (2, 256))
        models = {0.0: lm.model}
        for rate in RATES:
            models[rate] = sliced(lm.model, experts, random_keep(uniform_counts(rate, len(layers), N_EXPERTS),
                                                                  N_EXPERTS, seed=0))
        times = {rate: [] for rate in models}
        for model in models.values():
            run_decoder(model, ids)
        for _ in range(repeats):  # interleaved rounds
            for rate, model in models.items():
                t0 = time.perf_counter()
                run_decoder(model, ids)
                times[rate].append(time.perf_counter() - t0)
        body, ffn = min((_ffn_time(lm.model, ids) for _ in range(repeats)), key=lambda t: t[0])
        share = ffn / body
        t_dense = statistics.median(times[0.0])
        for rate, model in models.items():
            kept = ffn_layers(model)[0].width / width
            ideal = 1 / (1 - share + share * kept)
            t = statistics.median(times[rate])
            lines.append(f"| {alias} | {rate:.0%} | {ffn_layers(model)[0].width} | {ids.numel() / t:,.0f} | "
                         f"{t_dense / t:.2f}x | {ideal:.2f}x | {t_dense / t / ideal:.0%} |")
        lines.append(f"| {alias} | FFN share of the dense body: {share:.0%} | | | | | |")
        del lm, models
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=list(SHAPES), default="llama2-7b")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the table here (the device's $OUT)")
    parser.add_argument("--skip", choices=["prefill", "decode"], default=None)
    args = parser.parse_args()
    if args.device == "cpu" and args.shape == "llama2-7b":
        name = "pruning-cpu"
        if torch.cuda.is_available():
            machine = torch.cuda.get_device_name()
        else:
            machine = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
                           platform.processor())
        body = ["Sliced embedded models (babel_lib.babel.pruning.sliced), decoder body (no LM head) on 2 x 256 "
                f"tokens, median of {args.repeats} interleaved rounds, 2 threads.", ""] + cpu_embedded(args.repeats)
    else:
        name = f"pruning-{args.device}" + ("" if args.shape == "llama2-7b" else f"-{args.shape}")
        machine = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
        body = []
        if args.skip != "prefill":
            body += [f"(b) Prefill, {args.shape} shape, random weights, batch {'x'.join(map(str, SHAPES[args.shape][1]))}, "
                     "full forward with sdpa; ideal = 1 / (1 - s + s * kept), s the FFN share", ""]
            body += prefill(args.shape, args.device) + [""]
        if args.skip != "decode":
            body += ["(c) Dynamic expert sparsity at decode", ""] + decode(args.shape, args.device)
    lines = [f"# Pruning benchmark: {name}", "", f"Machine: {machine}; {versions()}.", "", *body]
    print("\n".join(lines))
    if args.out:
        from pathlib import Path

        Path(args.out, f"{name}.md").write_text("\n".join(lines) + "\n")
    else:
        from benchmarks.common import write_table

        write_table(name, lines)


if __name__ == "__main__":
    main()
