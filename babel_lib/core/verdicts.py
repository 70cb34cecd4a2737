"""Verdicts: each paper claim beside our number, with a verdict computed by a stated rule.

Every notebook ends with `verdict_table(...)` of `Verdict`s and saves them (`save_verdicts`) into
build/<run>/verdicts/<notebook>.json; `python -m babel_lib.core.verdicts readme <run>` turns all of them into the
README's "what reproduces" table, so nothing there is written by hand.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from babel_lib.core.artefacts import write_json
from babel_lib.core.config import ROOT
from babel_lib.errors import BabelError

VERDICTS = ("reproduced", "partly", "not reproduced", "not attempted")
README_START, README_END = "<!-- verdicts:start -->", "<!-- verdicts:end -->"


@dataclass(frozen=True)
class Verdict:
    """One claim of a paper, the paper's own number, ours (with its uncertainty), and the verdict's rule."""

    paper: str  # "Unraveling Babel", "Massive Activations", "Sparsing Law"
    claim: str  # the claim in one sentence, as the paper states it
    paper_value: str  # the paper's number, with where it comes from (section, figure, table)
    ours: str  # our number with its uncertainty, or why there is none
    verdict: str  # one of VERDICTS
    rule: str  # the rule that decided the verdict, stated so a reader can re-apply it

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise BabelError(f"verdict {self.verdict!r} is not one of {', '.join(VERDICTS)}")


def decide(reproduced: bool, partly: bool = False) -> str:
    """'reproduced' when the rule's full condition holds, 'partly' when its weaker one does, else 'not reproduced'."""
    return "reproduced" if reproduced else "partly" if partly else "not reproduced"


def verdict_table(verdicts: Sequence[Verdict]):
    """The verdicts as a table for the notebook's last cell."""
    import pandas as pd

    return pd.DataFrame([asdict(v) for v in verdicts]).set_index(["paper", "claim"])


def save_verdicts(P: Mapping[str, Any], verdicts: Sequence[Verdict]) -> Path:
    """Write a notebook's verdicts to build/<run>/verdicts/<notebook>.json (read by the README generator)."""
    path = ROOT / "build" / P["run"] / "verdicts" / f"{P['notebook']}.json"
    write_json(path, {"notebook": P["notebook"], "run": P["run"], "models": list(P["models"]),
                      "verdicts": [asdict(v) for v in verdicts]})
    return path


def readme_table(run: str) -> str:
    """A markdown table of every saved verdict of `run`, notebook by notebook."""
    folder = ROOT / "build" / run / "verdicts"
    files = sorted(folder.glob("*.json"))
    if not files:
        raise BabelError(f"no verdicts under {folder}; run `make figures` first")
    lines = [f"Generated from `make figures` (run `{run}`) by `python -m babel_lib.core.verdicts readme {run}`.", "",
             "| notebook | paper | claim | paper's number | ours | verdict | rule |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for path in files:
        data = json.loads(path.read_text())
        for v in data["verdicts"]:
            cells = [data["notebook"], v["paper"], v["claim"], v["paper_value"], v["ours"], f"**{v['verdict']}**",
                     v["rule"]]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def update_readme(run: str, readme: Path | None = None) -> None:
    """Replace the README's block between the verdict markers with `readme_table(run)`."""
    readme = readme or ROOT / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise BabelError(f"{readme} has no {README_START} ... {README_END} block to fill")
    block = f"{README_START}\n{readme_table(run)}\n{README_END}"
    readme.write_text(re.sub(re.escape(README_START) + ".*?" + re.escape(README_END), lambda _: block, text,
                             flags=re.S))


def main(argv: list[str] | None = None) -> None:
    """`python -m babel_lib.core.verdicts readme RUN`: regenerate the README's verdict table from a run."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m babel_lib.core.verdicts")
    parser.add_argument("command", choices=["readme"])
    parser.add_argument("run", nargs="?", default="default")
    args = parser.parse_args(argv)
    try:
        update_readme(args.run)
    except BabelError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
