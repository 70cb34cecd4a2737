"""How `make` runs a notebook (scripts/run_notebook.py): one line on failure, figures published only on success."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nbformat
import pytest

from babel_lib.core.config import ROOT

PROBE = [
    'fail = False\nfigures = ""',
    'import plotly.graph_objects as go\n'
    'from babel_lib.core.figures import save_figure\n'
    'P = {"figures": figures, "notebook": "99_probe", "profile": "test"}\n'
    'save_figure(go.Figure(go.Bar(y=[1, 2])), "bars", P, "a caption")',
    'if fail:\n    raise ZeroDivisionError("probe failure")',
]


@pytest.fixture
def probe(tmp_path):
    """A three-cell notebook that saves one figure and then fails when asked; returns a function running it."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in PROBE])
    nb.cells[0].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "babel", "display_name": "babel", "language": "python"}
    src = tmp_path / "src" / "99_probe.ipynb"
    src.parent.mkdir()
    nbformat.write(nb, src)
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "manifest.json").write_text(json.dumps({"01_x/y": {"notebook": "01_x", "name": "y"}}))

    (tmp_path / "notebooks").mkdir()

    def run(fail: bool) -> subprocess.CompletedProcess:
        """Like make: paths relative to the folder it runs in, the kernel in another folder (--cwd)."""
        return subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "run_notebook.py"), "src/99_probe.ipynb", "99_probe.tmp.ipynb",
             "--cwd", "notebooks", "-k", "babel", "-p", "fail", str(fail), "-p", "figures", str(figures)],
            capture_output=True, text=True, timeout=600, cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(ROOT)})

    return run, tmp_path, figures


@pytest.mark.slow
def test_a_failing_notebook_prints_one_line_and_publishes_nothing(probe):
    run, build, figures = probe
    done = run(fail=True)
    log = build / "99_probe.log"
    assert done.returncode == 1 and done.stdout == ""  # In [4]: papermill injects a parameters cell
    assert done.stderr.strip() == ("error: notebook 99_probe failed in cell In [4]: ZeroDivisionError: probe failure "
                                   "(full log: 99_probe.log)")
    assert "Traceback" in log.read_text() or "ZeroDivisionError" in log.read_text()
    assert not (figures / "99_probe").exists()
    assert list(json.loads((figures / "manifest.json").read_text())) == ["01_x/y"]
    assert not (build / "staging").exists() or not any((build / "staging").iterdir())
    assert not (build / "notebooks" / "staging").exists()
    assert not (build / "99_probe.pid").exists()


@pytest.mark.slow
def test_a_succeeding_notebook_publishes_its_figures_and_manifest_entries(probe):
    run, build, figures = probe
    (figures / "99_probe").mkdir()
    (figures / "99_probe" / "old.png").write_bytes(b"from an earlier run")
    done = run(fail=False)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((figures / "manifest.json").read_text())
    assert sorted(manifest) == ["01_x/y", "99_probe/bars"]
    assert manifest["99_probe/bars"]["png"] == "99_probe/bars.png" and manifest["99_probe/bars"]["caption"]
    assert (figures / "99_probe" / "bars.png").stat().st_size > 1000 and (figures / "99_probe" / "bars.html").exists()
    assert not (figures / "99_probe" / "old.png").exists()  # the notebook's figures are replaced as a whole
    assert not (build / "staging" / "99_probe").exists()


def test_an_unknown_profile_lists_the_profiles():
    done = subprocess.run(["make", "-C", str(ROOT), "figures", "PROFILE=nope"], capture_output=True, text=True,
                          timeout=60)
    profiles = " ".join(sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))
    assert done.returncode != 0 and "No rule to make target" not in done.stderr
    assert f"unknown profile 'nope': profiles are {profiles} (configs/<profile>.yaml)" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
