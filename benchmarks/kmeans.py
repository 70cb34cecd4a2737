"""Benchmark balanced k-means: against k-means-constrained on CPU, and at LLaMA-2-7B layer shape on a device.

CPU comparison (needs k-means-constrained):  PYTHONPATH=. python -m benchmarks.kmeans
LLaMA-2-7B layer (11008 x 4096, 256 experts): PYTHONPATH=. python -m benchmarks.kmeans --device cuda --full
Writes the markdown table to stdout and to benchmarks/results/kmeans-<device>[-full].md. Times are process CPU
time on the CPU and synchronised wall time on CUDA.
"""

import argparse
import statistics
import time

import numpy as np
import torch

from babel_lib.babel.partition import balanced_kmeans, expert_sizes, inertia, partition_labels
from benchmarks.common import machine_name, write_table

# (n, d, k, data): small to the largest that k-means-constrained (n_init=10) finishes in about a minute.
CPU_PROBLEMS = [
    (240, 16, 8, "clustered"), (240, 16, 8, "isotropic"),
    (600, 32, 12, "clustered"), (600, 32, 12, "isotropic"),
    (1000, 16, 40, "clustered"), (1000, 64, 40, "isotropic"),
    (1500, 64, 30, "clustered"), (1536, 64, 48, "isotropic"),
    (2048, 64, 64, "clustered"), (2048, 128, 64, "isotropic"),
    (3072, 64, 96, "clustered"), (4096, 128, 128, "isotropic"),
]
FULL_SHAPE = (11008, 4096, 256)


def make_rows(n: int, d: int, data: str, seed: int) -> torch.Tensor:
    """Synthetic neuron rows: isotropic gaussian, or a gaussian mixture with uneven cluster popularity
    (n/32 centres, Zipf-like weights) so the balance constraint has to split and merge clusters."""
    gen = torch.Generator().manual_seed(seed)
    if data == "isotropic":
        return torch.randn(n, d, generator=gen)
    n_centres = max(2, n // 32)
    weights = 1.0 / torch.arange(1, n_centres + 1).float() ** 0.7
    members = torch.multinomial(weights, n, replacement=True, generator=gen)
    centres = torch.randn(n_centres, d, generator=gen)
    return centres[members] + 0.8 * torch.randn(n, d, generator=gen)


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


def compare_cpu(iters: int) -> list[str]:
    """Table rows: time and inertia (of L2-normalised rows) for ours with one seeding and with ten (as many
    as k-means-constrained's default n_init=10), for k-means-constrained, and the ratios ours / theirs."""
    from k_means_constrained import KMeansConstrained  # only the comparison needs it

    rows = ["| n | d | k | data | ours 1 run (s) | ours 10 runs (s) | k-means-constrained (s) | inertia ours 1 "
            "| inertia ours 10 | inertia theirs | ratio 1 run | ratio 10 runs |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(rows), flush=True)
    cpu = torch.device("cpu")
    for n, d, k, data in CPU_PROBLEMS:
        x = make_rows(n, d, data, seed=n + d + k)
        one, t_one = timed(lambda: balanced_kmeans(x, k, iters=iters), cpu)
        ten, t_ten = timed(lambda: balanced_kmeans(x, k, iters=iters, restarts=10), cpu)
        for labels in (one, ten):
            assert torch.equal(torch.bincount(labels, minlength=k), expert_sizes(n, k))
        unit = torch.nn.functional.normalize(x.double(), dim=1).numpy()
        solver = KMeansConstrained(n_clusters=k, size_min=n // k, size_max=-(-n // k), random_state=0)
        fitted, t_theirs = timed(lambda: solver.fit(unit), cpu)
        theirs = torch.from_numpy(fitted.labels_.astype(np.int64))
        a, b, c = inertia(x, one), inertia(x, ten), inertia(x, theirs)
        rows.append(f"| {n} | {d} | {k} | {data} | {t_one:.2f} | {t_ten:.2f} | {t_theirs:.2f} | {a:.2f} | {b:.2f} "
                    f"| {c:.2f} | {a / c:.4f} | {b / c:.4f} |")
        print(rows[-1], flush=True)
    return rows


def full_layer(device: torch.device, iters: int, runs: int, warmup: int) -> list[str]:
    """Table rows for a LLaMA-2-7B-shaped layer: median time over runs (after warm-up runs), inertia
    against a random partition, exact sizes, and 32 layers' estimated time."""
    n, d, k = FULL_SHAPE
    rows = ["| data | iters | median time (s) | runs (s) | 32 layers (s) | inertia | random | ratio | sizes exact |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(rows), flush=True)
    for data in ("isotropic", "clustered"):
        x = make_rows(n, d, data, seed=0).to(device)
        for _ in range(warmup):
            timed(lambda: balanced_kmeans(x, k, iters=iters), device)
        times = []
        for _ in range(runs):
            labels, seconds = timed(lambda: balanced_kmeans(x, k, iters=iters), device)
            times.append(seconds)
        exact = torch.equal(torch.bincount(labels, minlength=k).cpu(), expert_sizes(n, k))
        ours, rand = inertia(x, labels), inertia(x, partition_labels(x, k, "random"))
        median = statistics.median(times)
        rows.append(f"| {data} | {iters} | {median:.2f} | {', '.join(f'{t:.2f}' for t in times)} | "
                    f"{32 * median:.1f} | {ours:.1f} | {rand:.1f} | {ours / rand:.4f} | {exact} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--full", action="store_true", help="LLaMA-2-7B layer shape instead of the comparison")
    parser.add_argument("--iters", type=int, default=30, help="k-means iterations (default 30)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per full-size problem (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = machine_name(device)
    if args.full:
        title = f"LLaMA-2-7B-shaped layer {FULL_SHAPE[0]} x {FULL_SHAPE[1]}, {FULL_SHAPE[2]} experts"
    else:
        title = "balanced k-means vs k-means-constrained (default n_init=10), inertia of L2-normalised rows"
    clock = "wall time, synchronised" if device.type == "cuda" else "process CPU time"
    header = [f"### {title}", "",
              f"Machine: {name}; torch {torch.__version__}; {args.threads} CPU thread(s); times are {clock}.", ""]
    print("\n".join(header), flush=True)
    rows = full_layer(device, args.iters, args.runs, args.warmup) if args.full else compare_cpu(args.iters)
    write_table(f"kmeans-{device.type}{'-full' if args.full else ''}", header + rows)


if __name__ == "__main__":
    main()
