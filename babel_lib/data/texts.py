"""A run's text source: which corpus (the shipped LibreOffice help, or FLORES+), which rows of it, and its identity.

Profiles name the source with the common keys `corpus`, `corpus_path`, `corpus_kinds` and `corpus_min_words`
(`babel_lib.core.config.text_source`); studies load text through `TextSource.load` and put `TextSource.identity`
into their cache keys, so a changed corpus or filter never brings back a result computed on other text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from babel_lib.errors import BabelError

CORPORA = ("libreoffice-help", "flores_plus")
FLORES_SPLIT = {"calibration": "dev", "heldout": "devtest"}  # FLORES+ has no calibration/held-out split of its own


@dataclass(frozen=True)
class TextSource:
    """Where a run's paragraphs come from (the shipped corpus, unfiltered, by default)."""

    corpus: str = "libreoffice-help"
    kinds: tuple[str, ...] | None = None  # libreoffice-help: element kinds kept (None = all)
    min_words: int | None = None  # libreoffice-help: rows with at least this many English words
    path: str | None = None  # flores_plus: local parquet files in the hub's layout (None = the hub)

    def __post_init__(self) -> None:
        if self.corpus not in CORPORA:
            raise BabelError(f"unknown corpus {self.corpus!r}; use one of {', '.join(CORPORA)}")
        if self.corpus == "flores_plus" and (self.kinds or self.min_words):
            raise BabelError("corpus_kinds and corpus_min_words filter the LibreOffice help corpus; FLORES+ has "
                             "no element kinds: set them to null")

    def load(self, languages: Sequence[str], split: str, limit: int | None = None):
        """The aligned rows of `languages` in `split` ("calibration" or "heldout") as a datasets.Dataset."""
        if self.corpus == "flores_plus":
            from babel_lib.data.flores import load_flores

            if split not in FLORES_SPLIT:
                raise BabelError(f"unknown split {split!r}; use calibration or heldout")
            return load_flores(list(languages), FLORES_SPLIT[split], path=self.path, limit=limit)
        from babel_lib.data.corpus import load_corpus

        return load_corpus(list(languages), split=split, limit=limit, kinds=self.kinds, min_words=self.min_words)

    @property
    def identity(self) -> str:
        """A short hash of the source: the corpus file's sha256 (or FLORES+'s location) and the filter."""
        if self.corpus == "flores_plus":
            data = f"flores_plus:{self.path or 'hub'}"
        else:
            from babel_lib.data.corpus import corpus_info

            data = corpus_info()["sha256"]
        text = json.dumps({**asdict(self), "data": data}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """One line for captions: the corpus and its filter."""
        if self.corpus == "flores_plus":
            return "FLORES+" + (f" ({self.path})" if self.path else "")
        parts = [self.corpus]
        if self.kinds:
            parts.append("kinds " + "/".join(self.kinds))
        if self.min_words:
            parts.append(f">= {self.min_words} English words")
        return ", ".join(parts)
