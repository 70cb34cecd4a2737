"""Run parameters: one YAML file per profile (configs/<profile>.yaml), resolved per notebook.

A profile file has common keys (device, dtype, models, languages, ...), a `notebooks:` section with
one mapping per notebook, and a `zoo:` section for the micro-model family (babel_lib.sparsing.zoo). `notebook_params`
merges the common keys with the notebook's section, applies overrides and adds the run's paths, so a
notebook's parameters cell only names the profile and, optionally, a model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from babel_lib.errors import BabelError

ROOT = Path(os.environ.get("BABEL_ROOT", Path(__file__).resolve().parents[2]))


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e6` and `1.0e6` as strings, not numbers."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


class Params(dict):
    """A plain dict of parameters that also reads as attributes (P.n_experts)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def profiles() -> list[str]:
    """The profiles that have a config file."""
    return sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


def load_profile(profile: str) -> dict[str, Any]:
    """The raw contents of configs/<profile>.yaml."""
    path = ROOT / "configs" / f"{profile}.yaml"
    if not path.exists():
        raise BabelError(f"unknown profile {profile!r}; profiles are {', '.join(profiles())} (configs/*.yaml)")
    return yaml.load(path.read_text(), Loader=_Loader)


def run_name(profile: str, model: str = "") -> str:
    """The folder name of a run: the profile, plus the model when one overrides the profile's list."""
    return profile if not model else f"{profile}-{model.replace('/', '_').replace(':', '_')}"


def notebook_params(notebook: str, profile: str = "default", model: str = "", **overrides: Any) -> Params:
    """Parameters of `notebook` under `profile`; `model` (comma-separated) replaces the profile's models."""
    raw = load_profile(profile)
    sections = raw.get("notebooks", {})
    if notebook not in sections:
        raise BabelError(f"configs/{profile}.yaml has no section for notebook {notebook!r}; "
                         f"it has {', '.join(sections)}")
    params = {k: v for k, v in raw.items() if k not in ("notebooks", "zoo")} | dict(sections[notebook] or {})
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise BabelError(f"unknown parameter(s) {', '.join(unknown)} for {notebook}; valid: {', '.join(sorted(params))}")
    params |= overrides
    if model:
        params["models"] = [m.strip() for m in model.split(",") if m.strip()]
    name = run_name(profile, model)
    params |= {
        "profile": profile,
        "notebook": notebook,
        "run": name,
        "artefacts": str(ROOT / "build" / profile / "artefacts"),
        "figures": str(ROOT / "figures" / name),
    }
    return Params(params)


def apply_runtime(P: Params) -> None:
    """Set the process-wide knobs a run depends on: CPU threads, the global seeds, and how figures display
    (the plotly mimetype for JupyterLab plus self-contained HTML, so the nbconvert rendering shows them too)."""
    import random

    import numpy as np
    import plotly.io as pio
    import torch

    pio.renderers.default = "plotly_mimetype+notebook"
    torch.set_num_threads(int(P.get("threads", 2)))
    random.seed(P.get("seed", 0))
    np.random.seed(P.get("seed", 0))
    torch.manual_seed(P.get("seed", 0))
