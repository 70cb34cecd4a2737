"""Per-notebook wall time and peak GPU memory of one `make figures` run, as a markdown table.

    python benchmarks/chain_report.py build/<run> gpumem.csv

Times come from papermill's metadata in the executed notebooks; memory from an `nvidia-smi --query-gpu=
timestamp,memory.used --format=csv,noheader,nounits -lms 1000` log (all GPUs; the peak of their sum while the
notebook ran, which includes the CUDA context and the caching allocator's reserve).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path


def memory_log(path: Path) -> list[tuple[datetime, float]]:
    """(time, MiB used summed over GPUs) per sample."""
    by_time: dict[datetime, float] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            stamp, used = (s.strip() for s in line.split(","))
            when = datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f")
        except ValueError:
            continue
        by_time[when] = by_time.get(when, 0.0) + float(used)
    return sorted(by_time.items())


def main(build: str, gpumem: str) -> None:
    samples = memory_log(Path(gpumem))
    rows, total = [], 0.0
    for nb in sorted(Path(build).glob("[0-9]*.ipynb")):
        if ".tmp." in nb.name:
            continue
        meta = json.loads(nb.read_text())["metadata"].get("papermill", {})
        start, end = (datetime.fromisoformat(meta[k]).replace(tzinfo=None) for k in ("start_time", "end_time"))
        peak = max((used for when, used in samples if start <= when <= end), default=float("nan"))
        total += meta["duration"]
        rows.append(f"| {nb.stem} | {meta['duration'] / 60:.1f} | {peak / 1024:.1f} |")
    print(f"run: {build}\n\n| notebook | wall (min) | peak GPU memory (GiB, nvidia-smi) |\n| --- | --- | --- |")
    print("\n".join(rows) + f"\n| all | {total / 60:.1f} | |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
