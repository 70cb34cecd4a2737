"""Benchmark expert profiling against the bare decoder forward (no LM head) on identical batches.

Embedded models on this CPU:        python benchmarks/profiling.py --device cpu --shape embedded
LLaMA-2-7B shape on a GPU:          python benchmarks/profiling.py --device cuda --shape llama2-7b
Quick check of that code path:      python benchmarks/profiling.py --device cpu --shape llama-small
The LLaMA shapes are built from a config with random weights (bf16 on CUDA; no download); batches are random
token ids, 8 x 1024 for llama2-7b. Experts come from a random partition (the cost does not depend on it).
Variants are timed in interleaved rounds (warm-up first; CUDA: wall clock with synchronisation; CPU: process
CPU time), the median is reported. Writes the markdown table to stdout and to
benchmarks/results/profile-<device>.md (the check shape to profile-<device>-llama-small.md).
"""

import argparse
import os
import statistics
import time

import torch

from babel_lib.core.batches import Batch
from babel_lib.core.ffn import ffn_layers
from babel_lib.core.models import run_decoder
from babel_lib.babel.moe import ExpertMap
from babel_lib.babel.partition import partition_labels
from babel_lib.babel.profiler import ExpertProfiler
from benchmarks.common import machine_name, write_table

LLAMA = {  # LlamaConfig keywords, and the batch to time
    "llama2-7b": ({"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}, (8, 1024)),
    "llama-small": ({"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                     "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 32000}, (2, 128)),
}


VARIANTS = (("zscore", "sum"), ("topk", "abs"), ("zscore", "abs"))  # notebook 02's default beside topk/sum
PAPER_NEURONS = 43  # the second expert size counted by default (neurons per expert)


def variants(device: torch.device) -> dict[str, dict]:
    """Profiler settings to time, by row label (None = the bare forward)."""
    rows = {
        "bare decoder forward (no LM head)": None,
        "topk 25%, sum, experts only": {"neurons": False},
        "topk 25%, sum, experts + neurons (default)": {},
        "zscore 25%, sum, experts + neurons": {"rule": "zscore"},
        "threshold > 0, sum, experts + neurons": {"rule": "threshold"},
        "topk 25%, abs, experts + neurons": {"mode": "abs"},
        "notebook 02 default: 4 (rule, mode) x 2 expert sizes + neurons": {"variants": VARIANTS, "coarse": True},
    }
    if device.type != "cuda":
        rows["topk 25%, sum, experts + neurons, one-hot matmul scores"] = {"scorer": "matmul"}
    if device.type == "cuda":
        rows["topk 25%, sum, experts only, compiled counting"] = {"neurons": False, "compile": True}
        rows["topk 25%, sum, experts + neurons, compiled counting"] = {"compile": True}
        rows["threshold > 0, sum, experts + neurons, compiled counting"] = {"rule": "threshold", "compile": True}
        rows["notebook 02 default, compiled counting"] = {"variants": VARIANTS, "coarse": True, "compile": True}
    return rows


def llama_model(shape: str, device: torch.device):
    """(model, batches): a LLaMA-shaped model with random weights and one random batch."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config, (rows, seq) = LLAMA[shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(**config, max_position_embeddings=max(4096, seq))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    ids = torch.randint(3, config.vocab_size, (rows, seq), device=device)
    ones = torch.ones_like(ids)
    return model, [Batch(ids, ones, ones.bool())]


def embedded_model(alias: str, n_paragraphs: int, batch_tokens: int):
    """(model, batches): an embedded model and batches of real paragraphs from every corpus language."""
    from babel_lib.core.batches import paragraph_batches
    from babel_lib.data.corpus import load_corpus
    from babel_lib.core.models import load_model

    lm = load_model(alias, "cpu", "float32")
    corpus = load_corpus(split="calibration")
    step = max(1, len(corpus) // n_paragraphs)
    rows = corpus.select(range(0, step * n_paragraphs, step))
    texts = [rows[lang][i] for i in range(len(rows)) for lang in rows.column_names[2:]]
    batches = list(paragraph_batches(lm.tokenizer, texts, batch_tokens=batch_tokens))
    return lm.model, [batches[len(batches) // 2]]  # batches are sorted by length: a typical one


def timed(fn, device: torch.device) -> float:
    """Seconds for fn(): wall clock synchronised around it on CUDA; this process's CPU time on the CPU (the
    machine is shared, and CPU time is what other processes cannot inflate much)."""
    if device.type != "cuda":
        start = time.process_time()
        fn()
        return time.process_time() - start
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def measure(model, batches, device, n_experts: int, warmup: int, runs: int):
    """Median seconds per pass over `batches` for every variant, and the profilers (for count checks)."""
    layers = ffn_layers(model)
    labels = torch.stack([partition_labels(f.cluster_rows(), n_experts, "random", seed=f.index).cpu() for f in layers])
    experts = ExpertMap(labels, n_experts)
    n_coarse = round(layers[0].width / PAPER_NEURONS)
    coarse = ExpertMap(torch.stack([partition_labels(f.cluster_rows(), n_coarse, "random", seed=f.index).cpu()
                                    for f in layers]), n_coarse)
    profilers = {}
    for label, setting in variants(device).items():
        if setting is not None:
            setting = dict(setting)
            maps = [experts, coarse] if setting.pop("coarse", False) else experts
            profilers[label] = ExpertProfiler(model, maps, **setting)

    def run(label):
        if label not in profilers:
            for b in batches:
                run_decoder(model, b.input_ids, b.attention_mask)
            return
        with profilers[label] as prof:
            for b in batches:
                prof.count(b, 0)

    seconds = {label: [] for label in variants(device)}
    failed = {}  # a variant that cannot run here (e.g. torch.compile without a working compiler) is reported
    for round_ in range(warmup + runs):
        for label in [label for label in seconds if label not in failed]:
            try:
                t = timed(lambda: run(label), device)
            except Exception as err:  # noqa: BLE001 - any failure of one variant must not lose the others
                failed[label] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                profilers.pop(label, None)
                continue
            if round_ >= warmup:
                seconds[label].append(t)
    medians = {label: statistics.median(ts) for label, ts in seconds.items() if label not in failed}
    return medians, profilers, failed


def table(name: str, medians: dict[str, float], tokens: int, shape: str) -> list[str]:
    bare = medians["bare decoder forward (no LM head)"]
    lines = [f"### {name} ({shape}, {tokens} counted tokens per pass)", "",
             "| variant | tokens/s | ms per pass | × bare |", "| --- | --- | --- | --- |"]
    lines += [f"| {label} | {tokens / s:,.0f} | {1000 * s:,.1f} | {s / bare:.3f} |" for label, s in medians.items()]
    return lines


def checks(profilers: dict, tokens: int, passes: int) -> list[str]:
    """Sanity lines: every profiler counted every token once per pass; the compiled and fp32 variants count
    the same as the default."""
    lines = []
    counted = {label: int(p.tokens.sum()) for label, p in profilers.items()}
    lines.append(f"- every profiler counted {tokens} tokens x {passes} passes: "
                 f"{'yes' if set(counted.values()) == {tokens * passes} else counted}")
    default = profilers.get("topk 25%, sum, experts + neurons (default)")
    if default is None:
        return lines
    for label, p in profilers.items():
        if "compiled" in label:
            eager = next(q for other, q in profilers.items() if "compiled" not in other and "fp32" not in other
                         and (q.rule, q.mode, q.neurons, list(q.counts)) == (p.rule, p.mode, p.neurons, list(p.counts)))
            same = all(torch.equal(p.counts[k], eager.counts[k]) for k in p.counts) and torch.equal(
                p.neuron_counts, eager.neuron_counts)
            lines.append(f"- {label}: counts equal the eager variant's: {same}")
        if "fp32" in label:
            moved = (p.expert_counts - default.expert_counts).abs().sum().item()
            total = default.expert_counts.sum().item()
            lines.append(f"- expert counts of fp32 vs bf16-with-fp32-accumulation scores differ in {moved} of "
                         f"{total} activations (summation order only)")
    return lines


def kernel_table(profiler: ExpertProfiler, batches, rows: int = 12) -> str:
    """The CUDA kernels of one profiled pass, by total GPU time (to see where the profiler's cost goes)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as trace

    with torch.no_grad(), profiler as prof, trace(activities=[ProfilerActivity.CUDA]) as tr:
        for b in batches:
            prof.count(b, 0)
        torch.cuda.synchronize()
    return tr.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=["embedded", *LLAMA], default="embedded")
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=None, help="rounds before timing (default 3 cuda, 1 cpu)")
    parser.add_argument("--runs", type=int, default=None, help="timed rounds (default 10 cuda, 3 cpu)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--paragraphs", type=int, default=16, help="embedded: paragraphs per language to sample")
    parser.add_argument("--batch-tokens", type=int, default=1024, help="embedded: tokens per batch")
    parser.add_argument("--trace", action="store_true", help="CUDA: print the kernels of the counting variants")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    runs = args.runs if args.runs is not None else (10 if device.type == "cuda" else 3)

    if args.shape == "embedded":
        builds = {alias: (lambda a=alias: embedded_model(a, args.paragraphs, args.batch_tokens))
                  for alias in ("gemma-3-270m", "smollm2-135m")}
    else:
        builds = {f"LLaMA ({args.shape}-shaped, random weights)": lambda: llama_model(args.shape, device)}
    threads = "" if device.type == "cuda" else f", {torch.get_num_threads()} thread(s)"
    lines = [f"## Profiling throughput on {machine_name(device)}{threads}", "",
             f"torch {torch.__version__}, transformers {__import__('transformers').__version__}; {args.experts} "
             f"experts per layer (random partition); {warmup} warm-up and {runs} timed rounds, variants interleaved, "
             f"median of {'synchronised wall-clock' if device.type == 'cuda' else 'process CPU'} time. Load average "
             f"at start: {os.getloadavg()[0]:.1f}. {time.strftime('%Y-%m-%d')}.", ""]
    for name, build in builds.items():
        model, batches = build()
        tokens = sum(b.n_tokens for b in batches)
        shape = " + ".join(f"{b.input_ids.shape[0]}×{b.input_ids.shape[1]}" for b in batches)
        medians, profilers, failed = measure(model, [b.to(device) for b in batches], device, args.experts, warmup,
                                             runs)
        section = table(name, medians, tokens, f"batch {shape}") + [""] + checks(profilers, tokens, warmup + runs)
        section += [f"- {label}: failed ({why})" for label, why in failed.items()]
        print("\n".join(section), flush=True)
        if args.trace and device.type == "cuda":
            for label, prof in profilers.items():
                if "topk 25%, sum, experts + neurons" in label and "fp32" not in label:
                    print(f"\n{label}\n{kernel_table(prof, [b.to(device) for b in batches])}", flush=True)
        lines += section + [""]
        del model, profilers
    write_table(f"profile-{device.type}{'-' + args.shape if args.shape == 'llama-small' else ''}", lines)


if __name__ == "__main__":
    main()
