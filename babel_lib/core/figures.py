"""Figure output: every figure as interactive HTML and a PNG, captioned, and listed in a manifest.

PNGs are rendered by kaleido through the system Chromium; one browser is started on the first PNG and
reused (about 0.4 s a figure after a ~6 s start). Where kaleido or Chromium is missing (a GPU server, say) the
HTML figures are still written, PNGs are skipped (the manifest's "png" is null) and that is said once.
The manifest (<figures>/manifest.json) says which notebook and which parameters made each figure. Under `make`
(scripts/run_notebook.py) figures are staged and published only when their notebook succeeds, so a failed
notebook leaves no figure and no manifest entry.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from babel_lib.core.artefacts import atomic_path, remove_stale_temps, write_json

STAGING = "BABEL_FIGURE_STAGING"  # environment variable: the folder figures are staged in until publish()
_SERVER: list[bool] = []  # [True] once the kaleido browser is up, [False] once PNGs are known impossible here
NO_PNG = ("figures: PNG export skipped ({why}); the HTML figures are written. For PNGs install Chromium "
          "(`sudo apt-get install chromium`, or set BROWSER_PATH to a Chrome/Chromium binary) and kaleido.")


def _no_browser(err: BaseException) -> bool:
    """Whether `err` says that no Chrome/Chromium could be found or started (not a bug in the figure)."""
    return type(err).__name__ in ("ChromeNotFoundError", "BrowserFailedError", "BrowserDepsError") or \
        "requires Google Chrome" in str(err)


def _skip_png(why: str) -> bool:
    print(NO_PNG.format(why=why), file=sys.stderr, flush=True)
    _SERVER[:] = [False]
    return False


def _browser() -> str | None:
    """The Chrome/Chromium kaleido would start (BROWSER_PATH, kaleido's own download, the PATH, the usual places), or
    None. Looked up first because kaleido's sync server does not raise when there is none: its thread dies and
    every later write_image waits forever (what hung notebook 01 on a GPU server)."""
    try:
        from choreographer.browsers.chromium import Chromium
    except ImportError:
        return None
    found = Chromium.find_browser(skip_local=False)
    return found if found and Path(found).is_file() else None


def _png(fig, path: Path, width: int, height: int) -> bool:
    """Write the PNG; False (said once per process) where kaleido or a browser is missing."""
    if _SERVER == [False]:
        return False
    try:
        import kaleido
    except ImportError:
        return _skip_png("kaleido is not installed")
    if not _SERVER:
        if _browser() is None:
            return _skip_png("no Chrome/Chromium found")
        try:
            kaleido.start_sync_server(silence_warnings=True)
        except Exception as err:  # noqa: BLE001 - only a missing browser is skipped, anything else is raised
            if _no_browser(err):
                return _skip_png("no Chrome/Chromium found")
            raise
        atexit.register(kaleido.stop_sync_server, silence_warnings=True)
        _SERVER[:] = [True]
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The kopts argument is ignored")
        try:
            fig.write_image(str(tmp), format="png", width=width, height=height)
        except Exception as err:  # noqa: BLE001 - as above
            if _no_browser(err):
                return _skip_png("no Chrome/Chromium found")
            raise
    return True


def caption(P: Mapping[str, Any], model: str | None = None, **details: Any) -> str:
    """One line naming the model (with the quantisation of embedded models), the data and the parameters."""
    parts = []
    if model:
        from babel_lib.core.models import EMBEDDED

        quantised = [f"{m} {EMBEDDED[m].quantisation} 4-bit GGUF" for m in map(str.strip, model.split(",")) if m in EMBEDDED]
        parts.append(model + (f" ({', '.join(quantised)})" if quantised else ""))
    parts.append(f"data: {P.get('corpus', 'libreoffice-help')}")
    parts += [f"{k}={v}" for k, v in details.items()]
    parts.append(f"profile {P.get('profile', '?')}")
    return " · ".join(parts)


def save_figure(fig, name: str, P: Mapping[str, Any], caption_text: str, *, width: int = 1000,
                height: int = 600) -> dict[str, str]:
    """Write `fig` as <figures>/<notebook>/<name>.html and .png with its caption, and record it in the manifest.

    With $BABEL_FIGURE_STAGING set, both go to that folder instead, for publish() once the notebook succeeded.
    """
    staging = os.environ.get(STAGING)
    root = Path(staging) if staging else Path(P["figures"])
    folder = root / P["notebook"]
    folder.mkdir(parents=True, exist_ok=True)
    title = fig.layout.title.text or name
    fig.update_layout(title={"text": title, "subtitle": {"text": caption_text}},
                      margin={"t": max(fig.layout.margin.t or 0, 90)})
    html, png = folder / f"{name}.html", folder / f"{name}.png"
    with atomic_path(html) as tmp:
        fig.write_html(str(tmp), include_plotlyjs="directory", full_html=True)  # puts plotly.min.js beside it
    wrote_png = _png(fig, png, width, height)
    entry = {"notebook": P["notebook"], "name": name, "title": title, "caption": caption_text,
             "html": str(html.relative_to(root)), "png": str(png.relative_to(root)) if wrote_png else None,
             "params": {k: v for k, v in P.items() if k not in ("figures", "artefacts")},
             "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if staging:
        record = _read_manifest(root / "staged.json", {"figures": str(P["figures"]), "entries": {}})
        record["entries"][f"{P['notebook']}/{name}"] = entry
        write_json(root / "staged.json", record)
    else:
        _merge_manifest(Path(P["figures"]), {f"{P['notebook']}/{name}": entry})
    return {"html": str(html), "png": str(png) if wrote_png else None}


def _read_manifest(path: Path, empty: dict) -> dict:
    return json.loads(path.read_text()) if path.exists() else empty


def _merge_manifest(figures: Path, entries: Mapping[str, Any], replace: set[str] = frozenset()) -> None:
    """Add `entries` to <figures>/manifest.json, first dropping every entry of the notebooks in `replace`."""
    manifest = figures / "manifest.json"
    kept = {k: v for k, v in _read_manifest(manifest, {}).items() if v.get("notebook") not in replace}
    write_json(manifest, kept | dict(entries))


def publish(staging: str | Path) -> Path | None:
    """Move the figures a notebook staged into its figures folder, replacing that notebook's earlier figures and
    manifest entries, and remove the staging folder; return the figures folder (None if nothing was staged)."""
    staging = Path(staging)
    staged = staging / "staged.json"
    if not staged.exists():
        shutil.rmtree(staging, ignore_errors=True)
        return None
    record = json.loads(staged.read_text())
    figures = Path(record["figures"])
    notebooks = {entry["notebook"] for entry in record["entries"].values()}
    for notebook in notebooks:
        target = figures / notebook
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging / notebook, target)
    _merge_manifest(figures, record["entries"], replace=notebooks)
    shutil.rmtree(staging)
    remove_stale_temps(figures)  # left by killed interactive runs, which write figures in place
    return figures
