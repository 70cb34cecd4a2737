"""Benchmark the massive-activation scan: a bare decoder forward against the same forward with the scan's hooks.

LLaMA-2-7B shape on a GPU (random bf16 weights, no download; batch 8 x 1024):
    PYTHONPATH=. python -m benchmarks.massive --device cuda --shape llama2-7b
The two embedded models on the CPU (batch 4 x 128):
    PYTHONPATH=. python -m benchmarks.massive --device cpu --shape embedded
A small LLaMA (4 layers, hidden 512) to check the script anywhere:
    PYTHONPATH=. python -m benchmarks.massive --device cpu --shape llama-small
Writes the markdown table to stdout and to benchmarks/results/massive-<device>.md (llama-small:
massive-<device>-llama-small.md). Random weights have no massive activations; that does not change what the
scan costs.
"""

import argparse
import statistics
import time

import torch

from babel_lib.massive.scan import scan_residuals
from babel_lib.core.models import run_decoder
from benchmarks.common import machine_name, write_table

SHAPES = {"llama2-7b": (8, 1024), "llama-small": (4, 256), "embedded": (4, 128)}  # default (batch, seq_len)
LLAMA = {  # (layers, hidden, FFN width, heads)
    "llama2-7b": (32, 4096, 11008, 32),
    "llama-small": (4, 512, 1376, 8),
}
SAMPLE = 65536  # entries in the sampled median


def llama(shape: str, device: torch.device) -> tuple[str, torch.nn.Module]:
    """A LlamaForCausalLM of the given shape with random weights (bf16 on CUDA, float32 on the CPU), built there."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    layers, hidden, width, heads = LLAMA[shape]
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=width, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                         rms_norm_eps=1e-5)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval().requires_grad_(False)  # .to: a no-op unless from_config built it elsewhere
    return f"{shape} shape (random {str(dtype).removeprefix('torch.')}, sdpa)", model


def embedded(device: torch.device) -> list[tuple[str, torch.nn.Module]]:
    """The two embedded models as load_model gives them (float32 on the CPU)."""
    from babel_lib.core.models import load_model

    out = []
    for name in ("gemma-3-270m", "smollm2-135m"):
        model = load_model(name, device).model
        out.append((f"{name} ({str(model.dtype).removeprefix('torch.')})", model))
    return out


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variants(model: torch.nn.Module, ids: torch.Tensor, top_k: int) -> dict:
    """What is timed: each returns once its results are complete (the scan ends with its one copy to the CPU)."""
    batch = ids.shape[0]
    return {
        "bare decoder forward (no LM head)": lambda: run_decoder(model, ids),
        "forward + scan, exact median": lambda: scan_residuals(model, ids, batch_size=batch, top_k=top_k),
        f"forward + scan, median of {SAMPLE:,} sampled entries": lambda: scan_residuals(
            model, ids, batch_size=batch, top_k=top_k, median_sample=SAMPLE),
    }


def clock(device: torch.device):
    """Wall-clock time on a GPU (synchronised); on the CPU this process's CPU time, which other jobs sharing
    the machine do not inflate (benchmark the CPU with one thread)."""
    return time.perf_counter if device.type == "cuda" else time.process_time


@torch.no_grad()
def measure(model: torch.nn.Module, ids: torch.Tensor, device: torch.device, runs: int, warmup: int,
            top_k: int) -> dict[str, list[float]]:
    """Seconds per forward of each variant, interleaved run by run so that drift hits all alike."""
    fns = variants(model, ids, top_k)
    now = clock(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for step in range(warmup + runs):
        for name, fn in fns.items():
            synchronise(device)
            start = now()
            fn()
            synchronise(device)
            if step >= warmup:
                times[name].append(now() - start)
    return times


def table_rows(label: str, times: dict[str, list[float]], tokens: int) -> list[str]:
    bare = statistics.median(next(iter(times.values())))
    rows = []
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rows.append(f"| {label} | {name} | {median:.4f} | {', '.join(f'{s:.4f}' for s in seconds)} | "
                    f"{tokens / median:,.0f} | {median / bare:.3f} | {100 * (median / bare - 1):+.1f}% |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="embedded")
    parser.add_argument("--batch", type=int, help="sequences per batch (default: per shape, see SHAPES)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: per shape, see SHAPES)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    parser.add_argument("--top-k", type=int, default=32, help="entries kept per sequence and layer (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch, seq_len = args.batch or SHAPES[args.shape][0], args.seq_len or SHAPES[args.shape][1]
    models = embedded(device) if args.shape == "embedded" else [llama(args.shape, device)]

    import transformers

    header = [f"### Massive-activation scan overhead: {args.shape}, batch {batch} x {seq_len} tokens", "",
              f"Machine: {machine_name(device)}; torch {torch.__version__}; transformers {transformers.__version__}; "
              f"{args.threads} CPU thread(s); top_k {args.top_k}; median of {args.runs} runs after {args.warmup} "
              "warm-up runs; " + ("wall-clock, synchronised." if device.type == "cuda" else
                                  "CPU time of the process (the machine is shared)."), "",
              "| model | variant | median (s) | runs (s) | tokens/s | x bare | overhead |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(header), flush=True)
    rows = []
    for label, model in models:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=gen).to(device)
        new = table_rows(label, measure(model, ids, device, args.runs, args.warmup, args.top_k), batch * seq_len)
        print("\n".join(new), flush=True)
        rows += new
    write_table(f"massive-{device.type}{'-llama-small' if args.shape == 'llama-small' else ''}", header + rows)


if __name__ == "__main__":
    main()
