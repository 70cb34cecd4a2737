"""Run parameters: layered YAML profiles (configs/<profile>.yaml), validated when loaded, resolved per notebook.

`default.yaml` is the base profile: common keys (device, dtype, models, languages, ...), a `zoo:` section for
the micro-model family and a `notebooks:` section with one mapping per notebook. Any other profile names its
base with `extends: default` and lists only what it changes (mappings merge key by key, lists and values
replace). Common keys are checked against `RunParams`, each notebook's section against the parameter objects
of its studies (`SECTIONS`), so a typo or an out-of-range value stops a run before any model loads.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from babel_lib.core.study import StudyParams, did_you_mean, param, split_section
from babel_lib.errors import BabelError

ROOT = Path(os.environ.get("BABEL_ROOT", Path(__file__).resolve().parents[2]))
BASE_PROFILE = "default"

# notebook -> the parameter objects its profile section holds ("module:Class")
SECTIONS: dict[str, tuple[str, ...]] = {
    "01_convert": ("babel_lib.babel.conversion:ConvertParams",),
    "02_profile": ("babel_lib.babel.profiler:ProfileParams", "babel_lib.babel.analysis:AnalysisParams"),
    "03_massive_activations": ("babel_lib.massive.scan:ScanParams", "babel_lib.massive.locate:CriterionParams",
                               "babel_lib.massive.surface:PromptParams", "babel_lib.massive.intervene:InterventionParams",
                               "babel_lib.massive.attention:AttentionParams"),
    "04_sparsity_scaling": ("babel_lib.sparsing.studies:EvalParams", "babel_lib.sparsing.studies:ParetoParams",
                            "babel_lib.sparsing.studies:LanguageParams", "babel_lib.sparsing.scaling:ScalingParams"),
    "05_prune": ("babel_lib.babel.pruning_study:PruneParams",),
}


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e6` and `1.0e6` as strings, not numbers."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


@dataclass(frozen=True)
class RunParams(StudyParams):
    """The keys every notebook of a profile shares."""

    description: str = ""
    device: str = "auto"  # cpu | cuda | cuda:N | auto
    dtype: Literal["float32", "bfloat16", "float16", "float64", "auto"] = "auto"
    threads: int = param(2, ge=1)
    seed: int = 0
    models: tuple[str, ...] = ()
    corpus: Literal["libreoffice-help", "flores_plus"] = "libreoffice-help"
    corpus_path: str | None = None  # flores_plus: local parquet files in the hub's layout (None = the hub)
    corpus_kinds: tuple[Literal["heading", "code", "icon_table", "menu_path", "note", "list_item", "table_cell",
                                "paragraph"], ...] | None = None  # libreoffice-help element kinds kept; None = all
    corpus_min_words: int | None = param(None, ge=1)  # libreoffice-help rows with at least this many English words
    languages: tuple[str, ...] = ()

    def check(self) -> None:
        from babel_lib.data.languages import LANGUAGES

        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", self.device):
            raise self.invalid("device", f"{self.device!r} is not a device; use cpu, cuda, cuda:N or auto")
        if not self.models:
            raise self.invalid("models", "the list is empty; name at least one model")
        if not self.languages:
            raise self.invalid("languages", "the list is empty; name at least one language code")
        known = [lang.code for lang in LANGUAGES]
        for code in self.languages:
            if code not in known:
                raise self.invalid("languages", f"unknown language {code!r}{did_you_mean(code, known)}; "
                                   f"known: {', '.join(known)}")
        if len(set(self.languages)) != len(self.languages):
            raise self.invalid("languages", "a language is listed twice")
        self.source()

    def source(self):
        """The run's text source (babel_lib.data.texts.TextSource)."""
        from babel_lib.data.texts import TextSource

        try:
            return TextSource(self.corpus, self.corpus_kinds, self.corpus_min_words, self.corpus_path)
        except BabelError as err:
            raise self.invalid("corpus", str(err)) from None

    def _where(self) -> str:
        return ""


class Params(dict):
    """A plain dict of validated parameters that also reads as attributes (P.n_experts); `P.typed(Cls)` gives a
    study's parameter object."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def typed(self, cls: type[StudyParams]) -> StudyParams:
        """The validated `cls` object of this notebook's section."""
        return cls.from_mapping({k: self[k] for k in cls.field_names() if k in self})


def text_source(P: Params):
    """The text source of a notebook's parameters (corpus, filter, path)."""
    return P.typed(RunParams).source()


def profiles() -> list[str]:
    """The profiles that have a config file."""
    return sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """`base` with `change` applied: mappings merge key by key, everything else replaces."""
    out = dict(base)
    for k, v in change.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read(profile: str) -> dict[str, Any]:
    path = ROOT / "configs" / f"{profile}.yaml"
    if not path.exists():
        raise BabelError(f"unknown profile {profile!r}{did_you_mean(profile, profiles())}; profiles are "
                         f"{', '.join(profiles())} (configs/*.yaml)")
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as err:
        raise BabelError(f"configs/{profile}.yaml is not valid YAML ({str(err).splitlines()[0]}); fix the file") from None
    if not isinstance(raw, dict):
        raise BabelError(f"configs/{profile}.yaml must be a mapping of keys to values")
    return raw


def load_profile(profile: str) -> dict[str, Any]:
    """The contents of configs/<profile>.yaml merged onto its base (`extends:`), unvalidated."""
    raw, chain = _read(profile), [profile]
    while "extends" in raw:
        base = raw.pop("extends")
        if base in chain:
            raise BabelError(f"configs/{profile}.yaml: `extends` makes a cycle ({' -> '.join(chain + [base])})")
        chain.append(base)
        raw = _merge(_read(base), raw)
    return raw


def section_classes(notebook: str) -> list[type[StudyParams]]:
    """The parameter objects of a notebook's profile section."""
    if notebook not in SECTIONS:
        raise BabelError(f"unknown notebook {notebook!r}{did_you_mean(notebook, list(SECTIONS))}; notebooks are "
                         f"{', '.join(SECTIONS)}")
    classes = []
    for target in SECTIONS[notebook]:
        module, name = target.split(":")
        classes.append(getattr(importlib.import_module(module), name))
    return classes


def validate_profile(profile: str, model: str = "") -> dict[str, Any]:
    """Load and check a whole profile (common keys, every notebook section, the zoo); return it merged."""
    raw = load_profile(profile)
    where = f"configs/{profile}.yaml"
    common = {k: v for k, v in raw.items() if k not in ("notebooks", "zoo")}
    if model:
        common["models"] = split_models(model)
    run = RunParams.from_mapping(common, where)
    check_models(run.models)
    sections = raw.get("notebooks") or {}
    for notebook in sections:
        split_section(sections[notebook] or {}, section_classes(notebook), f"{where} notebooks.{notebook}")
    if "zoo" in raw:
        from babel_lib.sparsing.zoo import spec_from_profile

        spec_from_profile(profile)
    return raw


def split_models(model: str) -> list[str]:
    """MODEL=a,b -> ['a', 'b']."""
    return [m.strip() for m in model.split(",") if m.strip()]


def check_models(models: tuple[str, ...] | list[str]) -> None:
    """Catch a misspelt embedded alias before anything reaches for the hub."""
    from babel_lib.core.models import check_model_name

    for name in models:
        check_model_name(name)


def run_name(profile: str, model: str = "") -> str:
    """The folder name of a run: the profile, plus the model when one overrides the profile's list."""
    return profile if not model else f"{profile}-{model.replace('/', '_').replace(':', '_')}"


def notebook_params(notebook: str, profile: str = "default", model: str = "", **overrides: Any) -> Params:
    """Validated parameters of `notebook` under `profile`; `model` (comma-separated) replaces the profile's models."""
    raw = load_profile(profile)
    where = f"configs/{profile}.yaml"
    sections = raw.get("notebooks") or {}
    classes = section_classes(notebook)
    if notebook not in sections:
        raise BabelError(f"{where} has no section for notebook {notebook!r}; it has {', '.join(sections)}")
    common = {k: v for k, v in raw.items() if k not in ("notebooks", "zoo")}
    section = dict(sections[notebook] or {})
    valid = RunParams.field_names() + [n for cls in classes for n in cls.field_names()]
    for k in overrides:
        if k not in valid:
            raise BabelError(f"unknown parameter {k!r}{did_you_mean(k, valid)} for {notebook}; valid: "
                             f"{', '.join(sorted(valid))}")
    common |= {k: v for k, v in overrides.items() if k in RunParams.field_names()}
    section |= {k: v for k, v in overrides.items() if k not in RunParams.field_names()}
    if model:
        common["models"] = split_models(model)
    run = RunParams.from_mapping(common, where)
    check_models(run.models)
    typed = split_section(section, classes, f"{where} notebooks.{notebook}")
    params: dict[str, Any] = run.as_dict()
    for obj in typed:
        params |= obj.as_dict()
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
    """Set the process-wide knobs a run depends on: CPU threads and the global seeds (`seed_runtime`), and how
    figures display (the plotly mimetype for JupyterLab plus self-contained HTML, so the nbconvert rendering
    shows them too)."""
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype+notebook"
    seed_runtime(P)


def seed_runtime(P: Params) -> None:
    """CPU threads and the global seeds of a run: what a notebook and a launcher computing its artefact share."""
    import random

    import numpy as np
    import torch

    torch.set_num_threads(int(P.get("threads", 2)))
    random.seed(P.get("seed", 0))
    np.random.seed(P.get("seed", 0))
    torch.manual_seed(P.get("seed", 0))


def main(argv: list[str] | None = None) -> None:
    """`python -m babel_lib.core.config check PROFILE [MODEL]`: validate a profile before a run (one line on error)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m babel_lib.core.config")
    parser.add_argument("command", choices=["check"])
    parser.add_argument("profile")
    parser.add_argument("model", nargs="?", default="")
    args = parser.parse_args(argv)
    try:
        validate_profile(args.profile, args.model)
    except BabelError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
