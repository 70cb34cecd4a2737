"""`python -m babel_lib.sparsing.zoo prepare|family|train|table|where --profile P [...]`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from babel_lib.errors import BabelError
from babel_lib.sparsing.zoo import paths
from babel_lib.sparsing.zoo.spec import ZooSpec, checkpoint_steps, estimated_seconds, family, spec_from_profile


def family_lines(spec: ZooSpec, jobs: int = 1) -> list[str]:
    """One line per run: shape, parameters, tokens, tokens per parameter and expected time of its job (the cost
    model in `spec`); then the expected wall time with `jobs` jobs side by side, longest first."""
    lines = [f"{'run':<19} {'axes':<11} {'d_ff':>5} {'w/d':>6} {'params':>11} {'tokens':>12} {'tok/param':>9} "
             f"{'est. s':>7}"]
    finish = [0.0] * jobs  # when each job slot frees up, runs handed out longest first (as `train` does)
    for seconds in sorted((estimated_seconds(r, spec) for r in family(spec)), reverse=True):
        finish[finish.index(min(finish))] += seconds
    for run in family(spec):
        seconds = estimated_seconds(run, spec)
        lines.append(f"{run.name:<19} {';'.join(run.axes):<11} {run.d_ff:>5} {run.width_depth_ratio:>6.1f} "
                     f"{run.params:>11,} {spec.tokens:>12,} {spec.tokens / run.params:>9.1f} {seconds:>7.1f}")
    lines.append(f"estimated wall time with {jobs} job(s): {max(finish):.0f}s; checkpoints at steps "
                 f"{checkpoint_steps(spec)}, c bisected on the last {spec.fixed_c_checkpoints}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run one step; heavy modules (torch, tokenizers) load only for the steps that
    need them, so `where` (which the Makefile asks on every call) answers at once."""
    parser = argparse.ArgumentParser(prog="python -m babel_lib.sparsing.zoo", description="Train the micro ReLU/SiLU model "
                                     "family on the corpus and tabulate its PPL-p% activation ratios.")
    parser.add_argument("command", choices=["prepare", "family", "train", "table", "where"])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--data", type=Path, help="prepared data folder (default build/zoo-data/<profile>)")
    parser.add_argument("--force", action="store_true", help="prepare: rebuild even if up to date")
    parser.add_argument("--runs", help="train: comma-separated globs of run names, e.g. 'relu-*'")
    parser.add_argument("--jobs", type=int, default=1, help="train (and family's estimate): runs trained at a time (processes)")
    parser.add_argument("--out", type=Path, help="train: folder for per-run rows (default build/<profile>/zoo/runs)")
    parser.add_argument("--from", dest="sources", type=Path, nargs="+",
                        help="table: folders holding per-run rows (default build/<profile>/zoo/runs)")
    args = parser.parse_args(argv)
    command = ["python", "-m", "babel_lib.sparsing.zoo", *(sys.argv[1:] if argv is None else argv)]
    if args.command == "where":
        print(paths.table_location(args.profile))
        return
    directory = args.data or paths.data_dir(args.profile)
    try:
        if args.command == "prepare":
            from babel_lib.sparsing.zoo.data import prepare, read_meta

            os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one core for the BPE trainer (same result)
            path = prepare(spec_from_profile(args.profile), directory, args.profile, args.force)
            meta = read_meta(path)
            print(f"zoo data: {path} ({sum(v['tokens'] for v in meta['files'].values()):,} tokens, "
                  f"vocab {meta['vocab']})")
        elif args.command == "family":
            print("\n".join(family_lines(spec_from_profile(args.profile), args.jobs)))
        elif args.command == "train":
            import torch

            from babel_lib.sparsing.zoo.data import read_meta
            from babel_lib.sparsing.zoo.spec import make_spec
            from babel_lib.sparsing.zoo.training import train

            torch.set_num_threads(make_spec(read_meta(directory)["spec"]).threads)
            train(directory, args.out or paths.runs_dir(args.profile), args.runs, args.jobs, command)
        else:
            from babel_lib.sparsing.zoo.table import write_table

            path, missing = write_table(directory, args.sources or [paths.runs_dir(args.profile)], command=command)
            print(f"zoo table: {path}" + (f"; missing runs: {', '.join(missing)}" if missing else ""))
    except BabelError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
