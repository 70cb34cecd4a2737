"""Studies own their parameters: one frozen, validated dataclass per study.

Every field of a study's parameter object, the identity of the model and data it ran on, and a hash of the
source of the modules that compute it make the artefact's cache key (`StudyParams.key`), so a changed
parameter or a changed library never brings back a stale result, and no key is ever assembled by hand.
Profiles (configs/*.yaml) are validated against these objects when they are loaded: an unknown key, a
wrong type or an out-of-range value is a one-line error naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import importlib.util
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from babel_lib.errors import BabelError


def param(default: Any = dataclasses.MISSING, **limits: float) -> Any:
    """A field with a default and numeric bounds (ge, gt, le, lt): `ratio: float = param(0.25, gt=0, le=1)`."""
    unknown = set(limits) - {"ge", "gt", "le", "lt"}
    if unknown:
        raise TypeError(f"unknown bound(s) {unknown}")
    return dataclasses.field(default=default, metadata=limits)


@functools.cache
def code_version(modules: tuple[str, ...]) -> str:
    """A short sha256 of the source files of `modules` (dotted names): the code part of a cache key."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise BabelError(f"code module {name!r} of a study does not exist; fix the study's CODE list")
        digest.update(name.encode() + b"\0" + Path(spec.origin).read_bytes())
    return digest.hexdigest()[:12]


def did_you_mean(word: str, options: Sequence[str]) -> str:
    """' (did you mean X?)' when `word` is close to one of `options`, else ''."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_OPERATORS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
              "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any) -> Any:
    """`value` as type `tp` (int, float, str, bool, Literal, X | None, tuple[X, ...], dict); TypeError if it is not."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _coerce(value, arm)
            except TypeError:
                pass
        raise TypeError
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(args) != len(value):
            raise TypeError
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if origin is dict or tp is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise TypeError
    raise TypeError(f"unsupported parameter type {tp}")


@dataclasses.dataclass(frozen=True)
class StudyParams:
    """Base of every study's parameters (subclass with `@dataclass(frozen=True)`).

    KIND names the artefact folder; CODE lists the modules whose source enters the key. Fields are checked
    against their annotations (lists become tuples) and their `param` bounds when the object is made;
    `check()` adds a study's own rules.
    """

    KIND: ClassVar[str] = ""
    CODE: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                value = _coerce(value, hints[f.name])
            except TypeError:
                raise BabelError(f"{self._where()}{f.name}: {value!r} is not a {_type_name(hints[f.name])}") from None
            for op, bound in f.metadata.items():
                if op in _OPERATORS and value is not None:
                    sign, ok = _OPERATORS[op]
                    if not ok(value, bound):
                        raise BabelError(f"{self._where()}{f.name}: {value!r} must be {sign} {bound:g}")
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """A study's own rules beyond types and bounds (raise `self.invalid(...)`)."""

    def _where(self) -> str:
        return f"{type(self).__name__}."

    def invalid(self, name: str, problem: str) -> BabelError:
        """The error for field `name` of this object."""
        return BabelError(f"{self._where()}{name}: {problem}")

    def key(self, **identity: Any) -> dict[str, Any]:
        """The cache key: the study, its code version, every field, and the model/data identity given."""
        return {"study": self.KIND, "code": code_version(self.CODE), "params": self.as_dict(), **identity}

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values (tuples as lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = ""):
        """Build from a mapping that holds exactly this class's fields (defaults fill the rest)."""
        prefix = f"{where}: " if where else ""
        names = cls.field_names()
        for k in values:
            if k not in names:
                raise BabelError(f"{prefix}unknown key {k!r}{did_you_mean(k, names)}; valid keys: {', '.join(names)}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise BabelError(f"{prefix}missing key(s) {', '.join(missing)}")
        try:
            return cls(**values)
        except BabelError as err:
            raise BabelError(f"{prefix}{err}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def split_section(section: Mapping[str, Any], classes: Sequence[type[StudyParams]], where: str
                  ) -> list[StudyParams]:
    """Validate a profile section that holds the fields of several parameter classes (no key left over)."""
    owned = {name: cls for cls in classes for name in cls.field_names()}
    for k in section:
        if k not in owned:
            raise BabelError(f"{where}: unknown key {k!r}{did_you_mean(k, list(owned))}; valid keys: "
                             f"{', '.join(owned)}")
    return [cls.from_mapping({k: v for k, v in section.items() if owned[k] is cls}, where) for cls in classes]
