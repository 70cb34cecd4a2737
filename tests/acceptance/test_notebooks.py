"""The chain end to end: `make figures PROFILE=smoke` executes every notebook through papermill, in order."""

from __future__ import annotations

import json
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
    assert again.returncode == 0 and "papermill" not in again.stdout
