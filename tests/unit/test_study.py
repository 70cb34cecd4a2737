"""Study parameter objects: validation, layered profiles, and cache keys that see every field and the code."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import typing
from typing import Literal

import pytest

from babel_lib.core import config
from babel_lib.core.study import StudyParams, code_version, split_section
from babel_lib.errors import BabelError


def all_param_classes() -> list[type[StudyParams]]:
    return [config.RunParams] + [cls for nb in config.SECTIONS for cls in config.section_classes(nb)]


def _variants(value, hint):
    """Other valid-looking values of a field, for the key test."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return [a for a in args if a != value]
    if origin in (typing.Union, __import__("types").UnionType):
        return [v for arm in args if arm is not type(None) for v in _variants(value, arm)] + \
            ([None] if value is not None else [])
    if hint is bool:
        return [not value]
    if hint is int:
        return [(value or 0) + 1]
    if hint is float:
        return [value * 0.5 if value else 0.5, (value or 0) + 0.01]
    if hint is str:
        return [{"auto": "cpu", "cpu": "auto"}.get(value, (value or "") + "x")]
    if origin is tuple:
        if value:
            return [value[:-1], value + value[:1]]
        inner = args[0]
        sample = {str: "en", float: 0.5}.get(inner, None)
        if typing.get_origin(inner) is Literal:
            sample = typing.get_args(inner)[0]
        if typing.get_origin(inner) is tuple:
            sample = ("tiny:llama", "step1", 1) if len(typing.get_args(inner)) == 3 else ("a/b", "c/d")
        return [(sample,)]
    return []


def _defaults(cls):
    if cls is config.RunParams:
        return cls(models=("tiny:llama",), languages=("en", "de"))
    return cls()


@pytest.mark.parametrize("cls", all_param_classes(), ids=lambda c: c.__name__)
def test_every_field_enters_the_key(cls):
    base = _defaults(cls)
    key = base.key(model="m", fingerprint="f")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        changed = False
        for value in _variants(getattr(base, f.name), hints[f.name]):
            try:
                other = base.replace(**{f.name: value})
            except BabelError:
                continue
            assert other.key(model="m", fingerprint="f") != key, f"{cls.__name__}.{f.name} is not in the key"
            changed = True
            break
        assert changed, f"no valid other value found for {cls.__name__}.{f.name}"
    assert base.key(model="m", fingerprint="other") != key


def test_the_key_follows_the_code(tmp_path, monkeypatch):
    module = tmp_path / "babel_probe_module.py"
    module.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    before = code_version(("babel_probe_module",))
    module.write_text("X = 2\n")
    code_version.cache_clear()
    assert code_version(("babel_probe_module",)) != before
    sys.modules.pop("babel_probe_module", None)


def test_bad_values_are_one_line_errors():
    from babel_lib.babel.profiler import ProfileParams

    with pytest.raises(BabelError, match=r"^ProfileParams.ratio: 'abc' is not a float$"):
        ProfileParams(ratio="abc")
    with pytest.raises(BabelError, match="ratio: 0.0 must be > 0"):
        ProfileParams(ratio=0)
    with pytest.raises(BabelError, match="paragraphs: 0 must be >= 1"):
        ProfileParams(paragraphs=0)
    with pytest.raises(BabelError, match="rule: 'zscor' is not a 'topk' | 'zscore' | 'threshold'"):
        ProfileParams(rule="zscor")
    with pytest.raises(BabelError, match=r"x.yaml: unknown key 'rul' \(did you mean 'rule'\?\)"):
        ProfileParams.from_mapping({"rul": "zscore"}, "x.yaml")
    assert ProfileParams(paragraphs=None).paragraphs is None
    assert ProfileParams(ratio=1).ratio == 1.0 and isinstance(ProfileParams(ratio=1).ratio, float)
    with pytest.raises(BabelError, match=r"^x.yaml: ProfileParams.variants: \[zscor, sum\] is not a \[rule, mode\] pair; rules: "):
        ProfileParams.from_mapping({"variants": [["zscor", "sum"]]}, "x.yaml")
    assert ProfileParams(variants=(("topk", "sum"), ("zscore", "abs"))).countings() == [("topk", "sum"),
                                                                                        ("zscore", "abs")]


def test_a_section_splits_over_its_classes():
    from babel_lib.babel.analysis import AnalysisParams
    from babel_lib.babel.profiler import ProfileParams

    prof, ana = split_section({"rule": "zscore", "tau_high": 0.5}, [ProfileParams, AnalysisParams], "w")
    assert prof.rule == "zscore" and ana.tau_high == 0.5
    with pytest.raises(BabelError, match="w: unknown key 'tau_hi' \\(did you mean 'tau_high'\\?\\)"):
        split_section({"tau_hi": 0.5}, [ProfileParams, AnalysisParams], "w")


@pytest.fixture
def configs(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    monkeypatch.setattr(config, "ROOT", tmp_path)
    return tmp_path / "configs"


def test_profiles_layer_on_their_base(configs):
    (configs / "default.yaml").write_text("a: 1\nlist: [1, 2]\nnotebooks:\n  x: {k: 1, j: 2}\n")
    (configs / "child.yaml").write_text("extends: default\nlist: [3]\nnotebooks:\n  x: {j: 5}\n")
    assert config.load_profile("child") == {"a": 1, "list": [3], "notebooks": {"x": {"k": 1, "j": 5}}}
    (configs / "loop.yaml").write_text("extends: loop\n")
    with pytest.raises(BabelError, match="cycle"):
        config.load_profile("loop")


@pytest.mark.parametrize("text, message", [
    ("extends: default\nnotebooks:\n  01_convert:\n    n_expert: 64\n", r"unknown key 'n_expert' \(did you mean 'n_experts'\?\)"),
    ("extends: default\nnotebooks:\n  02_profile:\n    rul: zscore\n", r"unknown key 'rul' \(did you mean 'rule'\?\)"),
    ("extends: default\nnotebooks:\n  02_profile:\n    ratio: abc\n", "ratio: 'abc' is not a float"),
    ("extends: default\nnotebooks:\n  01_convert:\n    n_experts: 0\n", "n_experts: 0 must be >= 1"),
    ("extends: default\nlanguages: []\n", "languages: the list is empty"),
    ("extends: default\nlanguages: [en, xx]\n", "unknown language 'xx'"),
    ("extends: default\nnotebooks:\n  02_profile:\n    paragraphs: 0\n", "paragraphs: 0 must be >= 1"),
    ("extends: default\nmodels: [gemma-3-27m]\n", r"unknown model 'gemma-3-27m' \(did you mean 'gemma-3-270m'\?\)"),
    ("extends: default\ndevice: gpu\n", "device: 'gpu' is not a device"),
    ("extends: default\ncorpus: wikipedia\n", "corpus: 'wikipedia' is not a"),
])
def test_real_profiles_reject_bad_input_before_any_model_loads(tmp_path, monkeypatch, text, message):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "default.yaml").write_text((config.ROOT / "configs" / "default.yaml").read_text())
    (configs / "bad.yaml").write_text(text)
    monkeypatch.setattr(config, "ROOT", tmp_path)
    with pytest.raises(BabelError, match=message) as err:
        config.validate_profile("bad")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("profile", ["default", "smoke", "gpu"])
def test_shipped_profiles_validate(profile):
    config.validate_profile(profile)


def test_unknown_profile_lists_the_profiles():
    with pytest.raises(BabelError, match="unknown profile 'smok' \\(did you mean 'smoke'\\?\\); profiles are .*default"):
        config.load_profile("smok")


def test_the_corpus_key_is_honoured(configs, monkeypatch):
    """`corpus: flores_plus` loads FLORES+ (dev for calibration, devtest for held-out), never the LibreOffice corpus."""
    from babel_lib.data import flores, texts

    (configs / "default.yaml").write_text("models: [tiny:llama]\nlanguages: [en, de]\ncorpus: flores_plus\n"
                                         "corpus_path: /data/flores\nnotebooks:\n  01_convert: {}\n")
    source = config.text_source(config.notebook_params("01_convert", "default"))
    calls = []
    monkeypatch.setattr(flores, "load_flores", lambda langs, split, path=None, limit=None: calls.append(
        (langs, split, path, limit)) or "rows")
    assert source.load(["en", "de"], "heldout", 5) == "rows"
    assert calls == [(["en", "de"], "devtest", "/data/flores", 5)]
    assert source.identity != texts.TextSource().identity
    with pytest.raises(BabelError, match="corpus: corpus_kinds and corpus_min_words filter the LibreOffice"):
        config.RunParams(models=("tiny:llama",), languages=("en",), corpus="flores_plus", corpus_min_words=3)


def test_the_filter_enters_the_text_identity():
    from babel_lib.data.texts import TextSource

    assert TextSource().identity != TextSource(min_words=5).identity != TextSource(kinds=("paragraph",)).identity
