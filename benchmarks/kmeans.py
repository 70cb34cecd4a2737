"""Benchmark balanced k-means: against k-means-constrained on CPU, and at LLaMA-2-7B layer shape on a device.

CPU comparison (needs k-means-constrained):  PYTHONPATH=. python -m benchmarks.kmeans
LLaMA-2-7B layer (11008 x 4096, 256 experts), this code with and without exchange refinement, and a baseline
partition.py (e.g. main's, saved with git show) in the same process:
    PYTHONPATH=. python -m benchmarks.kmeans --device cuda --full --baseline old_partition.py --out $OUT --profile
Writes the markdown table to stdout and to benchmarks/results/kmeans-<device>[-full].md, and with --out the table
and a JSON of every run there (--profile adds torch.profiler's table of one refined run). Times are process CPU
time on the CPU and synchronised wall time on CUDA.
"""

import argparse
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from babel_lib.babel.partition import (
    balanced_kmeans,
    expert_sizes,
    inertia,
    partition_labels,
)
from benchmarks.common import machine_name, write_table

# (n, d, k, data): small to the largest that k-means-constrained (n_init=10) finishes in about a minute.
CPU_PROBLEMS = [
    (240, 16, 8, "clustered"), (240, 16, 8, "isotropic"),
    (600, 32, 12, "clustered"), (600, 32, 12, "isotropic"),
    (1000, 16, 40, "clustered"), (1000, 64, 40, "isotropic"),
    (1500, 64, 30, "clustered"), (1536, 64, 48, "isotropic"),
    (2048, 64, 64, "clustered"), (2048, 128, 64, "isotropic"),
    (3072, 64, 96, "clustered"), (4096, 128, 128, "isotropic"),
    (200, 8, 10, "uneven"), (300, 8, 15, "uneven"), (400, 16, 20, "uneven"), (600, 8, 30, "uneven"),
    (600, 32, 12, "uneven"), (1000, 16, 40, "uneven"),
]
FULL_SHAPE = (11008, 4096, 256)


def make_rows(n: int, d: int, data: str, seed: int) -> torch.Tensor:
    """Synthetic neuron rows: isotropic gaussian, or a gaussian mixture with uneven cluster popularity so the
    balance constraint has to split and merge clusters: "clustered" (n/32 centres, weights 1/rank^0.7, noise 0.8)
    or "uneven" (n/20 centres, weights 1/rank, noise 0.5: where a poor seeding traps plain balanced k-means)."""
    gen = torch.Generator().manual_seed(seed)
    if data == "isotropic":
        return torch.randn(n, d, generator=gen)
    n_centres, power, noise = (max(2, n // 32), 0.7, 0.8) if data == "clustered" else (max(2, n // 20), 1.0, 0.5)
    weights = 1.0 / torch.arange(1, n_centres + 1).float() ** power
    members = torch.multinomial(weights, n, replacement=True, generator=gen)
    centres = torch.randn(n_centres, d, generator=gen)
    return centres[members] + noise * torch.randn(n, d, generator=gen)


def timed(fn, device: torch.device):
    """Run fn, return (result, seconds): wall time with synchronisation on CUDA, process CPU time on the CPU
    (the CPU machines are shared, so wall time there measures the neighbours too)."""
    if device.type != "cuda":
        start = time.process_time()
        return fn(), time.process_time() - start
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def compare_cpu(iters: int, kinds: list[str]) -> list[str]:
    """Table rows: time and inertia (of L2-normalised rows) for ours with the default seedings
    (default_restarts: 5-10 on these sizes) and with ten (as many as k-means-constrained's default n_init=10), for
    k-means-constrained, and the ratios ours / theirs."""
    from k_means_constrained import KMeansConstrained  # only the comparison needs it

    rows = [("| n | d | k | data | ours default (s) | ours 10 runs (s) | k-means-constrained (s) | inertia ours default "
             "| inertia ours 10 | inertia theirs | ratio default | ratio 10 runs |"),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(rows), flush=True)
    cpu = torch.device("cpu")
    for n, d, k, data in (problem for problem in CPU_PROBLEMS if problem[3] in kinds):
        x = make_rows(n, d, data, seed=n + d + k)
        one, t_one = timed(partial(balanced_kmeans, x, k, iters=iters), cpu)
        ten, t_ten = timed(partial(balanced_kmeans, x, k, iters=iters, restarts=10), cpu)
        for labels in (one, ten):
            assert torch.equal(torch.bincount(labels, minlength=k), expert_sizes(n, k))
        unit = torch.nn.functional.normalize(x.double(), dim=1).numpy()
        solver = KMeansConstrained(n_clusters=k, size_min=n // k, size_max=-(-n // k), random_state=0)
        fitted, t_theirs = timed(partial(solver.fit, unit), cpu)
        theirs = torch.from_numpy(fitted.labels_.astype(np.int64))
        a, b, c = inertia(x, one), inertia(x, ten), inertia(x, theirs)
        rows.append(f"| {n} | {d} | {k} | {data} | {t_one:.2f} | {t_ten:.2f} | {t_theirs:.2f} | {a:.2f} | {b:.2f} "
                    f"| {c:.2f} | {a / c:.4f} | {b / c:.4f} |")
        print(rows[-1], flush=True)
    return rows


def load_baseline(path: str) -> Callable[..., torch.Tensor]:
    """balanced_kmeans from another copy of partition.py (the code before a change), imported under its own name."""
    spec = importlib.util.spec_from_file_location("kmeans_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.balanced_kmeans


def full_layer(device: torch.device, shape: tuple[int, int, int], iters: int, runs: int, warmup: int,
               baseline: str | None, profile_to: Path | None) -> tuple[list[str], list[dict]]:
    """Table rows and records for a LLaMA-2-7B-shaped layer: per variant (the baseline file's balanced k-means,
    this one without and with exchange refinement) the median time over runs (after warm-up runs, variants
    interleaved), the inertia against the baseline's (or the first variant's) and a random partition's, exact
    sizes, and 32 layers' estimated time. With profile_to, torch.profiler's table of one refined run goes there."""
    n, d, k = shape
    variants = {"this code, no refinement": lambda x: balanced_kmeans(x, k, iters=iters, swaps=False),
                "this code (default: exchange refinement)": lambda x: balanced_kmeans(x, k, iters=iters)}
    if baseline:
        old = load_baseline(baseline)
        variants = {f"baseline {Path(baseline).name}": lambda x: old(x, k, iters=iters)} | variants
    rows = [("| data | variant | median time (s) | runs (s) | 32 layers (s) | inertia | vs first variant "
             "| vs random | sizes exact |"), "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(rows), flush=True)
    records = []
    for data in ("isotropic", "clustered"):
        x = make_rows(n, d, data, seed=0).to(device)
        rand = inertia(x, partition_labels(x, k, "random"))
        for _ in range(warmup):
            for fn in variants.values():
                timed(partial(fn, x), device)
        times, labels = {name: [] for name in variants}, {}
        for _ in range(runs):
            for name, fn in variants.items():
                labels[name], seconds = timed(partial(fn, x), device)
                times[name].append(seconds)
        first = None
        for name in variants:
            ours = inertia(x, labels[name])
            first = first or ours
            median = statistics.median(times[name])
            exact = torch.equal(torch.bincount(labels[name], minlength=k).cpu(), expert_sizes(n, k))
            records.append({"data": data, "variant": name, "times_s": times[name], "median_s": median,
                            "inertia": ours, "inertia_vs_first": ours / first, "inertia_random": rand,
                            "sizes_exact": exact, "shape": [n, d, k], "iters": iters})
            rows.append(f"| {data} | {name} | {median:.2f} | {', '.join(f'{t:.2f}' for t in times[name])} | "
                        f"{32 * median:.1f} | {ours:.1f} | {ours / first:.4f} | {ours / rand:.4f} | {exact} |")
            print(rows[-1], flush=True)
        if profile_to is not None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                with torch.profiler.record_function("balanced_kmeans"):
                    variants["this code (default: exchange refinement)"](x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            (profile_to / f"kmeans-profile-{data}.txt").write_text(prof.key_averages().table(sort_by=sort,
                                                                                           row_limit=40))
    return rows, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--full", action="store_true", help="LLaMA-2-7B layer shape instead of the comparison")
    parser.add_argument("--iters", type=int, default=30, help="k-means iterations (default 30)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per full-size problem (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--shape", default=",".join(map(str, FULL_SHAPE)),
                        help="with --full: n,d,k (default the LLaMA-2-7B layer 11008,4096,256)")
    parser.add_argument("--data", nargs="+", default=["isotropic", "clustered", "uneven"],
                        help="CPU comparison: which problems (isotropic, clustered, uneven; default all)")
    parser.add_argument("--baseline", help="with --full: a partition.py to time beside this one (e.g. main's)")
    parser.add_argument("--out", type=Path, help="also write the table (.md) and every run (.json) to this folder")
    parser.add_argument("--profile", action="store_true", help="with --full and --out: torch.profiler tables")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = machine_name(device)
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.full:
        title = f"layer {shape[0]} x {shape[1]}, {shape[2]} experts" + (" (LLaMA-2-7B shape)" * (shape == FULL_SHAPE))
    else:
        title = "balanced k-means vs k-means-constrained (default n_init=10), inertia of L2-normalised rows"
    clock = "wall time, synchronised" if device.type == "cuda" else "process CPU time"
    header = [f"### {title}", "",
              f"Machine: {name}; torch {torch.__version__}; {args.threads} CPU thread(s); times are {clock}.", ""]
    print("\n".join(header), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    records = []
    if args.full:
        rows, records = full_layer(device, shape, args.iters, args.runs, args.warmup, args.baseline,
                                   args.out if args.profile and args.out else None)
    else:
        rows = compare_cpu(args.iters, args.data)
    subset = "" if args.full or len(args.data) == 3 else "-" + "-".join(args.data)
    name = f"kmeans-{device.type}{'-full' if args.full else ''}{subset}"
    write_table(name, header + rows)
    if args.out:
        (args.out / f"{name}.md").write_text("\n".join(header + rows) + "\n")
        (args.out / f"{name}.json").write_text(json.dumps({"machine": machine_name(device), "torch": torch.__version__,
                                                           "runs": records}, indent=1))


if __name__ == "__main__":
    main()
