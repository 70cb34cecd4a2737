"""Profiling on several GPUs: data parallel (torchrun, one process per GPU) and one model split over GPUs.

Data parallel, N processes:  torchrun --nproc-per-node N -m benchmarks.distributed dp --json dpN.json
Split with a device map:     python -m benchmarks.distributed split --gpus 2 --json split.json
Table from the JSON files:   python -m benchmarks.distributed table dp1.json dp2.json split.json
LLaMA-2-7B shape, random bf16 weights (same seed everywhere), `--batches` global batches of 8 x 1024 random
tokens (batch i drawn from seed i), 256 experts per layer (random partition), the default counting (top-k 25%,
experts + neurons, compiled). Every run counts the same global batches, so the counts must be identical; the
JSON holds a hash of them. Timed: the profiled pass over this rank's batches after one warm-up batch, wall
clock between barriers (the slowest rank), including the final all-reduce of the counters.
"""

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from babel_lib.babel.moe import ExpertMap
from babel_lib.babel.partition import partition_labels
from babel_lib.babel.profiler import ExpertProfiler
from babel_lib.core import distributed
from babel_lib.core.batches import Batch
from babel_lib.core.ffn import ffn_layers
from benchmarks.common import machine_name, write_table
from benchmarks.profiling import llama_model

ROWS, SEQ, VOCAB, EXPERTS = 8, 1024, 32000, 256


def batch(i: int, device: torch.device) -> Batch:
    ids = torch.randint(3, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(1000 + i)).to(device)
    ones = torch.ones_like(ids)
    return Batch(ids, ones, ones.bool())


def expert_map(model) -> ExpertMap:
    layers = ffn_layers(model)
    return ExpertMap(torch.stack([partition_labels(f.cluster_rows(), EXPERTS, "random", seed=f.index).cpu()
                                  for f in layers]), EXPERTS)


@torch.no_grad()
def profiled(model, experts: ExpertMap, indices: list[int], device: torch.device) -> tuple[float, dict]:
    """Seconds for this rank's batches (slowest rank) and the all-reduced counters."""
    with ExpertProfiler(model, experts, compile=True) as warm:  # compile and autotune outside the timing
        warm.count(batch(indices[0] if indices else 0, device), 0)
    batches = [batch(i, device) for i in indices]
    torch.cuda.synchronize()
    distributed.barrier()
    start = time.perf_counter()
    with ExpertProfiler(model, experts, compile=True) as prof:
        distributed.together(lambda: [prof.count(b, 0) for b in batches])
    counts = distributed.all_reduce({"experts": prof.expert_counts, "neurons": prof.neuron_counts,
                                     "tokens": prof.tokens})
    torch.cuda.synchronize()
    distributed.barrier()
    return time.perf_counter() - start, {k: v.cpu() for k, v in counts.items()}


def digest(counts: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(counts):
        h.update(k.encode() + counts[k].numpy().tobytes())
    return h.hexdigest()[:16]


def memory(devices: list[int]) -> list[float]:
    return [torch.cuda.max_memory_allocated(d) / 2**30 for d in devices]


def data_parallel(n_batches: int) -> dict:
    device = distributed.init()
    model, _ = llama_model("llama2-7b", device)
    experts = expert_map(model)
    mine = [i for i, _ in distributed.shard(range(n_batches))]
    seconds, counts = profiled(model, experts, mine, device)
    peak = distributed.all_reduce({"gib": torch.tensor(memory([device.index]), dtype=torch.float64)})["gib"]
    return {"mode": f"data parallel, {distributed.world_size()} GPU(s)", "gpus": distributed.world_size(),
            "seconds": seconds, "tokens": int(counts["tokens"].sum()), "counts": digest(counts),
            "memory_gib_per_gpu": float(peak) / distributed.world_size()}


def split(n_batches: int, gpus: int) -> dict:
    from babel_lib.core.models import dispatch

    model, _ = llama_model("llama2-7b", torch.device("cuda", 0))
    n = model.config.num_hidden_layers
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": gpus - 1, "lm_head": gpus - 1}
    device_map |= {f"model.layers.{i}": i * gpus // n for i in range(n)}
    model = dispatch(model, device_map)
    for d in range(gpus):
        torch.cuda.reset_peak_memory_stats(d)
    experts = expert_map(model)
    seconds, counts = profiled(model, experts, list(range(n_batches)), torch.device("cuda", 0))
    return {"mode": f"one model split over {gpus} GPUs (device_map, layers {n // gpus} per GPU)", "gpus": gpus,
            "seconds": seconds, "tokens": int(counts["tokens"].sum()), "counts": digest(counts),
            "memory_gib_per_gpu": memory(list(range(gpus)))}


def table(files: list[str]) -> list[str]:
    runs = [json.loads(Path(f).read_text()) for f in files]
    base = next(r for r in runs if r["mode"].startswith("data parallel, 1 "))
    rate = base["tokens"] / base["seconds"]
    same = len({r["counts"] for r in runs}) == 1
    lines = [f"## Profiling on several GPUs: {base['machine']}", "",
             (f"torch {base['torch']}, transformers {base['transformers']}, accelerate {base['accelerate']}, "
             f"NCCL {base['nccl']}; LLaMA-2-7B shape, random bf16 weights; {base['tokens']:,} tokens "
             f"({base['tokens'] // (ROWS * SEQ)} batches of {ROWS}×{SEQ}) counted by every run; {EXPERTS} experts per "
             "layer, top-k 25%, experts + neurons, compiled counting. Wall clock of the profiled pass (slowest "
             f"rank, all-reduce included) after a warm-up batch. {base['date']}."), "",
             "| run | tokens/s | × 1 GPU | seconds | peak memory per GPU (GiB) | counts (sha256) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        mem = r["memory_gib_per_gpu"]
        mem = " / ".join(f"{m:.1f}" for m in mem) if isinstance(mem, list) else f"{mem:.1f}"
        tps = r["tokens"] / r["seconds"]
        lines.append(f"| {r['mode']} | {tps:,.0f} | {tps / rate:.2f} | {r['seconds']:.2f} | {mem} | {r['counts']} |")
    lines += ["", (f"- every run counted the same {base['tokens']:,} tokens with identical expert, neuron and "
                   f"token counts: {same}")]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["dp", "split", "table"])
    parser.add_argument("files", nargs="*", help="table: the JSON files of the runs")
    parser.add_argument("--batches", type=int, default=16, help="global batches of 8 x 1024 tokens")
    parser.add_argument("--gpus", type=int, default=2, help="split: GPUs to spread the layers over")
    parser.add_argument("--json", help="dp/split: where to write the result")
    args = parser.parse_args()
    if args.mode == "table":
        lines = table(args.files)
        print("\n".join(lines))
        write_table("distributed-cuda", lines)
        return
    torch.set_num_threads(4)
    result = data_parallel(args.batches) if args.mode == "dp" else split(args.batches, args.gpus)
    import accelerate
    import transformers

    result |= {"machine": f"{torch.cuda.device_count()} × {machine_name(torch.device('cuda', 0))}",
               "torch": torch.__version__, "transformers": transformers.__version__,
               "accelerate": accelerate.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
               "date": time.strftime("%Y-%m-%d")}
    if distributed.rank() == 0:
        print(json.dumps(result), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result))
    distributed.shutdown()


if __name__ == "__main__":
    main()
