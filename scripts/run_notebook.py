"""Execute one notebook with papermill for `make`: a short failure, figures published only on success.

    python scripts/run_notebook.py SRC.ipynb OUT.ipynb [papermill options, e.g. -k babel -p profile smoke]

papermill's output goes to OUT's log (<build>/<notebook>.log). On failure one line names the notebook, the cell
and the exception, with the log's path, and the exit status is 1. The figures the notebook saves are staged in
<build>/staging/<notebook>/ and published into figures/ only when it succeeds. <build>/<notebook>.pid holds this
process's id while it runs (a test kills the run by it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from babel_lib.core.figures import STAGING, publish


def notebook_name(src: Path) -> str:
    """`02_profile` for build/smoke/src/02_profile.ipynb."""
    return src.name.split(".")[0]


def first_error(executed: Path) -> str | None:
    """' in cell In [n]: Name: message' for the first cell that raised in an executed notebook, or None."""
    try:
        cells = json.loads(executed.read_text())["cells"]
    except (OSError, ValueError, KeyError):
        return None
    for cell in cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                message = (output.get("evalue") or "").strip().splitlines()
                text = message[0] if message else ""
                return f" in cell In [{cell.get('execution_count')}]: {output.get('ename')}: {text}"
    return None


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    src, out, options = Path(argv[0]), Path(argv[1]), argv[2:]
    name = notebook_name(src)
    log, pid = out.parent / f"{name}.log", out.parent / f"{name}.pid"
    staging = (out.parent / "staging" / name).resolve()  # absolute: the kernel runs in papermill's --cwd
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    out.unlink(missing_ok=True)  # so a failure is read from this run's notebook, not an earlier one
    pid.write_text(str(os.getpid()))
    try:
        with open(log, "w") as stream:
            done = subprocess.run([sys.executable, "-m", "papermill", *options, str(src), str(out)],
                                  stdout=stream, stderr=subprocess.STDOUT, env=os.environ | {STAGING: str(staging)})
        if done.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            reason = first_error(out) or f": {last_line(log)}"
            print(f"error: notebook {name} failed{reason} (full log: {log})", file=sys.stderr)
            return 1
        publish(staging)
        return 0
    finally:
        pid.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
