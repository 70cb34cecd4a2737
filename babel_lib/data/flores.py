"""FLORES+ loader with the corpus loader's interface: one row per sentence id, one column per language."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets
import pyarrow.parquet as pq

from babel_lib.errors import BabelError
from babel_lib.data.languages import language

FLORES_REPO = "openlanguagedata/flores_plus"
FLORES_SPLITS = ("dev", "devtest")


def _hub_sentences(config: str, split: str) -> dict[int, str]:
    """Sentence id -> text of one FLORES+ config from the Hugging Face hub (gated: needs accepted terms)."""
    try:
        table = datasets.load_dataset(FLORES_REPO, config, split=split)
    except Exception as err:  # offline, gated, unknown config: all end here, with the way out in the message
        raise BabelError(
            f"cannot load FLORES+ {config}/{split} from the hub ({type(err).__name__}: {str(err)[:200]}); accept the "
            f"terms at https://huggingface.co/datasets/{FLORES_REPO} and log in, or pass path= to a local copy "
            f"laid out as <path>/{split}/{config}.parquet"
        ) from None
    return dict(zip(table["id"], table["text"]))


def _local_sentences(path: Path, config: str, split: str) -> dict[int, str]:
    """Sentence id -> text of one FLORES+ config from <path>/<split>/<config>.parquet (the hub repo's layout)."""
    file = path / split / f"{config}.parquet"
    if not file.is_file():
        raise BabelError(f"no FLORES+ file {file}; path= must hold <split>/<config>.parquet as in {FLORES_REPO}")
    table = pq.read_table(file, columns=["id", "text"]).to_pydict()
    return dict(zip(table["id"], table["text"]))


def load_flores(
    languages: Sequence[str],
    split: str = "dev",
    path: str | Path | None = None,
    limit: int | None = None,
) -> datasets.Dataset:
    """FLORES+ sentences as a Dataset with columns segment_id (the FLORES sentence id), split and one text column per babel language code.

    Rows are the sentence ids present in every requested language, in id order; `limit` keeps the first N.
    Without `path` each language is read from the hub; with it, from local parquet files in the hub's layout.
    """
    if isinstance(languages, str) or not languages:
        raise BabelError(f"languages must be a non-empty list of codes such as ['en', 'de'], got {languages!r}")
    if split not in FLORES_SPLITS:
        raise BabelError(f"unknown FLORES+ split {split!r}; use one of {FLORES_SPLITS}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise BabelError(f"limit must be a non-negative int or None, got {limit!r}")
    if len(set(languages)) != len(languages):
        raise BabelError(f"languages {list(languages)} repeat a code; name each language once")
    configs = {code: language(code).flores for code in languages}
    sentences = {
        code: _hub_sentences(config, split) if path is None else _local_sentences(Path(path), config, split)
        for code, config in configs.items()
    }
    ids = sorted(set.intersection(*(set(by_id) for by_id in sentences.values())))
    ids = ids if limit is None else ids[:limit]
    columns = {"segment_id": [str(i) for i in ids], "split": [split] * len(ids)}
    columns.update({code: [sentences[code][i] for i in ids] for code in languages})
    features = datasets.Features({name: datasets.Value("string") for name in columns})
    return datasets.Dataset.from_dict(columns, features=features)
