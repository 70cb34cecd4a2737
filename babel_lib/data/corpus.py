"""Loader of the shipped LibreOffice-help parallel corpus: one row per paragraph, one column per language, plus the
paragraph's element kind and English word count to filter on."""

from __future__ import annotations

import hashlib
import json
import lzma
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import datasets

from babel_lib.data.help_pages import KINDS
from babel_lib.errors import BabelError

CORPUS_DIR = Path(__file__).resolve().parents[2] / "data" / "libreoffice-help"
CORPUS_FILE = "corpus.jsonl.xz"
PROVENANCE_FILE = "provenance.json"
SPLITS = ("calibration", "heldout")
META_COLUMNS = ("segment_id", "split", "kind", "en_words")


def _broken(directory: Path, problem: str) -> BabelError:
    """The error for a missing or damaged shipped corpus: what is wrong and how to rebuild it."""
    return BabelError(f"corpus in {directory} {problem}; rebuild it with `make data`")


def read_provenance(directory: Path = CORPUS_DIR) -> dict:
    """The provenance record shipped next to the corpus (packages, versions, sha256 of every file)."""
    try:
        return json.loads((directory / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _broken(directory, f"has no {PROVENANCE_FILE}") from None
    except (OSError, ValueError) as err:
        raise _broken(directory, f"has an unreadable {PROVENANCE_FILE} ({err})") from None


def read_rows(directory: Path = CORPUS_DIR) -> tuple[list[str], list[dict]]:
    """The corpus languages and rows, after checking the file against the sha256 in its provenance."""
    provenance = read_provenance(directory)
    try:
        raw = (directory / CORPUS_FILE).read_bytes()
    except FileNotFoundError:
        raise _broken(directory, f"has no {CORPUS_FILE}") from None
    try:
        expected, languages = provenance["corpus"]["sha256"], list(provenance["languages"])
    except (KeyError, TypeError):
        raise _broken(directory, f"has a {PROVENANCE_FILE} without corpus sha256 or languages") from None
    if hashlib.sha256(raw).hexdigest() != expected:
        raise _broken(directory, f"has a {CORPUS_FILE} whose sha256 differs from {PROVENANCE_FILE}")
    try:
        rows = [json.loads(line) for line in lzma.decompress(raw).decode("utf-8").split("\n") if line]
    except (lzma.LZMAError, UnicodeDecodeError, ValueError) as err:
        raise _broken(directory, f"has an unreadable {CORPUS_FILE} ({err})") from None
    columns = {*META_COLUMNS, *languages}
    if any(not isinstance(row, dict) or row.keys() != columns for row in rows):
        raise _broken(directory, f"has rows without exactly the columns {sorted(columns)}")
    return languages, rows


def _requested(languages: Sequence[str] | None, available: list[str]) -> list[str]:
    """The requested language codes, checked against the corpus languages (all of them when None)."""
    if languages is None:
        return available
    if isinstance(languages, str):
        raise BabelError(f"languages must be a list of codes, not the string {languages!r}; use [{languages!r}]")
    unknown = [code for code in languages if code not in available]
    if unknown:
        raise BabelError(f"languages {unknown} are not in the corpus; use some of: {', '.join(available)}")
    if len(set(languages)) != len(languages):
        raise BabelError(f"languages {list(languages)} repeat a code; name each language once")
    return list(languages)


def _is_count(value: object) -> bool:
    """Whether value is a non-negative int (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_filters(split: str | None, limit: int | None, kinds: Sequence[str] | None, min_words: int | None) -> None:
    """Reject a split other than calibration/heldout, unknown kinds, and a limit or min_words that is not a
    non-negative int."""
    if split is not None and split not in SPLITS:
        raise BabelError(f"unknown split {split!r}; use one of {SPLITS} or None for both")
    if limit is not None and not _is_count(limit):
        raise BabelError(f"limit must be a non-negative int or None, got {limit!r}")
    if min_words is not None and not _is_count(min_words):
        raise BabelError(f"min_words must be a non-negative int or None, got {min_words!r}")
    if isinstance(kinds, str):
        raise BabelError(f"kinds must be a list of element kinds, not the string {kinds!r}; use [{kinds!r}]")
    unknown = [kind for kind in kinds or () if kind not in KINDS]
    if unknown:
        raise BabelError(f"unknown element kinds {unknown}; use some of: {', '.join(KINDS)}")


def load_corpus(
    languages: Sequence[str] | None = None,
    split: str | None = None,
    limit: int | None = None,
    kinds: Sequence[str] | None = None,
    min_words: int | None = None,
    *,
    directory: str | Path | None = None,
) -> datasets.Dataset:
    """Aligned paragraphs as a Dataset with columns segment_id (page path#paragraph id), split, one text column
    per language, kind (the element kind, one of KINDS) and en_words (words of the English text).

    Rows keep the shipped (deterministic) order; `split` filters to calibration or heldout, `kinds` to those
    element kinds and `min_words` to rows with at least that many English words; then `limit` keeps the first N
    rows. `directory` points at another build of the corpus (default: the shipped one).
    """
    _check_filters(split, limit, kinds, min_words)
    available, rows = read_rows(CORPUS_DIR if directory is None else Path(directory))
    codes = _requested(languages, available)
    rows = [row for row in rows if (split is None or row["split"] == split)
            and (kinds is None or row["kind"] in kinds) and (min_words is None or row["en_words"] >= min_words)]
    rows = rows if limit is None else rows[:limit]
    features = datasets.Features({"segment_id": datasets.Value("string"), "split": datasets.Value("string"),
                                  **{code: datasets.Value("string") for code in codes},
                                  "kind": datasets.Value("string"), "en_words": datasets.Value("int32")})
    return datasets.Dataset.from_dict({name: [row[name] for row in rows] for name in features}, features=features)


def corpus_info(directory: str | Path | None = None) -> dict:
    """Paragraphs per split, languages and the Debian package versions of the corpus, for notebooks to print."""
    directory = CORPUS_DIR if directory is None else Path(directory)
    languages, rows = read_rows(directory)
    provenance = read_provenance(directory)
    counts = Counter(row["split"] for row in rows)
    return {
        "paragraphs": {split: counts[split] for split in SPLITS},
        "total": len(rows),
        "languages": languages,
        "packages": {p["language"]: f"{p['package']}={p['version']}" for p in provenance.get("packages", [])},
        "file": str(directory / CORPUS_FILE),
        "sha256": provenance["corpus"]["sha256"],
    }
