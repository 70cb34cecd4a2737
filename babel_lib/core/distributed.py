"""Data parallel over processes started by `torchrun`: shard the batches, sum the counters, fail together.

Every heavy pass (expert profiling, the massive-activation scan, CETT / PPL-p%, perplexity) loops over batches
whose results are sums of per-batch counters or per-sequence rows. Under `torchrun --nproc-per-node N` each rank
takes batches i with i % N == rank (`shard`), runs its share inside `together` (a rank that fails makes every
rank raise the same one-line error, so none hangs in a collective), and `all_reduce` / `gather_rows` make the
single-process result on every rank: integer counters sum exactly, and float rows are placed at their global
index in zeros before the sum (x + 0 = x), so the caller adds them up in the single-process order. Without
`torchrun` (no WORLD_SIZE in the environment) every function is the single-process identity.

Launcher, writing the artefact the notebook then reads (only rank 0 writes, atomically):
    torchrun --nproc-per-node 2 -m babel_lib.core.distributed profile --profile gpu [--model NAME]
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

    def save(self, kind, params, tensors, meta=None):
        path = super().save(kind, params, tensors, meta) if rank() == 0 else self.paths(kind, params)[0]
        barrier()
        return path


def profile_run(profile: str, model: str = "") -> list[Path]:
    """Notebook 02's counting pass (its text, partition and settings under `profile`), on this rank's share of
    the batches; writes the "frequencies" artefacts the notebook then loads (the same keys). Returns their paths."""
    from babel_lib.babel import profiler
    from babel_lib.core import config
    from babel_lib.core.models import load_model

    P = config.notebook_params("02_profile", profile, model)
    torch.set_num_threads(int(P.threads))
    torch.manual_seed(P.get("seed", 0))
    device = init()
    store = RankZeroStore(P.artefacts)
    texts = profiler.calibration_sample(P.languages, P.paragraphs, config.text_source(P))
    params = P.typed(profiler.ProfileParams)
    paths = []
    for name in P.models:
        lm = load_model(name, device if P.device in ("auto", "cuda") else P.device, P.dtype)
        parts = profiler.partitions(store, lm, params, profile, model)
        result = profiler.profile(store, lm, parts, params, texts, split="calibration", progress=rank() == 0)
        paths.append(result.path)
        if rank() == 0:
            print(f"{name}: {result.path} ({world_size()} processes)", flush=True)
    return paths


def main(argv: list[str] | None = None) -> None:
    """`torchrun --nproc-per-node N -m babel_lib.core.distributed profile --profile gpu [--model NAME]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m babel_lib.core.distributed",
                                     description="run a study's heavy pass over the processes torchrun starts")
    parser.add_argument("study", choices=["profile"])
    parser.add_argument("--profile", default="default", help="configs/<profile>.yaml")
    parser.add_argument("--model", default="", help="comma-separated models replacing the profile's")
    args = parser.parse_args(argv)
    alone = False
    try:
        init()
        profile_run(args.profile, args.model)
    except BabelError as err:
        alone = not isinstance(err, RankFailed)
        if alone:  # this rank alone: torchrun ends the others
            print(f"error: rank {rank()}: {err}", file=sys.stderr, flush=True)
        elif rank() == 0:  # every rank holds the same error: say it once
            print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        shutdown(together_ok=not alone)


if __name__ == "__main__":
    main()
