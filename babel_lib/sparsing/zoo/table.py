"""The zoo table: each run's rows (written after every checkpoint), finished-run records, and the merged
zoo.csv with PROVENANCE.json (commands, code and data hashes, commit, machine, versions, times)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from babel_lib.core.artefacts import atomic_path, write_json
from babel_lib.core.config import ROOT
from babel_lib.errors import BabelError
from babel_lib.sparsing.zoo.data import read_meta, run_key
from babel_lib.sparsing.zoo.paths import table_dir
from babel_lib.sparsing.zoo.spec import Run, ZooSpec, family, make_spec

# per checkpoint: the run and shape, training state, dense loss; the paper's protocol (`cett` is the run's one
# CETT value, bisected on its last checkpoints: `in_fixed_c`, `cett_converged`); each checkpoint's own bisection
TABLE_COLUMNS = ("run", "shape", "seed", "activation", "width", "depth", "width_depth_ratio", "d_ff", "heads",
                 "params", "axes", "step", "tokens", "tokens_per_param", "epochs", "lr", "train_loss", "dense_loss",
                 "cett", "activation_ratio", "sparse_loss", "ppl_ratio", "cett_converged", "in_fixed_c",
                 "own_cett", "own_activation_ratio", "own_ppl_ratio", "own_converged", "own_bisections")


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as CSV atomically (the whole file each time: a killed run leaves its last complete version)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def is_finished(run: Run, out: Path, key: str) -> bool:
    """Whether `out` holds a finished run made with the same spec and data (its <run>.json marks it)."""
    marker = out / f"{run.name}.json"
    return marker.exists() and json.loads(marker.read_text()).get("key") == key


def iso_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _git_commit() -> dict[str, Any]:
    """The checkout's commit and whether the zoo's inputs differ from it (read-only git; None without git)."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("diff-index", "--quiet", "HEAD", "--", "babel_lib", "configs")
    except OSError:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip() or None, "dirty": dirty.returncode != 0 if head.returncode == 0 else None}


def collect(spec: ZooSpec, key: str, directories: list[Path]
            ) -> tuple[list[dict[str, str]], dict[str, dict], list[str]]:
    """Rows and run records of every finished run found in `directories` (first found wins), and the missing runs."""
    rows, records, missing = [], {}, []
    for run in family(spec):
        found = next((d for d in directories if is_finished(run, d, key)), None)
        if found is None:
            missing.append(run.name)
            continue
        records[run.name] = json.loads((found / f"{run.name}.json").read_text())
        with open(found / f"{run.name}.csv", newline="") as handle:
            rows.extend(csv.DictReader(handle))
    return rows, records, missing


def write_table(directory: Path, sources: list[Path], dest: Path | None = None,
                command: list[str] | None = None) -> tuple[Path, list[str]]:
    """Merge the finished runs found in `sources` (made from the data in `directory`) into <dest>/zoo.csv and
    PROVENANCE.json (dest defaults to the table folder of the data's profile); returns the table and missing runs."""
    meta = read_meta(directory)
    profile = meta["profile"]
    rows, records, missing = collect(make_spec(meta["spec"]), run_key(meta), sources)
    if not rows:
        raise BabelError(f"no finished zoo run in {', '.join(map(str, sources))}; train first "
                         f"(python -m babel_lib.sparsing.zoo train --profile {profile or '<profile>'})")
    if dest is None and not profile:
        raise BabelError("zoo data made from a spec in code has no profile; pass dest= for the table")
    dest = dest or table_dir(profile)
    write_rows(dest / "zoo.csv", rows)
    write_json(dest / "PROVENANCE.json", {
        "table": "zoo.csv", "profile": profile, "written": iso_time(time.time()),
        "command": " ".join(command or sys.argv), "git": _git_commit(), "spec": meta["spec"],
        "machines": sorted({r["machine"]["device"] for r in records.values()}),
        "first_started": min(r["started"] for r in records.values()),
        "last_finished": max(r["finished"] for r in records.values()),
        "data": {"corpus_sha256": meta["corpus_sha256"], "tokenizer_sha256": meta["tokenizer_sha256"],
                 "vocab": meta["vocab"], "tokens": {k: v["tokens"] for k, v in meta["files"].items()}},
        "runs": {name: {k: r[k] for k in ("command", "machine", "started", "finished", "seconds", "train_seconds",
                                          "eval_seconds", "shared_cett", "code_sha256")} for name, r in records.items()},
        "missing_runs": missing})
    return dest / "zoo.csv", missing


def read_table(path: Path) -> list[dict[str, Any]]:
    """A zoo table (e.g. `table_path(profile)`) as typed rows: ints, floats, booleans, strings."""
    if not path.exists():
        raise BabelError(f"no zoo table at {path}; make it with `make zoo` (PROFILE=smoke for the toy family)")

    def typed(value: str) -> Any:
        if value in ("True", "False"):
            return value == "True"
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return value

    with open(path, newline="") as handle:
        return [{k: typed(v) for k, v in row.items()} for row in csv.DictReader(handle)]
