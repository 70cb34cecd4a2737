"""The chain end to end: `make figures PROFILE=smoke` executes every notebook through papermill, in order."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from babel_lib.core.config import ROOT

NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


@pytest.mark.slow
def test_every_notebook_executes_and_renders(smoke_run):
    build = ROOT / "build" / "smoke"
    for name in NOTEBOOKS:
        executed = json.loads((build / f"{name}.ipynb").read_text())
        errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors
        assert executed["metadata"]["papermill"]["parameters"]["profile"] == "smoke"
        assert (build / f"{name}.html").stat().st_size > 10_000


@pytest.mark.slow
def test_every_figure_is_in_the_manifest_with_html_and_png(smoke_run):
    figures = ROOT / "figures" / "smoke"
    manifest = json.loads((figures / "manifest.json").read_text())
    assert {entry["notebook"] for entry in manifest.values()} == set(NOTEBOOKS)
    for entry in manifest.values():
        assert (figures / entry["html"]).exists() and (figures / entry["png"]).stat().st_size > 1000
        assert entry["params"]["profile"] == "smoke" and entry["caption"]


@pytest.mark.slow
def test_a_second_run_repeats_no_work(smoke_run, make):
    again = make("figures", "PROFILE=smoke")
    assert again.returncode == 0 and "run_notebook" not in again.stdout


def digests(root: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob(pattern))}


TIMED = {"05_prune/speed.png"}  # plots wall-clock speed measured afresh on every run: not deterministic


def outputs() -> dict[str, str]:
    """sha256 of every artefact file, sidecar and PNG of the smoke run, and the manifest without its timestamps."""
    build, figures = ROOT / "build" / "smoke" / "artefacts", ROOT / "figures" / "smoke"
    manifest = json.loads((figures / "manifest.json").read_text())
    for entry in manifest.values():
        entry.pop("created")
    pngs = {name: h for name, h in digests(figures, "*.png").items() if name not in TIMED}
    return (digests(build, "*.safetensors") | digests(build, "*.json") | pngs
            | {"manifest": json.dumps(manifest, sort_keys=True)})


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_results(smoke_run, make):
    """SIGKILL the whole `make` process group while notebook 02 runs (by the PID its runner writes), run `make`
    again: the artefacts, figures and manifest equal the clean run's, and no temporary file is left."""
    build = ROOT / "build" / "smoke"
    clean = outputs()
    (build / "02_profile.ipynb").unlink()  # 02 recounts (killed in the middle); 03 and 04 re-run on their cache
    shutil.rmtree(build / "artefacts" / "frequencies")
    run = subprocess.Popen(["make", "-C", str(ROOT), "figures", "PROFILE=smoke"], start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_file, deadline = build / "02_profile.pid", time.time() + 900
    while not pid_file.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert pid_file.exists(), "notebook 02 never started"
    time.sleep(20)  # into the notebook: models loading or counting
    os.killpg(os.getpgid(int(pid_file.read_text())), signal.SIGKILL)
    run.wait()
    assert not (build / "02_profile.ipynb").exists()
    time.sleep(3)  # the orphaned kernel notices its parent is gone and exits
    resumed = make("figures", "PROFILE=smoke")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert outputs() == clean
    assert not list(build.rglob(".*.tmp")) and not any((build / "staging").iterdir())
