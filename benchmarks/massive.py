"""Benchmark the massive-activation scan: a bare decoder forward against the same forward with the scan's hooks.

LLaMA-2-7B shape on a GPU (random bf16 weights, no download; batch 8 x 1024):
    PYTHONPATH=. python -m benchmarks.massive --device cuda --shape llama2-7b
The two embedded models on the CPU (batch 4 x 128):
    PYTHONPATH=. python -m benchmarks.massive --device cpu --shape embedded
A small LLaMA (4 layers, hidden 512) to check the script anywhere:
    PYTHONPATH=. python -m benchmarks.massive --device cpu --shape llama-small
Writes the markdown table to stdout and to benchmarks/results/massive-<device>.md (llama-small:
massive-<device>-llama-small.md); --out DIR writes a copy there, --trace (CUDA) the kernels of one pass of each
variant against the bare forward's (massive-trace-cuda.md). Random weights have no massive activations; that
does not change what the scan costs. "before" rows scan as the library did before 2026-11-30 (every statistic
in each layer's hook); the others sort the median samples and pick the top entries of all layers at once.
"""

import argparse
import statistics
import time
from functools import partial

import torch

from babel_lib.core.ffn import decoder_layers
from babel_lib.core.hooks import hooked
from babel_lib.core.models import run_decoder
from babel_lib.massive.scan import (
    ResidualScan,
    Scan,
    median_abs,
    top_entries,
)
from benchmarks.common import kernel_times, machine_name, trace_summary, write_table

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


class PerLayerScan(ResidualScan):
    """The scan as it was before 2026-11-30 (benchmark only): every statistic computed in each layer's hook."""

    def _observer(self, layer: int):
        def observe(h: torch.Tensor) -> None:
            h = h.detach()
            self._layer[layer] = (*top_entries(h, self.top_k), median_abs(h, self._sample_index(h)))
        return observe

    def end_batch(self) -> None:
        per_layer = [self._layer[layer] for layer in range(self.n_layers)]
        self._batches.append(tuple(torch.stack(parts, dim=1) for parts in zip(*per_layer)))
        self._layer = {}


def scanned(model: torch.nn.Module, ids: torch.Tensor, cls: type[ResidualScan], top_k: int,
            sample: int | None) -> Scan:
    """One batch through the decoder under a scan of class `cls`, results copied to the CPU (what
    scan_residuals does for one batch on one process)."""
    scan = cls(len(decoder_layers(model)), top_k, sample)
    with hooked(model, scan.hooks()):
        run_decoder(model, ids)
        scan.end_batch()
    return scan.result(ids)


def variants(model: torch.nn.Module, ids: torch.Tensor, top_k: int) -> dict:
    """What is timed: each returns once its results are complete (the scan ends with its one copy to the CPU)."""
    return {
        "bare decoder forward (no LM head)": partial(run_decoder, model, ids),
        "forward + scan, exact median": partial(scanned, model, ids, ResidualScan, top_k, None),
        f"before: forward + scan, median of {SAMPLE:,} sampled entries, per layer": partial(
            scanned, model, ids, PerLayerScan, top_k, SAMPLE),
        f"forward + scan, median of {SAMPLE:,} sampled entries": partial(
            scanned, model, ids, ResidualScan, top_k, SAMPLE),
    }


@torch.no_grad()
def same_scans(fns: dict) -> list[str]:
    """Check lines: the sampled scans before and now give the same values, positions, dims and medians."""
    before, now = (fn() for name, fn in fns.items() if "sampled" in name)
    same = all(torch.equal(x, y) for x, y in zip(before.tensors().values(), now.tensors().values()))
    return [f"- the sampled scan before and now give identical results: {same}"]


def clock(device: torch.device):
    """Wall-clock time on a GPU (synchronised); on the CPU this process's CPU time, which other jobs sharing
    the machine do not inflate (benchmark the CPU with one thread)."""
    return time.perf_counter if device.type == "cuda" else time.process_time


@torch.no_grad()
def measure(fns: dict, device: torch.device, runs: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per forward of each variant, interleaved run by run so that drift hits all alike."""
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
    parser.add_argument("--trace", action="store_true",
                        help="CUDA: torch.profiler kernel times of one pass per variant against the bare forward")
    parser.add_argument("--out", default=None, help="also write the tables into this folder")
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
    rows, checks, traces = [], [], []
    for label, model in models:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=gen).to(device)
        fns = variants(model, ids, args.top_k)
        new = table_rows(label, measure(fns, device, args.runs, args.warmup), batch * seq_len)
        checks += same_scans(fns)
        print("\n".join(new + checks[-1:]), flush=True)
        rows += new
        if args.trace and device.type == "cuda":
            with torch.no_grad():
                kernels = {name: kernel_times(fn) for name, fn in fns.items() if "exact" not in name}
            traces += trace_summary(f"{label}: kernels of one pass (batch {batch} x {seq_len})", kernels,
                                    "bare decoder forward (no LM head)")
    suffix = f"{device.type}{'-llama-small' if args.shape == 'llama-small' else ''}"
    write_table(f"massive-{suffix}", header + rows + [""] + checks, args.out)
    if traces:
        title = f"# Massive-activation scan: kernels on {machine_name(device)}, torch {torch.__version__}"
        write_table(f"massive-trace-{suffix}", [title, ""] + traces, args.out)


if __name__ == "__main__":
    main()
