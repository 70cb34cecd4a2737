"""Benchmark expert profiling against the bare decoder forward (no LM head) on identical batches.

Embedded models on this CPU:        python benchmarks/profiling.py --device cpu --shape embedded
LLaMA-2-7B shape on a GPU:          python benchmarks/profiling.py --device cuda --shape llama2-7b
Quick check of that code path:      python benchmarks/profiling.py --device cpu --shape llama-small
Where the time goes (CUDA):          ... --trace --ops --out DIR   (kernel times per variant against the bare
                                     forward; each step of one layer's counting timed alone)
The LLaMA shapes are built from a config with random weights (bf16 on CUDA; no download); batches are random
token ids, 8 x 1024 for llama2-7b. Experts come from a random partition (the cost does not depend on it); the
notebook 02 rows also count a second random partition of about 43 neurons per expert (the paper's size).
Neurons count by the profiler's rule (|a_i| > neuron_scale x the token's RMS of a) in every row, "before" and
candidate rows included, so that their counts can be checked against the default's.
Variants are timed in interleaved rounds (warm-up first; CUDA: wall clock with synchronisation; CPU: process
CPU time), the median is reported. Writes the markdown table to stdout and to
benchmarks/results/profile-<device>.md (the check shape to profile-<device>-llama-small.md).
"""

import argparse
import os
from functools import partial
import statistics
import time

import torch

from babel_lib.core.batches import Batch
from babel_lib.core.ffn import ffn_layers
from babel_lib.core.models import run_decoder
from babel_lib.babel.moe import ExpertMap, kth_largest
from babel_lib.babel.partition import partition_labels
from babel_lib.babel.profiler import ExpertProfiler, magnitude_counts, tally
from benchmarks.common import kernel_times, machine_name, trace_summary, write_table

LLAMA = {  # LlamaConfig keywords, and the batch to time
    "llama2-7b": ({"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}, (8, 1024)),
    "llama-small": ({"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                     "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 32000}, (2, 128)),
}


VARIANTS = (("zscore", "sum"), ("topk", "abs"), ("zscore", "abs"))  # notebook 02's default beside topk/sum
PAPER_NEURONS = 43  # the second expert size counted by notebook 02's default (neurons per expert)


def variants(device: torch.device) -> dict[str, dict]:
    """Profiler settings to time, by row label (None = the bare forward; "coarse": also count the ~43-neuron
    map). On CUDA, "before" rows select experts as the profiler did before 2026-11-30 (the k-th largest score
    by topk), "candidate" rows try other kernels."""
    rows = {
        "bare decoder forward (no LM head)": None,
        "topk 25%, sum, experts only": {"neurons": False},
        "topk 25%, sum, experts + neurons (default)": {},
        "zscore 25%, sum, experts + neurons": {"rule": "zscore"},
        "threshold > 0, sum, experts + neurons": {"rule": "threshold"},
        "topk 25%, abs, experts + neurons": {"mode": "abs"},
        "notebook 02 default: 4 (rule, mode) x 2 expert sizes + neurons": {"variants": VARIANTS, "coarse": True},
        "topk 25%, sum, experts + neurons, one-hot matmul scores": {"scorer": "matmul"},
    }
    if device.type != "cuda":
        return rows
    del rows["topk 25%, sum, experts + neurons, one-hot matmul scores"]  # the CUDA default already
    rows["before: topk 25%, sum, experts + neurons, topk k-th"] = {"kth": "topk"}
    rows["topk 25%, sum, experts only, compiled counting"] = {"neurons": False, "compile": True}
    rows["before: topk 25%, sum, experts only, compiled counting, topk k-th"] = {"neurons": False, "compile": True,
                                                                                 "kth": "topk"}
    rows["topk 25%, sum, experts + neurons, compiled counting (gpu profile)"] = {"compile": True}
    rows["before: topk 25%, sum, experts + neurons, compiled counting, topk k-th (gpu profile)"] = {
        "compile": True, "kth": "topk"}
    rows["candidate: experts + neurons, compiled, k-th by rank count"] = {"compile": True, "kth": "rank"}
    rows["candidate: experts + neurons, compiled max-autotune-no-cudagraphs"] = {
        "compile": "max-autotune-no-cudagraphs"}
    rows["candidate: experts + neurons, one Triton kernel over a (scores + neuron counts), compiled sort"] = {
        "fused": True}
    rows["threshold > 0, sum, experts + neurons, compiled counting"] = {"rule": "threshold", "compile": True}
    rows["notebook 02 default, compiled counting"] = {"variants": VARIANTS, "coarse": True, "compile": True}
    return rows


def topk_tally(scores, mask, rule, k, threshold):
    """`tally` as it selected before 2026-11-30 (rule topk): the k-th largest score by topk's radix selection on
    every device (now a sort on CUDA); rule threshold as the library's."""
    if rule != "topk":
        return tally(scores, mask, rule, k, threshold)
    return ((scores >= kth_largest(scores, k, by_sort=False)) & mask[:, None]).sum(0)


def rank_tally(scores, mask, rule, k, threshold):
    """A candidate `tally` (rule topk, compiled only): an expert is active when fewer than k scores of its token
    are strictly greater (the same set as score >= the k-th largest); compiled, the [N, E, E] comparison is
    fused into one reduction and never stored."""
    if rule != "topk":
        return tally(scores, mask, rule, k, threshold)
    greater = (scores[:, None, :] > scores[:, :, None]).sum(-1)
    return ((greater < k) & mask[:, None]).sum(0)


class Variant(ExpertProfiler):
    """ExpertProfiler whose per-layer expert selection (`_tally`, rules topk and threshold; zscore is unchanged)
    is an earlier version or a candidate (benchmark only): kth "topk" (before) or "rank" (candidate); compile
    True or a torch.compile mode (for the expert selection and the neuron count). Neurons count by the
    library's magnitude rule in every variant."""

    def __init__(self, model, experts, *, kth: str = "", compile: bool | str = False, **settings):
        super().__init__(model, experts, compile=bool(compile), **settings)
        fn = {"": tally, "topk": topk_tally, "rank": rank_tally}[kth]
        if isinstance(compile, str):
            self._tally = torch.compile(fn, mode=compile)
            self._magnitude = torch.compile(magnitude_counts, mode=compile)
        else:
            self._tally = torch.compile(fn) if compile else fn


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


def run_variant(model, profilers: dict, label: str, batches) -> None:
    """One pass over `batches`: the bare forward when `label` has no profiler, else counted by its profiler."""
    if label not in profilers:
        for b in batches:
            run_decoder(model, b.input_ids, b.attention_mask)
        return
    with profilers[label] as prof:
        for b in batches:
            prof.count(b, 0)


def random_experts(model, n_experts: int) -> ExpertMap:
    """A random balanced partition of every layer into n_experts (the cost does not depend on the partition)."""
    layers = ffn_layers(model)
    return ExpertMap(torch.stack([partition_labels(f.cluster_rows(), n_experts, "random", seed=f.index).cpu()
                                  for f in layers]), n_experts)


@torch.no_grad()
def measure(model, batches, device, experts: ExpertMap, labels: list[str], warmup: int, runs: int):
    """Median seconds per pass over `batches` for every variant, and the profilers (for count checks)."""
    settings = variants(device)
    coarse = None  # the ~43-neuron map of notebook 02's default rows, made when one of them runs
    if any((settings[label] or {}).get("coarse") for label in labels):
        coarse = random_experts(model, max(1, round(experts.width / PAPER_NEURONS)))
    profilers, failed = {}, {}  # a variant that cannot run here (no compiler, no Triton) is reported
    for label in labels:
        setting = dict(settings[label] or {})
        try:
            if setting.pop("fused", False):
                from benchmarks.fused import FusedProfiler

                profilers[label] = FusedProfiler(model, experts, compile=True, **setting)
            elif settings[label] is not None:
                maps = [experts, coarse] if setting.pop("coarse", False) else experts
                profilers[label] = Variant(model, maps, **setting)
        except Exception as err:  # noqa: BLE001 - one variant's failure must not lose the others
            failed[label] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    seconds = {label: [] for label in labels if label not in failed}
    for round_ in range(warmup + runs):
        for label in [label for label in seconds if label not in failed]:
            try:
                t = timed(partial(run_variant, model, profilers, label, batches), device)
            except Exception as err:  # noqa: BLE001 - any failure of one variant must not lose the others
                failed[label] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                profilers.pop(label, None)
                continue
            if round_ >= warmup:
                seconds[label].append(t)
    medians = {label: statistics.median(ts) for label, ts in seconds.items() if label not in failed}
    return medians, profilers, failed


def cuda_micros(fn, reps: int) -> float:
    """Median microseconds of fn() on the GPU (CUDA events around each call, after 3 untimed calls)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(1000 * start.elapsed_time(end))
    return statistics.median(times)


def split_k_scores(a: torch.Tensor, onehot: torch.Tensor, parts: int) -> torch.Tensor:
    """A candidate scorer: the one-hot matmul split along d_ff into `parts` batched GEMMs (more thread blocks
    for a matmul only 256 columns wide), then summed; fp32 accumulation in another order (timing only)."""
    n, width = a.shape
    chunks = a.view(n, parts, width // parts).transpose(0, 1)
    return torch.bmm(chunks, onehot.view(parts, width // parts, -1), out_dtype=torch.float32).sum(0)


@torch.no_grad()
def op_times(model, experts: ExpertMap, batch: Batch, bare_layer_s: float, ratio: float = 0.25,
             reps: int = 30) -> list[str]:
    """Each step of one layer's counting timed alone on layer 0's activation a of `batch` (its scores ~8 MB
    stay in L2, so small steps time a little optimistic), beside the bare forward's time per layer."""
    from babel_lib.core.hooks import hooked, site

    seen = {}

    def keep(a: torch.Tensor) -> None:  # observes only (a hook that returns a tensor replaces the activation)
        seen["a"] = a.reshape(-1, a.shape[-1])

    with hooked(model, {site(0, "mlp.hook_post"): keep}):
        run_decoder(model, batch.input_ids, batch.attention_mask)
    a, mask = seen["a"], batch.count_mask.reshape(-1).to(seen["a"].device)
    k = round(ratio * experts.n_experts)
    onehot = experts.onehot(0, a.device, a.dtype)
    scores = experts.scores(0, a)
    kth = kth_largest(scores, k, by_sort=True)
    counters = torch.zeros(2, experts.n_experts + a.shape[1], dtype=torch.long, device=a.device)
    compiled = {name: torch.compile(fn) for name, fn in (("now", tally), ("before", topk_tally), ("rank", rank_tally),
                                                         ("neurons", magnitude_counts))}
    steps = {
        "one read of a (sum to fp32): the floor of a pass over a": lambda: a.sum(dtype=torch.float32),
        "scores: mm with the one-hot, fp32 out (ExpertMap.scores)": lambda: experts.scores(0, a),
        "candidate scores: split-K x2 (bmm, fp32 out) + sum": lambda: split_k_scores(a, onehot, 2),
        "candidate scores: split-K x4 (bmm, fp32 out) + sum": lambda: split_k_scores(a, onehot, 4),
        "k-th largest by topk + amin (before)": lambda: kth_largest(scores, k, by_sort=False),
        "k-th largest by sort (now)": lambda: kth_largest(scores, k, by_sort=True),
        "activated set, masked column sum (eager)": lambda: ((scores >= kth) & mask[:, None]).sum(0),
        "neuron count, |a| > RMS (eager)": lambda: magnitude_counts(a, mask),
        "neuron count, |a| > RMS (compiled)": lambda: compiled["neurons"](a, mask),
        "expert tally, compiled (now: sort k-th)": lambda: compiled["now"](scores, mask, "topk", k, 0.0),
        "expert tally, compiled (before: topk k-th)": lambda: compiled["before"](scores, mask, "topk", k, 0.0),
        "expert tally, compiled (candidate: rank count)": lambda: compiled["rank"](scores, mask, "topk", k, 0.0),
        "two counter updates (+= into int64 rows)": lambda: (counters[0].add_(counters[1]), counters[1].add_(1)),
    }
    try:
        from benchmarks.fused import scores_and_active_counts

        labels = experts.layer_labels(0, a.device)
        for bm, bk, warps, stages in ((64, 32, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3), (64, 32, 8, 5), (128, 32, 8, 3)):
            steps[f"candidate: one Triton kernel, scores + neuron counts (BM {bm}, BK {bk}, {warps} warps, "
                  f"{stages} stages)"] = partial(scores_and_active_counts, a, labels, mask, experts.n_experts, 1.0,
                                                 bm, bk, warps, stages)
    except ImportError as err:
        steps[f"candidate: one Triton kernel (not run: {err})"] = None
    bare = 1e6 * bare_layer_s
    lines = [(f"### One layer's counting, step by step ({a.shape[0]} tokens x d_ff {a.shape[1]}, "
              f"{experts.n_experts} experts, k = {k}; bare forward {bare:,.0f} µs per layer)"), "",
             "| step | µs | % of a bare layer |", "| --- | --- | --- |"]
    for name, fn in steps.items():
        if fn is None:
            lines.append(f"| {name} | | |")
            continue
        try:
            micros = cuda_micros(fn, reps)
            lines.append(f"| {name} | {micros:,.1f} | {100 * micros / bare:.2f}% |")
        except Exception as err:  # noqa: BLE001 - a candidate that cannot run here is reported, not fatal
            lines.append(f"| {name} | failed: {type(err).__name__}: {str(err).splitlines()[0][:120]} | |")
    return lines


def table(name: str, medians: dict[str, float], tokens: int, shape: str) -> list[str]:
    bare = medians["bare decoder forward (no LM head)"]
    lines = [f"### {name} ({shape}, {tokens} counted tokens per pass)", "",
             "| variant | tokens/s | ms per pass | × bare |", "| --- | --- | --- | --- |"]
    lines += [f"| {label} | {tokens / s:,.0f} | {1000 * s:,.1f} | {s / bare:.3f} |" for label, s in medians.items()]
    return lines


def counting_keys(p: ExpertProfiler) -> dict[tuple[int, str, str], tuple[int, str, str]]:
    """{(experts of the map, rule, mode): the profiler's key in p.counts} (maps of different profilers compare
    by their size: every row uses the same random maps)."""
    return {(p.maps[i].n_experts, r, m): (i, r, m) for i, r, m in p.counts}


def checks(profilers: dict, tokens: int, passes: int) -> list[str]:
    """Sanity lines: every profiler counted every token once per pass, and variants of one rule, score mode,
    scorer and neuron setting (eager, compiled, before, candidates, notebook 02's several countings) counted
    exactly the same: every counting two profilers share (same map size, rule and mode) and the neuron counts.
    A profiler is checked against an earlier one of its group with the same countings when there is one (the
    compiled notebook 02 row against the eager one), else against the group's first (the default)."""
    lines = []
    counted = {label: int(p.tokens.sum()) for label, p in profilers.items()}
    lines.append(f"- every profiler counted {tokens} tokens x {passes} passes: "
                 f"{'yes' if set(counted.values()) == {tokens * passes} else counted}")
    groups: dict[tuple, list[str]] = {}
    for label, p in profilers.items():
        groups.setdefault((p.rule, p.mode, p.scorer, p.neurons), []).append(label)
    for labels in groups.values():
        for n, label in enumerate(labels[1:], 1):
            p = profilers[label]
            mine = counting_keys(p)
            ref = next((other for other in labels[:n] if counting_keys(profilers[other]).keys() == mine.keys()),
                       labels[0])
            first = profilers[ref]
            theirs = counting_keys(first)
            shared = [key for key in mine if key in theirs]
            same = all(torch.equal(p.counts[mine[key]], first.counts[theirs[key]]) for key in shared) and \
                torch.equal(p.neuron_counts, first.neuron_counts)
            moved = sum(int((p.counts[mine[key]] - first.counts[theirs[key]]).abs().sum()) for key in shared)
            total = sum(int(first.counts[theirs[key]].sum()) for key in shared)
            neurons = int((p.neuron_counts - first.neuron_counts).abs().sum())
            lines.append(f"- {label}: counts identical to those of {ref!r}: {same} ({len(shared)} counting(s) "
                         f"compared, {moved} of {total} expert activations differ, {neurons} neuron activations)")
    return lines


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
    parser.add_argument("--only", action="append", default=[],
                        help="time only the variants whose label contains this (repeatable; the bare forward always)")
    parser.add_argument("--trace", action="store_true",
                        help="CUDA: torch.profiler kernel times of one pass per variant against the bare forward")
    parser.add_argument("--ops", action="store_true", help="CUDA: time each step of one layer's counting alone")
    parser.add_argument("--out", default=None, help="also write the tables into this folder")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    runs = args.runs if args.runs is not None else (10 if device.type == "cuda" else 3)
    bare = "bare decoder forward (no LM head)"
    labels = [label for label in variants(device) if label == bare or not args.only
              or any(part in label for part in args.only)]

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
    suffix = f"{device.type}{'-' + args.shape if args.shape == 'llama-small' else ''}"
    traces, ops = [], []
    for name, build in builds.items():
        model, batches = build()
        batches = [b.to(device) for b in batches]
        experts = random_experts(model, args.experts)
        tokens = sum(b.n_tokens for b in batches)
        shape = " + ".join(f"{b.input_ids.shape[0]}×{b.input_ids.shape[1]}" for b in batches)
        medians, profilers, failed = measure(model, batches, device, experts, labels, warmup, runs)
        section = table(name, medians, tokens, f"batch {shape}") + [""] + checks(profilers, tokens, warmup + runs)
        section += [f"- {label}: failed ({why})" for label, why in failed.items()]
        print("\n".join(section), flush=True)
        lines += section + [""]
        if args.trace and device.type == "cuda":
            with torch.no_grad():
                kernels = {label: kernel_times(partial(run_variant, model, profilers, label, batches))
                           for label in medians}
            traces += trace_summary(f"{name}: kernels of one pass (batch {shape})", kernels, bare)
        if args.ops and device.type == "cuda":
            ops += op_times(model, experts, batches[0], medians[bare] / len(ffn_layers(model))) + [""]
        del model, profilers
    write_table(f"profile-{suffix}", lines, args.out)
    for kind, extra in (("trace", traces), ("ops", ops)):
        if extra:
            title = f"# Profiling: {kind} on {machine_name(device)}, torch {torch.__version__}"
            write_table(f"profile-{kind}-{suffix}", [title, ""] + extra, args.out)


if __name__ == "__main__":
    main()
