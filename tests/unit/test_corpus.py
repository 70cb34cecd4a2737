"""The parallel corpus: language metadata, HTML cleaning and element kinds, alignment and quality rules, the split
by page, the shipped file and its licence files, the loader, FLORES+ loader."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import re
import shutil
import subprocess
import sys
from difflib import SequenceMatcher

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from babel_lib.data import build as corpus_build, flores
from babel_lib.data.alignment import align, is_near_copy, split_of
from babel_lib.data.build import Package, corpus_bytes, write_corpus
from babel_lib.data.corpus import CORPUS_DIR, CORPUS_FILE, PROVENANCE_FILE, corpus_info, load_corpus
from babel_lib.data.flores import load_flores
from babel_lib.data.help_pages import KINDS, Paragraph, page_paragraphs
from babel_lib.data.languages import CORPUS_LANGUAGES, LANGUAGES, language
from babel_lib.errors import BabelError

# ------------------------------------------------------------------------------------------ language metadata


def test_corpus_languages_are_the_seventeen_of_the_issue():
    assert CORPUS_LANGUAGES == ("en", "de", "fr", "es", "ru", "pl", "el", "fi", "et", "hu", "eu", "tr", "ja", "ko",
                                "zh-CN", "vi", "id")
    codes = [lang.code for lang in LANGUAGES]
    assert len(set(codes)) == len(codes) and {"pt", "ar", "hi", "bn", "ur"} <= set(codes)


def test_language_metadata_fields():
    assert language("fi").family == language("et").family == language("hu").family == "Uralic"
    assert (language("fi").genus, language("et").genus, language("hu").genus) == ("Finnic", "Finnic", "Ugric")
    assert (language("zh-CN").family, language("zh-CN").genus, language("zh-CN").flores) == ("Sino-Tibetan",
                                                                                           "Sinitic", "cmn_Hans")
    assert (language("ja").flores, language("ko").flores, language("en").flores) == ("jpn_Jpan", "kor_Hang",
                                                                                     "eng_Latn")
    assert language("ru").script == "Cyrl" and language("el").script == "Grek"
    for lang in LANGUAGES:  # a FLORES+ config is <ISO 639-3>_<ISO 15924 script>
        iso, script = lang.flores.split("_")
        assert len(iso) == 3 and iso.islower() and script == lang.script
    assert len({lang.flores for lang in LANGUAGES}) == len(LANGUAGES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        language("en").name = "Englisch"


def test_unknown_language_code_names_the_known_ones():
    with pytest.raises(BabelError, match="unknown language code 'xx'.*zh-CN"):
        language("xx")
    assert language("id").name == "Indonesian"  # the paragraph-id column is segment_id, so "id" is free


# ------------------------------------------------------------------------------------------ HTML cleaning

PAGE = """<html><head><title>T</title><script>var x = "<p id='par_id9'>no</p>";</script></head><body>
<header><a><p dir="auto">Help for LibreOffice</p></a></header>
<div id="DisplayArea">
<h1 id="hd_id1" dir="auto"><a name="x"></a>Creating   a
  Dialog</h1>
<p id="par_id2" class="paragraph">Choose <span class="emph">Format - Cells</span> and <a href="y.html">click
<span class="literal">OK</span></a>.</p>
<p id="par_id3">Use &lt;instdir&gt; &amp; caf&eacute;&#160;&#8211;&nbsp;done<br>next line<img src="i.png"
alt="Icon"></p>
<p id="par_id4">Open <span id="swlnsys1" class="switchinline"><span hidden="true" id="MACsys1" class="MAC">
<span class="emph">LibreOffice - Preferences</span></span><span hidden="true" id="defaultsys1">
<span class="emph">Tools - Options</span></span></span> now.</p>
<p id="par_id5">In <span class="switchinline"><span hidden="true" class="WRITER">Writer</span><span hidden="true"
class="CALC">Calc</span></span> only.</p>
<p class="embedded">An embedded paragraph without an id.</p>
<table><tr><td><p id="par_id6" class="tablecontent">Cell text</span></p></td></tr></table>
<p id="par_id7">first copy</p><div class="embedded"><p id="par_id7">second copy</p></div>
<h3 id="par_id8"> </h3>
</div></body></html>"""


def test_page_paragraphs_clean_markup_entities_and_whitespace():
    assert {pid: paragraph.text for pid, paragraph in page_paragraphs(PAGE).items()} == {
        "hd_id1": "Creating a Dialog",
        "par_id2": "Choose Format - Cells and click OK.",
        "par_id3": "Use <instdir> & café – done next line",
        "par_id4": "Open Tools - Options now.",  # the default case of a system switch
        "par_id5": "In Writer only.",  # no default case: the first one
        "par_id6": "Cell text",  # a stray end tag does not end the paragraph early
        "par_id8": "",  # empty paragraphs are dropped later, in align
    }  # par_id7 occurs twice in the page: ambiguous, dropped; the <p> in the script is not markup


KINDS_PAGE = """<html><body><div id="DisplayArea">
<h1 id="h1">Title</h1><h4 id="h4">Sub</h4>
<p id="p1" class="paragraph">A plain paragraph.</p>
<div class="embedded"><p id="p2">An embedded paragraph.</p></div>
<ul><li><p id="l1" class="listitem">In a list.</p></li></ul><p id="l2" class="ol_item">Numbered.</p>
<table><tr><td><p id="t1" class="tablecontentintable">Cell.</p></td></tr></table>
<p id="t2" class="paragraphintable">Loose table paragraph.</p>
<table><tr><td><ul><li><p id="t3" class="listitemintable">List in a table.</p></li></ul></td></tr></table>
<div class="note"><div class="notetext"><p id="n1">A note.</p></div></div>
<div class="warning"><div class="notetext"><p id="n2">A warning.</p></div></div>
<div class="tip"><table><tr><td><p id="n3">A tip in a table.</p></td></tr></table></div>
<div class="icontable"><div class="iconcell"><p id="i1"><img src="x.svg"></p></div>
<div class="iconcell"><p id="i2">Opens the dialog.</p></div></div>
<div class="howtoget"><div class="howtogetbody"><p id="m1">Choose Format - Character.</p>
<div class="icontable"><div class="iconcell"><p id="i3">Character</p></div></div></div></div>
<p id="c1" class="code">x = 1</p><div class="bascode"><pre><p id="c2">Sub Main</p></pre></div>
<div class="note"><h2 id="h2">Syntax:</h2></div>
</div></body></html>"""


def test_page_paragraphs_record_the_element_kind():
    kinds = {pid: paragraph.kind for pid, paragraph in page_paragraphs(KINDS_PAGE).items()}
    assert kinds == {
        "h1": "heading", "h4": "heading", "h2": "heading",  # a heading inside a note is a heading
        "p1": "paragraph", "p2": "paragraph",
        "l1": "list_item", "l2": "list_item", "t3": "list_item",  # a list item in a table is a list item
        "t1": "table_cell", "t2": "table_cell",
        "n1": "note", "n2": "note", "n3": "note",
        "i1": "icon_table", "i2": "icon_table", "i3": "icon_table",  # icon tables win over how-to-get boxes
        "m1": "menu_path",
        "c1": "code", "c2": "code",
    }
    assert set(kinds.values()) == set(KINDS)
    assert page_paragraphs(KINDS_PAGE)["p1"] == Paragraph("A plain paragraph.", "paragraph")


def _texts(**by_language: dict[str, str]) -> dict[str, dict[str, str]]:
    return {code.replace("_", "-"): texts for code, texts in by_language.items()}


def _kinds(texts: dict[str, dict[str, str]]) -> dict[str, str]:
    return {key: "paragraph" for key in texts["en"]}


def test_align_drops_untranslated_missing_empty_and_duplicate_paragraphs():
    texts = _texts(
        en={"a.html#p1": "Open the file.", "a.html#p2": "Save", "a.html#p3": "Close", "a.html#p4": "42",
            "b.html#p1": "Open the file.", "b.html#p2": "Print", "b.html#p3": "Exit"},
        de={"a.html#p1": "Datei öffnen.", "a.html#p2": "Save", "a.html#p3": "Schließen", "a.html#p4": "42",
            "b.html#p1": "Die Datei öffnen.", "b.html#p2": "Drucken", "b.html#p3": "Beenden"},
        zh_CN={"a.html#p1": "打开文件。", "a.html#p2": "保存", "a.html#p4": "42", "b.html#p1": "打开文件。",
               "b.html#p2": "打印", "b.html#p3": "..."},
    )
    rows = align(texts, _kinds(texts))
    # p2 is English in de (untranslated), a.html#p3 is missing in zh-CN, p4 has no letter, b.html#p1 repeats
    # a.html#p1's English text, b.html#p3 has no letter in zh-CN: only a.html#p1 and b.html#p2 remain.
    expected = [{"segment_id": "a.html#p1", "en": "Open the file.", "de": "Datei öffnen.", "zh-CN": "打开文件。",
                 "en_words": 3},
                {"segment_id": "b.html#p2", "en": "Print", "de": "Drucken", "zh-CN": "打印", "en_words": 1}]
    expected = sorted(expected, key=lambda row: hashlib.sha256(row["segment_id"].encode()).hexdigest())
    assert rows == [{**row, "split": split_of(row["segment_id"]), "kind": "paragraph"} for row in expected]


def test_align_compares_with_english_ignoring_whitespace_and_case():
    texts = _texts(
        en={"a#1": "Set (strict WLD).If it is on", "a#2": "Open the file.", "a#3": "Keep me here."},
        de={"a#1": "Setzen (strict WLD). Wenn", "a#2": "OPEN  the\tFILE.", "a#3": "Behalte mich hier."},
        fr={"a#1": "Set (strict WLD). If it is on", "a#2": "Ouvrir le fichier.", "a#3": "Garde-moi ici."},
    )
    rows = align(texts, _kinds(texts))
    assert [row["segment_id"] for row in rows] == ["a#3"]  # a#1 is English in fr but for a space, a#2 in de but case


def test_near_copy_threshold_is_difflib_ratio_of_normalised_texts():
    english = "abcdefghijklmnopqrstuvwxyz"  # 26 characters: one changed keeps 25 -> 2*25/52 = 0.96
    one, two = "abcdefghijklmXopqrstuvwxyz", "abcdefgXijklmnopqrsXuvwxyz"  # two changed: 2*24/52 = 0.923
    assert SequenceMatcher(None, english, one).ratio() == 50 / 52 and SequenceMatcher(None, english, two).ratio() == 48 / 52
    assert is_near_copy(english, one) and not is_near_copy(english, two)
    assert is_near_copy("Abc Def " * 5, "abcdef" * 5) and not is_near_copy("Open the file.", "Datei öffnen.")
    texts = _texts(en={"p#1": english, "p#2": "Close the window now."},
                   de={"p#1": one.upper(), "p#2": "Schließe das Fenster."},
                   fr={"p#1": two, "p#2": "Fermez la fenêtre."})
    assert [row["segment_id"] for row in align(texts, _kinds(texts))] == ["p#2"]  # one (any language) is enough
    texts["de"]["p#1"] = "A B" + two  # now 0.923 in fr and lower in de: kept
    assert sorted(row["segment_id"] for row in align(texts, _kinds(texts))) == ["p#1", "p#2"]


def test_align_drops_translations_reused_for_three_different_english_texts():
    english = {f"err.html#e{i}": f"Error {i}: {what}" for i, what in enumerate(
        ["Path not found", "Disk full", "Access denied", "File exists", "Bad name"])}
    vi = {"err.html#e0": "76 Không tìm thấy đường dẫn", "err.html#e1": "76 không tìm thấy  đường dẫn",
          "err.html#e2": "76 Không tìm thấy đường dẫn", "err.html#e3": "Tệp đã tồn tại", "err.html#e4": "Tên sai"}
    de = {key: f"Fehler {i}" for i, key in enumerate(english)}
    ja = {**{key: f"エラー {i}" for i, key in enumerate(english)}, "err.html#e3": "名前", "err.html#e4": "名前"}
    texts = _texts(en=english, de=de, vi=vi, ja=ja)
    rows = align(texts, _kinds(texts))
    # vi uses one text (ignoring whitespace and case) for e0-e2: all three go; ja's "名前" is used for only two
    # different English texts: kept
    assert sorted(row["segment_id"] for row in rows) == ["err.html#e3", "err.html#e4"]
    english["err.html#e2"] = "error 0:  PATH not found"  # the same English text as e0, ignoring whitespace and case
    rows = align(texts, _kinds(texts))  # two different English texts for the vi text: kept; e2 duplicates e0's English
    assert sorted(row["segment_id"] for row in rows) == ["err.html#e0", "err.html#e1", "err.html#e3", "err.html#e4"]


def test_align_records_kind_and_english_word_count():
    texts = _texts(en={"a#h": "Creating a Dialog", "a#p": "Choose  Format - Cells and click OK."},
                   ja={"a#h": "ダイアログの作成", "a#p": "書式 → セル を選択し、OK をクリックします。"})
    rows = {row["segment_id"]: row for row in align(texts, {"a#h": "heading", "a#p": "paragraph"})}
    assert (rows["a#h"]["kind"], rows["a#h"]["en_words"]) == ("heading", 3)
    assert (rows["a#p"]["kind"], rows["a#p"]["en_words"]) == ("paragraph", 7)


def _reference_split(segment_id: str) -> str:
    page = segment_id.split("#")[0]
    return "heldout" if int(hashlib.sha256(page.encode()).hexdigest()[:16], 16) % 5 == 0 else "calibration"


def test_split_is_a_fixed_hash_of_the_page_with_about_a_fifth_held_out():
    ids = [f"text/page{i // 7}.html#par_id{i}" for i in range(70000)]
    splits = [split_of(pid) for pid in ids]
    assert splits == [_reference_split(pid) for pid in ids]
    by_page = {}
    for pid, split in zip(ids, splits):
        by_page.setdefault(pid.split("#")[0], set()).add(split)
    assert all(len(found) == 1 for found in by_page.values())  # every page wholly in one split
    assert 0.19 < splits.count("heldout") / len(ids) < 0.21
    texts = _texts(en={"a.html#1": "One", "a.html#2": "Two", "b.html#1": "Three"},
                   de={"a.html#1": "Eins", "a.html#2": "Zwei", "b.html#1": "Drei"})
    rows = align(texts, _kinds(texts))
    assert {row["segment_id"]: row["split"] for row in rows} == {key: _reference_split(key) for key in texts["en"]}


def test_corpus_bytes_are_deterministic_json_lines():
    rows = [{"segment_id": "x#1", "split": "heldout", "en": "Hi \u2028 there", "ja": "やあ"},
            {"segment_id": "x#2", "split": "calibration", "en": "Bye", "ja": "じゃあ"}]
    data = corpus_bytes(rows)
    assert data == corpus_bytes([dict(reversed(list(row.items()))) for row in rows])  # key order does not matter
    lines = lzma.decompress(data).decode("utf-8").split("\n")
    assert lines[-1] == "" and [json.loads(line) for line in lines[:-1]] == rows
    assert lines[0] == '{"en":"Hi \u2028 there","ja":"やあ","segment_id":"x#1","split":"heldout"}'


# ------------------------------------------------------------------------------------------ shipped corpus


@pytest.fixture(scope="module")
def shipped() -> list[dict[str, str]]:
    """The shipped corpus rows, read without the loader (the brute-force reference)."""
    with lzma.open(CORPUS_DIR / CORPUS_FILE, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def full():
    return load_corpus()


def _normalised(text: str) -> str:
    return re.sub(r"\s+", "", text).casefold()


def test_shipped_corpus_matches_its_provenance(shipped):
    provenance = json.loads((CORPUS_DIR / PROVENANCE_FILE).read_text(encoding="utf-8"))
    data = (CORPUS_DIR / CORPUS_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == provenance["corpus"]["sha256"]
    assert provenance["languages"] == list(CORPUS_LANGUAGES)
    assert [p["package"] for p in provenance["packages"]] == [corpus_build.package_name(c) for c in CORPUS_LANGUAGES]
    assert all(len(p["sha256"]) == 64 and p["version"] for p in provenance["packages"])
    counts = {split: sum(row["split"] == split for row in shipped) for split in ("calibration", "heldout")}
    assert provenance["corpus"]["paragraphs"] == counts
    pages = {split: {row["segment_id"].split("#")[0] for row in shipped if row["split"] == split} for split in counts}
    assert provenance["corpus"]["pages"] == {split: len(found) for split, found in pages.items()}
    assert provenance["corpus"]["kinds"] == {kind: {split: sum(row["kind"] == kind and row["split"] == split
                                                              for row in shipped) for split in counts}
                                             for kind in KINDS}
    assert provenance["quality"] == {"near_copy_ratio": 0.93, "reused_for": 3, "heldout_every": 5}
    assert any("near-copies of English" in rule and "0.93" in rule for rule in provenance["rules"])
    assert any("split by help page" in rule for rule in provenance["rules"])


def test_licence_files_name_both_sources_and_ship_both_texts():
    root = CORPUS_DIR.parents[1]
    assert "MIT License" in (root / "LICENSE").read_text() and "the babel authors" in (root / "LICENSE").read_text()
    notice = (CORPUS_DIR / "NOTICE").read_text()
    assert notice.count("Mozilla Public") == 1 and "Apache License 2.0" in notice
    assert "helpcontent2" in notice and "translations source" in notice and "LICENSE-Apache-2.0" in notice
    assert (CORPUS_DIR / "LICENSE-MPL-2.0").read_text().startswith("Mozilla Public License Version 2.0")
    apache = (CORPUS_DIR / "LICENSE-Apache-2.0").read_text()
    assert "Apache License" in apache[:200] and "END OF TERMS AND CONDITIONS" in apache


def test_shipped_corpus_is_aligned_translated_and_deduplicated(shipped):
    assert len(shipped) >= 7500
    assert len({row["segment_id"] for row in shipped}) == len(shipped)
    assert len({_normalised(row["en"]) for row in shipped}) == len(shipped)
    for row in shipped:
        assert row.keys() == {"segment_id", "split", "kind", "en_words", *CORPUS_LANGUAGES}
        assert all(row[code].strip() == row[code] and "  " not in row[code] for code in CORPUS_LANGUAGES)
        assert all(any(c.isalpha() for c in row[code]) for code in CORPUS_LANGUAGES)
        assert not any(_normalised(row[code]) == _normalised(row["en"]) for code in CORPUS_LANGUAGES[1:]), row
    assert [row["segment_id"] for row in shipped] == sorted((row["segment_id"] for row in shipped),
                                                    key=lambda pid: hashlib.sha256(pid.encode()).hexdigest())


def test_shipped_corpus_has_no_near_copies_of_english(shipped):
    for row in shipped:
        english = _normalised(row["en"])
        for code in CORPUS_LANGUAGES[1:]:
            matcher = SequenceMatcher(None, english, _normalised(row[code]), autojunk=False)
            assert matcher.quick_ratio() < 0.93 or matcher.ratio() < 0.93, (row["segment_id"], code)


def test_shipped_corpus_has_no_translation_reused_for_three_english_texts(shipped):
    originals = {}
    for row in shipped:
        for code in CORPUS_LANGUAGES[1:]:
            originals.setdefault((code, _normalised(row[code])), set()).add(_normalised(row["en"]))
    assert max(len(texts) for texts in originals.values()) <= 2


def test_shipped_corpus_splits_by_page_with_about_a_fifth_held_out(shipped):
    splits = {}
    for row in shipped:
        assert row["split"] == _reference_split(row["segment_id"])
        splits.setdefault(row["segment_id"].split("#")[0], set()).add(row["split"])
    assert all(len(found) == 1 for found in splits.values())  # no page in both splits
    assert 0.17 < sum(row["split"] == "heldout" for row in shipped) / len(shipped) < 0.25


def test_shipped_corpus_records_kinds_and_english_word_counts(shipped):
    assert all(row["kind"] in KINDS and row["en_words"] == len(row["en"].split()) >= 1 for row in shipped)
    found = {row["kind"] for row in shipped}
    assert {"heading", "paragraph", "list_item", "table_cell", "note", "icon_table"} <= found


def test_loader_columns_and_rows_match_the_file(full, shipped):
    assert full.column_names == ["segment_id", "split", *CORPUS_LANGUAGES, "kind", "en_words"]
    assert full.to_list() == [{name: row[name] for name in full.column_names} for row in shipped]


def test_loader_keeps_alignment_for_any_language_subset(full):
    subset = load_corpus(["ja", "en", "id"])
    assert subset.column_names == ["segment_id", "split", "ja", "en", "id", "kind", "en_words"]
    assert list(subset["segment_id"]) == list(full["segment_id"])
    for code in ("ja", "en", "id", "kind", "en_words"):
        assert list(subset[code]) == list(full[code])


def test_loader_splits_are_disjoint_and_cover_the_corpus(full):
    calibration, heldout = load_corpus(["en"], split="calibration"), load_corpus(["en"], split="heldout")
    assert set(calibration["split"]) == {"calibration"} and set(heldout["split"]) == {"heldout"}
    assert not set(calibration["segment_id"]) & set(heldout["segment_id"])
    assert sorted([*calibration["segment_id"], *heldout["segment_id"]]) == sorted(full["segment_id"])
    assert corpus_info()["paragraphs"] == {"calibration": len(calibration), "heldout": len(heldout)}


def test_loader_is_deterministic_and_limit_takes_the_first_rows(full):
    heldout = [row for row in full.to_list() if row["split"] == "heldout"]
    limited = load_corpus(split="heldout", limit=7)
    assert limited.to_list() == heldout[:7]
    assert load_corpus(split="heldout", limit=7).to_list() == limited.to_list()
    assert load_corpus(["en"], limit=0).column_names == ["segment_id", "split", "en", "kind", "en_words"]
    assert len(load_corpus(limit=0)) == 0


@pytest.mark.parametrize("kinds,min_words", [(["paragraph"], None), (None, 5), (["note", "list_item"], 12)])
def test_loader_filters_by_kind_and_word_count_before_the_limit(shipped, kinds, min_words):
    expected = [row for row in shipped if row["split"] == "calibration" and (kinds is None or row["kind"] in kinds)
                and (min_words is None or row["en_words"] >= min_words)]
    assert 0 < len(expected) < len(shipped)
    dataset = load_corpus(["en", "vi"], split="calibration", kinds=kinds, min_words=min_words)
    assert dataset.to_list() == [{name: row[name] for name in dataset.column_names} for row in expected]
    limited = load_corpus(["en"], split="calibration", limit=9, kinds=kinds, min_words=min_words)
    assert list(limited["segment_id"]) == [row["segment_id"] for row in expected[:9]]


def test_default_profile_corpus_filter_leaves_enough_rows():
    profile = yaml.safe_load((CORPUS_DIR.parents[1] / "configs" / "default.yaml").read_text())
    kinds, min_words = profile["corpus_kinds"], profile["corpus_min_words"]
    assert set(kinds) <= set(KINDS) and "heading" not in kinds and isinstance(min_words, int)
    calibration = load_corpus(["en"], split="calibration", kinds=kinds, min_words=min_words)
    heldout = load_corpus(["en"], split="heldout", kinds=kinds, min_words=min_words)
    notebooks = profile["notebooks"]
    assert len(calibration) >= notebooks["02_profile"]["paragraphs"] >= 80
    assert len(heldout) >= max(notebooks["03_massive_activations"]["ppl_paragraphs"],
                               notebooks["04_sparsity_scaling"]["paragraphs"])


def test_corpus_info_reports_packages_and_languages(full):
    info = corpus_info()
    assert info["total"] == len(full) and info["languages"] == list(CORPUS_LANGUAGES)
    assert info["packages"]["zh-CN"].startswith("libreoffice-help-zh-cn=")
    assert set(info["packages"]) == set(CORPUS_LANGUAGES)


@pytest.mark.parametrize("kwargs,message", [
    ({"languages": ["en", "xx"]}, r"\['xx'\] are not in the corpus.*zh-CN"),
    ({"languages": ["pt"]}, r"not in the corpus.*zh-CN, vi, id"),
    ({"languages": "en"}, "not the string"),
    ({"languages": ["en", "en"]}, "repeat"),
    ({"split": "test"}, "unknown split"),
    ({"limit": -1}, "non-negative"),
    ({"min_words": -1}, "min_words must be a non-negative"),
    ({"min_words": 2.5}, "min_words must be a non-negative"),
    ({"kinds": "paragraph"}, "not the string"),
    ({"kinds": ["sentence"]}, r"unknown element kinds \['sentence'\].*paragraph"),
])
def test_loader_rejects_bad_arguments(kwargs, message):
    with pytest.raises(BabelError, match=message):
        load_corpus(**kwargs)


SMALL_PACKAGES = [Package(code, corpus_build.package_name(code), "1", "0" * 64, "x.deb") for code in ("en", "de")]


def _small_corpus(directory):
    texts = _texts(en={"a#1": "One", "a#2": "Two"}, de={"a#1": "Eins", "a#2": "Zwei"})
    rows = align(texts, _kinds(texts))
    write_corpus(directory, SMALL_PACKAGES, rows)
    return rows


def test_loader_reads_another_build_of_the_corpus(tmp_path):
    rows = _small_corpus(tmp_path)
    dataset = load_corpus(directory=tmp_path)
    assert dataset.column_names == ["segment_id", "split", "en", "de", "kind", "en_words"]
    assert dataset.to_list() == rows


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete corpus", "delete provenance"])
def test_corrupt_or_missing_corpus_says_to_run_make_data(tmp_path, damage):
    _small_corpus(tmp_path)
    path = tmp_path / CORPUS_FILE
    data = bytearray(path.read_bytes())
    if damage == "flip a byte":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":  # sha256 updated too, so the decompression itself fails
        path.write_bytes(bytes(data[:-9]))
        record = json.loads((tmp_path / PROVENANCE_FILE).read_text())
        record["corpus"]["sha256"] = hashlib.sha256(bytes(data[:-9])).hexdigest()
        (tmp_path / PROVENANCE_FILE).write_text(json.dumps(record))
    else:
        (tmp_path / (CORPUS_FILE if damage == "delete corpus" else PROVENANCE_FILE)).unlink()
    with pytest.raises(BabelError, match="make data"):
        load_corpus(directory=tmp_path)
    with pytest.raises(BabelError, match="make data"):
        corpus_info(tmp_path)


# ------------------------------------------------------------------------------------------ builder logic


def test_recorded_versions_that_apt_lacks_are_reported(tmp_path, monkeypatch, capsys):
    recorded = corpus_build.recorded_packages(CORPUS_DIR)
    assert [p.language for p in recorded] == list(CORPUS_LANGUAGES) and all(p.version for p in recorded)
    newest = {p.package: p.version for p in recorded}
    newest["libreoffice-help-ja"] = "4:9.9.9-1"
    monkeypatch.setattr(corpus_build, "available_versions", lambda package: [newest[package], "4:7.0.0-1"]
                        if package == "libreoffice-help-ja" else [newest[package]])
    with pytest.raises(BabelError, match="1 packages cannot be fetched at their recorded version.*--use-available"):
        corpus_build.resolve_versions(recorded, tmp_path, use_available=False)
    recorded_ja = next(p.version for p in recorded if p.language == "ja")
    assert f"libreoffice-help-ja: recorded {recorded_ja}, apt has 4:9.9.9-1" in capsys.readouterr().err
    resolved = corpus_build.resolve_versions(recorded, tmp_path, use_available=True)
    changed = [p for p, q in zip(resolved, recorded) if p != q]
    assert changed == [Package("ja", "libreoffice-help-ja", "4:9.9.9-1", "", "libreoffice-help-ja_4%3a9.9.9-1_all.deb")]


def test_fetch_refuses_a_deb_whose_sha256_differs(tmp_path):
    (tmp_path / "x.deb").write_bytes(b"not the package")
    package = Package("en", "libreoffice-help-en-us", "1", "0" * 64, "x.deb")
    with pytest.raises(BabelError, match="sha256"):
        corpus_build.fetch(package, tmp_path)
    assert corpus_build.fetch(dataclasses.replace(package, sha256=""), tmp_path).sha256 == hashlib.sha256(
        b"not the package").hexdigest()


@pytest.mark.parametrize("rebuilt_rows,exit_code", [("same", 0), ("other", 1)])
def test_check_exits_non_zero_when_the_rebuild_differs(tmp_path, monkeypatch, capsys, rebuilt_rows, exit_code):
    shipped_rows = _small_corpus(tmp_path)
    other_rows = [{**row, "de": row["de"] + "!"} for row in shipped_rows]

    def fake_build(packages, debs, directory):  # stands in for apt-get, dpkg and the HTML parsing
        rows = shipped_rows if rebuilt_rows == "same" else other_rows
        return write_corpus(directory, packages, rows), rows

    monkeypatch.setattr(corpus_build, "recorded_packages", lambda directory: SMALL_PACKAGES)
    monkeypatch.setattr(corpus_build, "resolve_versions", lambda packages, debs, use_available: packages)
    monkeypatch.setattr(corpus_build, "build", fake_build)
    assert corpus_build.main(["--check", "--out", str(tmp_path)]) == exit_code
    assert ("identical" if exit_code == 0 else "DIFFERENT") in capsys.readouterr().out


@pytest.mark.slow
def test_make_data_rebuilds_the_shipped_corpus_byte_for_byte():
    missing = [tool for tool in ("apt-get", "apt-cache", "dpkg") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the rebuild needs Debian's {', '.join(missing)} (not available here)")
    result = subprocess.run([sys.executable, "-m", "babel_lib.data.build", "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical" in result.stdout


# ------------------------------------------------------------------------------------------ FLORES+


@pytest.fixture
def flores_dir(tmp_path):
    """A 4-sentence FLORES+-shaped folder (<split>/<config>.parquet, the hub's columns), invented text."""
    texts = {"eng_Latn": ["One.", "Two.", "Three.", "Four."], "deu_Latn": ["Eins.", "Zwei.", "Drei.", "Vier."],
             "cmn_Hans": ["一。", "二。", "三。", None]}
    for split, offset in (("dev", 1), ("devtest", 101)):
        (tmp_path / split).mkdir()
        for config, sentences in texts.items():
            iso, script = config.split("_")
            kept = [(i, text) for i, text in enumerate(sentences) if text is not None]
            ids = [offset + i for i, _ in reversed(kept)]  # stored out of order on purpose
            table = pa.table({
                "id": pa.array(ids, pa.int64()), "iso_639_3": [iso] * len(ids), "iso_15924": [script] * len(ids),
                "glottocode": ["none0000"] * len(ids), "text": [f"{split} {text}" for _, text in reversed(kept)],
                "url": ["https://example.org"] * len(ids), "domain": ["wikinews"] * len(ids),
                "topic": ["test"] * len(ids), "has_image": [False] * len(ids), "has_hyperlink": [False] * len(ids),
                "last_updated": ["2.0"] * len(ids),
            })
            pq.write_table(table, tmp_path / split / f"{config}.parquet")
    return tmp_path


def test_flores_local_files_give_aligned_wide_rows(flores_dir):
    dataset = load_flores(["de", "en", "zh-CN"], split="devtest", path=flores_dir)
    assert dataset.column_names == ["segment_id", "split", "de", "en", "zh-CN"]
    assert dataset.to_list() == [
        {"segment_id": "101", "split": "devtest", "de": "devtest Eins.", "en": "devtest One.", "zh-CN": "devtest 一。"},
        {"segment_id": "102", "split": "devtest", "de": "devtest Zwei.", "en": "devtest Two.", "zh-CN": "devtest 二。"},
        {"segment_id": "103", "split": "devtest", "de": "devtest Drei.", "en": "devtest Three.", "zh-CN": "devtest 三。"},
    ]  # id 104 has no Chinese sentence: only ids present in every language are kept
    assert load_flores(["en", "de"], path=flores_dir, limit=2).to_list() == [
        {"segment_id": "1", "split": "dev", "en": "dev One.", "de": "dev Eins."},
        {"segment_id": "2", "split": "dev", "en": "dev Two.", "de": "dev Zwei."},
    ]


def test_flores_errors_name_the_fix(flores_dir, monkeypatch):
    with pytest.raises(BabelError, match="unknown FLORES\\+ split"):
        load_flores(["en"], split="test", path=flores_dir)
    with pytest.raises(BabelError, match="fra_Latn.parquet"):
        load_flores(["en", "fr"], path=flores_dir)
    with pytest.raises(BabelError, match="unknown language code 'klingon'"):
        load_flores(["klingon"], path=flores_dir)

    def offline(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(flores.datasets, "load_dataset", offline)
    with pytest.raises(BabelError, match="eng_Latn/dev.*ConnectionError.*path="):
        load_flores(["en"])
