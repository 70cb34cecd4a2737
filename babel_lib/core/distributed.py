"""Data parallel over processes started by `torchrun`: shard the batches, sum the counters, fail together.

Every heavy pass (expert profiling, the massive-activation scan, CETT / PPL-p%, perplexity) loops over batches
whose results are sums of per-batch counters or per-sequence rows. Under `torchrun --nproc-per-node N` each rank
takes batches i with i % N == rank (`shard`), runs its share inside `together` (a rank that fails makes every
rank raise the same one-line error, so none hangs in a collective), and `all_reduce` / `gather_rows` make the
single-process result on every rank: integer counters sum exactly, and float rows are placed at their global
index in zeros before the sum (x + 0 = x), so the caller adds them up in the single-process order. Without
`torchrun` (no WORLD_SIZE in the environment) every function is the single-process identity.

Launchers, writing the artefacts a notebook then reads under the same keys (only rank 0 writes, atomically):
    torchrun --nproc-per-node 2 -m babel_lib.core.distributed profile scan sparsity perplexity --profile gpu [--model M]
(profile: 02's counts; scan: 03's residual scan; sparsity: 04's CETT / PPL-p%; perplexity: 05's pruned perplexities.)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from babel_lib.core.artefacts import ArtefactStore
from babel_lib.errors import BabelError

T = TypeVar("T")
TIMEOUT_S = int(os.environ.get("BABEL_DIST_TIMEOUT", "1800"))  # a collective waiting longer than this fails


def active() -> bool:
    """Whether this process is one rank of several (a process group is up)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def init() -> torch.device:
    """Join the process group torchrun describes in the environment (nccl on CUDA, gloo on the CPU); return
    this rank's device (cuda:LOCAL_RANK, or the CPU). Without torchrun: no group, the default device."""
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=TIMEOUT_S),
                                **({"device_id": device} if cuda else {}))
    return device


def shutdown(together_ok: bool = True) -> None:
    """Leave the process group. Ranks first meet at a barrier (unless this rank failed alone, when the others
    may never come): a gloo rank whose peer tore its connections down mid-exit dies with SIGABRT."""
    if dist.is_available() and dist.is_initialized():
        if together_ok and active():
            dist.barrier()
        dist.destroy_process_group()


def shard(items: Sequence[T]) -> list[tuple[int, T]]:
    """This rank's share of `items` with their global indices: (i, item) for i % world_size == rank."""
    size, me = world_size(), rank()
    return [(i, item) for i, item in enumerate(items) if i % size == me]


def _backend_device(tensor: torch.device) -> torch.device:
    """Where a collective's tensor must live: the rank's GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The element-wise sum over ranks of each tensor (same names and shapes on every rank), on each tensor's
    own device and dtype. Exact for integer counters; for floats use `gather_rows` to keep the order."""
    if not active():
        return dict(tensors)
    out = {}
    for name, t in tensors.items():
        buf = t.to(_backend_device(t.device), copy=True)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        out[name] = buf.to(t.device)
    return out


def gather_rows(rows: torch.Tensor, index: Sequence[int], n: int) -> torch.Tensor:
    """Rows [len(index), ...] this rank computed for global rows `index` -> all n rows [n, ...] on every rank.

    Each rank writes its rows into zeros and the zeros-filled tensors are summed: every row has exactly one
    non-zero source, so the sum reproduces it bit for bit (floats too)."""
    if len(index) != rows.shape[0]:
        raise BabelError(f"gather_rows got {rows.shape[0]} rows for {len(index)} indices")
    if not active():
        if sorted(index) != list(range(n)):
            raise BabelError(f"gather_rows on one process needs every row 0..{n - 1}")
        return rows[torch.argsort(torch.as_tensor(index, dtype=torch.long))] if n else rows
    full = torch.zeros(n, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    if len(index):
        full[torch.as_tensor(index, dtype=torch.long, device=rows.device)] = rows
    return all_reduce({"rows": full})["rows"]


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj` (picklable), in rank order; [obj] on one process."""
    if not active():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


class RankFailed(BabelError):
    """A rank failed inside `together`; every rank raises this same error."""


def together(work: Callable[[], T]) -> T:
    """Run this rank's `work`; if any rank raised, every rank raises one BabelError naming the first failed rank
    and its error (no rank is left waiting in a later collective). On one process: just `work()`."""
    if not active():
        return work()
    error: BaseException | None = None
    result = None
    try:
        result = work()
    except Exception as err:  # noqa: BLE001 - reported to every rank below, then raised
        error = err
    message = None if error is None else str(error) if isinstance(error, BabelError) else \
        f"{type(error).__name__}: {error}"
    messages: list[str | None] = [None] * world_size()
    dist.all_gather_object(messages, message)
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        first, text = failed[0]
        others = f" (ranks {', '.join(str(r) for r, _ in failed[1:])} failed too)" if len(failed) > 1 else ""
        raise RankFailed(f"rank {first} of {world_size()} failed: {text}{others}") from error
    return result


def barrier() -> None:
    if active():
        dist.barrier()


class RankZeroStore(ArtefactStore):
    """An ArtefactStore for ranks computing the same artefact together: every rank computes (its share), only
    rank 0 writes (atomically, after the collective pass succeeded), and the others read once it is there."""

    def __init__(self, root: str | Path):
        super().__init__(root)
        self.used: list[Path] = []  # every artefact computed or found through `cached`, in order

    def save(self, kind, params, tensors, meta=None):
        path = super().save(kind, params, tensors, meta) if rank() == 0 else self.paths(kind, params)[0]
        barrier()
        return path

    def cached(self, kind, params, compute):
        """As ArtefactStore.cached, with rank 0's view of whether the artefact exists sent to every rank: a rank
        that looked only after rank 0 had written it would skip the compute (and its collectives) alone."""
        found = [self.exists(kind, params)]
        if active():
            dist.broadcast_object_list(found, src=0)
        if not found[0]:
            tensors, meta = compute()
            self.save(kind, params, tensors, meta)
        self.used.append(self.paths(kind, params)[0])
        return self.load(kind, params)


def _setup(notebook: str, profile: str, model: str):
    """A launcher's start: the notebook's parameters, threads and seeds as the notebook sets them, this rank's
    device (where the profile asks for a GPU) and a store where only rank 0 writes."""
    from babel_lib.core import config

    P = config.notebook_params(notebook, profile, model)
    config.seed_runtime(P)
    device = init()
    return P, (device if P.device in ("auto", "cuda") else P.device), RankZeroStore(P.artefacts)


def _say(line: str) -> None:
    if rank() == 0:
        print(line, flush=True)


def profile_run(profile: str, model: str = "") -> list[Path]:
    """Notebook 02's counting pass (its text, partition and settings under `profile`), on this rank's share of
    the batches; writes the "frequencies" artefacts and the run's index the notebook then loads (the same keys).
    Each launcher returns the artefacts it computed or found."""
    from babel_lib.babel import profiler
    from babel_lib.core import config
    from babel_lib.core.models import load_model

    P, device, store = _setup("02_profile", profile, model)
    texts = profiler.calibration_sample(P.languages, P.paragraphs, config.text_source(P))
    params = P.typed(profiler.ProfileParams)
    profiles = {}
    for name in P.models:
        lm = load_model(name, device, P.dtype)
        parts = profiler.partitions(store, lm, params, profile, model)
        profiles[name] = profiler.profile(store, lm, parts, params, texts, split="calibration", progress=rank() == 0)
        _say(f"profile {name}: {profiles[name].path} ({world_size()} processes)")
        del lm, parts
    if rank() == 0:
        profiler.save_index(P.artefacts, P.run, profiles)  # what notebooks 02 (explorer) and 05 look models up in
    barrier()  # a `perplexity` run next reads the index on every rank
    return store.used


def scan_run(profile: str, model: str = "") -> list[Path]:
    """Notebook 03's residual-stream scan of every run (model, with/without BOS) on its calibration windows;
    writes the "massive-scan" artefacts the notebook then loads. Models load as in 03 (eager attention)."""
    from babel_lib.core import config
    from babel_lib.core.models import load_model
    from babel_lib.massive.scan import ScanParams, runs, scan

    P, device, store = _setup("03_massive_activations", profile, model)
    source = config.text_source(P)
    calibration = source.load(P.languages, "calibration", P.scan_paragraphs)
    texts = {lang: calibration[lang] for lang in P.languages}
    params = P.typed(ScanParams)
    for name in P.models:
        lm = load_model(name, device, P.dtype, attn_implementation="eager")
        for run in runs({name: lm}):
            scan(store, lm, params, texts, bos=run.bos, corpus_sha256=source.identity)
            _say(f"scan {run.label}: {store.used[-1]} ({world_size()} processes)")
        del lm
    return store.used


def sparsity_run(profile: str, model: str = "") -> list[Path]:
    """Notebook 04's CETT / PPL-p% measurements (PPL-p% on the full set, its per-language numbers and the Pareto
    points on the sweep set); writes the "sparsity-pareto" artefact the notebook then loads."""
    from babel_lib.core import config
    from babel_lib.core.models import load_model
    from babel_lib.sparsing.studies import EvalParams, ParetoParams, pareto

    P, device, store = _setup("04_sparsity_scaling", profile, model)
    evaluation, pareto_params = P.typed(EvalParams), P.typed(ParetoParams)
    source = config.text_source(P)
    corpus = source.load(P.languages, "heldout", evaluation.paragraphs)
    heldout = {lang: corpus[lang] for lang in P.languages}
    for name in P.models:
        lm = load_model(name, device, P.dtype)
        found = pareto(store, lm, pareto_params, evaluation, heldout, source.identity)
        _say(f"sparsity {name}: PPL-{pareto_params.p:g}% at c = {found.cett:.4f} ({world_size()} processes)")
        del lm
    return store.used


def perplexity_run(profile: str, model: str = "") -> list[Path]:
    """Notebook 05's perplexity evaluations of every pruning (it needs notebook 02's frequencies: run the
    `profile` launcher or the notebook first); writes the "pruning" artefacts the notebook then loads."""
    from babel_lib.babel.conversion import run_partition
    from babel_lib.babel.pruning import Frequencies
    from babel_lib.babel.pruning_study import PruneParams, prune
    from babel_lib.core import config
    from babel_lib.core.models import load_model

    P, device, store = _setup("05_prune", profile, model)
    params = P.typed(PruneParams)
    heldout = config.text_source(P).load(params.eval_languages, "heldout", params.paragraphs)
    texts = {lang: heldout[lang] for lang in params.eval_languages}
    for name in P.models:
        lm = load_model(name, device, P.dtype)
        part = run_partition(store, lm, profile, model)
        freqs = Frequencies.of_run(P.artefacts, P.run, name)
        prune(store, lm, part.experts, freqs, part.params.as_dict(), texts, params)
        _say(f"perplexity {name}: {len(params.rates)} rates x {len(texts)} languages ({world_size()} processes)")
        del lm, part
    return store.used


STUDIES: dict[str, Callable[[str, str], list[Path]]] = {
    "profile": profile_run, "scan": scan_run, "sparsity": sparsity_run, "perplexity": perplexity_run}


def main(argv: list[str] | None = None) -> None:
    """`torchrun --nproc-per-node N -m babel_lib.core.distributed STUDY [STUDY ...] --profile P [--model M]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m babel_lib.core.distributed",
                                     description="run studies' heavy passes over the processes torchrun starts, "
                                                 "writing the artefacts the notebooks then read")
    parser.add_argument("studies", nargs="+", choices=list(STUDIES),
                        help="profile (02), scan (03), sparsity (04), perplexity (05; after profile), in this order")
    parser.add_argument("--profile", default="default", help="configs/<profile>.yaml")
    parser.add_argument("--model", default="", help="comma-separated models replacing the profile's")
    args = parser.parse_args(argv)
    alone, status = False, 0
    try:
        init()
        for study in args.studies:
            STUDIES[study](args.profile, args.model)
    except BabelError as err:
        alone, status = not isinstance(err, RankFailed), 1
        if alone:  # this rank alone: torchrun ends the others
            print(f"error: rank {rank()}: {err}", file=sys.stderr, flush=True)
        elif rank() == 0:  # every rank holds the same error: say it once
            print(f"error: {err}", file=sys.stderr, flush=True)
    finally:
        shutdown(together_ok=not alone)
    # artefacts are written (atomically) and the group is gone: leave without interpreter finalization, where
    # gloo's worker threads can still abort the process ("terminate called without an active exception")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
