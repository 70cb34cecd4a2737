"""Paragraphs of every language -> corpus rows: alignment, the quality rules, the split by help page, the order.

Texts are compared with English ignoring whitespace and case (`normalise`). A row is dropped when any language
leaves it untranslated or nearly so (difflib ratio >= NEAR_COPY_RATIO), or uses a translation that the same
language uses for REUSED_FOR or more different English texts (a fuzzy or stale translation: the wrong meaning).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from difflib import SequenceMatcher

SOURCE = "en"  # the language every other one is compared with; en_words counts its words
NEAR_COPY_RATIO = 0.93  # difflib.SequenceMatcher(autojunk=False).ratio() of the normalised texts
REUSED_FOR = 3  # a translation used for this many different English texts in one language is unreliable
HELDOUT_EVERY = 5  # a page is held out when the first 8 bytes of sha256(page path) are 0 mod 5: about 20%

RULES = (
    "one row per `page path#paragraph id` (p and h1-h6 elements with an id) present in every language",
    "ids that occur twice in one page are dropped (ambiguous)",
    "text: inline tags replaced by their text, images and scripts dropped, <br> as a space, entities decoded, "
    "whitespace collapsed; of a system/application switch only the default case (else the first) is kept",
    "kind: the English element's kind, the first that matches of heading (h1-h6); code (class code/codeintable/"
    "smathcode, or inside pre/code/bascode/pycode/sqlcode); icon_table (inside icontable/iconcell); menu_path "
    "(inside howtoget); note (inside note/warning/tip); list_item (inside li, or class listitem/ol_item/ul_item/"
    "listitemintable/ilistitem); table_cell (inside table/td/th, or a class ending in 'intable'); else paragraph",
    "en_words: the number of whitespace-separated words of the English text",
    "normalised text: whitespace removed and casefolded (Python str.casefold)",
    "dropped: paragraphs without a letter in any language",
    f"dropped: near-copies of English: any language whose normalised text has difflib.SequenceMatcher(None, en, x, "
    f"autojunk=False).ratio() >= {NEAR_COPY_RATIO} with the normalised English (this includes equal texts)",
    f"dropped: reused translations: every row whose normalised text in some language is that language's text for "
    f">= {REUSED_FOR} different normalised English texts (among the rows left by the rules above; which of them "
    "is the right one cannot be told, so all go)",
    "duplicate normalised English texts keep only their first id in sorted id order",
    f"split by help page: a page is heldout when int.from_bytes(sha256(page path)[:8], 'big') % {HELDOUT_EVERY} == 0, "
    "else calibration; every row of a page is in its page's split",
    "order: rows sorted by sha256(page path#paragraph id) hex digest (a fixed shuffle, so the first N rows mix all "
    "help modules)",
)


def normalise(text: str) -> str:
    """The text as compared with English: whitespace removed, casefolded."""
    return "".join(text.split()).casefold()


def is_near_copy(original: str, translated: str) -> bool:
    """Whether a translation is English left in place: normalised similarity >= NEAR_COPY_RATIO.

    real_quick_ratio and quick_ratio are upper bounds of ratio, so the cheap tests only skip hopeless pairs."""
    a, b = normalise(original), normalise(translated)
    matcher = SequenceMatcher(None, a, b, autojunk=False)
    return (matcher.real_quick_ratio() >= NEAR_COPY_RATIO and matcher.quick_ratio() >= NEAR_COPY_RATIO
            and matcher.ratio() >= NEAR_COPY_RATIO)


def page_of(segment_id: str) -> str:
    """The help page path of a `page path#paragraph id` segment id."""
    return segment_id.split("#", 1)[0]


def _digest(text: str) -> bytes:
    """sha256 of a page path or a segment id: the fixed source of the split and of the row order."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def split_of(segment_id: str) -> str:
    """The fixed split of a segment id, decided by its page: heldout for about one page in five, else calibration."""
    return "heldout" if int.from_bytes(_digest(page_of(segment_id))[:8], "big") % HELDOUT_EVERY == 0 else "calibration"


def _has_letter(text: str) -> bool:
    """Whether text has a letter (an empty or markup/number-only paragraph has none)."""
    return any(char.isalpha() for char in text)


def _reused_keys(rows: dict[str, dict[str, str]], targets: list[str]) -> set[str]:
    """Keys of rows whose text in some target language is used there for >= REUSED_FOR different English texts."""
    originals: dict[tuple[str, str], set[str]] = defaultdict(set)
    for row in rows.values():
        for code in targets:
            originals[code, normalise(row[code])].add(normalise(row[SOURCE]))
    reused = {pair for pair, texts in originals.items() if len(texts) >= REUSED_FOR}
    return {key for key, row in rows.items() if any((code, normalise(row[code])) in reused for code in targets)}


def align(texts: dict[str, dict[str, str]], kinds: dict[str, str]) -> list[dict]:
    """Rows {segment_id, split, kind, en_words, <lang>: text} by RULES: ids translated in every language, English
    near-copies and reused translations dropped, deduplicated, split by page and in fixed order.

    texts maps language -> `page#id` -> text; kinds maps `page#id` -> the English element's kind."""
    targets = [code for code in texts if code != SOURCE]
    candidates = {}
    for key in sorted(set.intersection(*(set(by_key) for by_key in texts.values()))):
        row = {code: by_key[key] for code, by_key in texts.items()}
        if not all(_has_letter(text) for text in row.values()):
            continue
        if not any(is_near_copy(row[SOURCE], row[code]) for code in targets):
            candidates[key] = row
    reused = _reused_keys(candidates, targets)
    rows, seen = [], set()
    for key, row in candidates.items():
        original = normalise(row[SOURCE])
        if key not in reused and original not in seen:
            seen.add(original)
            rows.append({"segment_id": key, "split": split_of(key), "kind": kinds[key],
                         "en_words": len(row[SOURCE].split()), **row})
    return sorted(rows, key=lambda row: _digest(row["segment_id"]).hex())
