"""The single-epoch pretraining corpus: text readers (markup, man), the cleaning, dedup and split rules on
small synthetic inputs, shard cutting, the shard reader (sha256 check, one epoch never reads a token twice) and the
committed provenance."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import shutil

import numpy as np
import pytest

from babel_lib.data import pretrain_build as pb
from babel_lib.data.alignment import split_of
from babel_lib.data.doc_text import man_paragraphs, markup_paragraphs
from babel_lib.data.pretrain import FORMAT, MANIFEST, iter_windows, load_tokens, present_shards, window_count
from babel_lib.errors import BabelError

# ------------------------------------------------------------------------------------------ readers


def test_markup_paragraphs_split_blocks_drop_scripts_and_keep_code_lines():
    html = """<html><head><title>Head title</title><script>var x = 1;</script></head><body>
    <h1>The  heading</h1><p>First <b>bold</b> &amp; <a href="#">linked</a>
    words.</p><div>Block<br>after break</div><style>p {color: red}</style>
    <ul><li>one item</li><li>two</li></ul><pre>def f(x):\n\treturn x  </pre><nav>Home | Next</nav></body></html>"""
    assert markup_paragraphs(html) == ["The heading", "First bold & linked words.", "Block", "after break",
                                       "one item", "two", "def f(x):\n    return x"]


def test_markup_paragraphs_read_mallard_and_drop_its_metadata():
    page = """<page xmlns="http://projectmallard.org/1.0/" id="x"><info><credit><name>Someone</name></credit>
    <desc>Metadata description</desc></info><title>Change the wallpaper</title>
    <p>Open the <gui>Settings</gui> panel.</p><steps><item><p>Click <gui>Background</gui>.</p></item></steps>
    <screen>$ gsettings set</screen></page>"""
    assert markup_paragraphs(page) == ["Change the wallpaper", "Open the Settings panel.", "Click Background.",
                                       "$ gsettings set"]


def test_man_paragraphs_decode_macros_escapes_and_keep_nofill_lines():
    source = r""".\" a comment that is dropped
.TH LS 1 "2024" "GNU" "User Commands"
.SH NAME
ls \- list directory contents
.SH SYNOPSIS
.B ls
[\fIOPTION\fR]... [\fIFILE\fR]...
.PP
See
.BR dir (1)
and \(lqinfo\(rq \[em] or \e.
.nf
  line one
  line two
.fi
Back to \*(lqfilling\*(rq text.
"""
    assert man_paragraphs(source) == ["NAME", "ls - list directory contents", "SYNOPSIS", "ls [OPTION]... [FILE]...",
                                      "See dir(1) and \u201cinfo\u201d \u2014 or \\.", "  line one\n  line two",
                                      "Back to filling text."]


def test_man_arguments_group_quoted_words():
    assert man_paragraphs('.SH "SEE ALSO"\n.IP "\\fB\\-a\\fR, \\-\\-all" 4\ndo not ignore\n') == [
        "SEE ALSO", "-a, --all do not ignore"]


# ------------------------------------------------------------------------------------------ cleaning rules


def _page(path: str, *paragraphs: str, package: str = "pkg", language: str = "en") -> pb.Page:
    return pb.Page(package, path, language, path, list(paragraphs))


def test_is_prose_needs_length_and_mostly_letters():
    assert pb.is_prose("A sentence of enough length.")
    assert not pb.is_prose("Too short.")
    assert not pb.is_prose("12 34 56 78 90 12 34 56 78 90 a")
    assert pb.is_prose("\u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3067\u3059\u3002")  # 9 characters, 27 bytes


def test_normalised_ignores_case_whitespace_and_digits():
    assert pb.normalised("Version 3.11 of  the Manual") == pb.normalised("version 2.7 of the\nmanual")
    assert pb.normalised("page 12 of 30") == pb.normalised("page 1 of 3")
    assert pb.normalised("version of the manual") != pb.normalised("version of a manual")


def test_clean_pages_drop_repeats_near_copies_and_short_pages():
    long_a, long_b = "Alpha paragraph " * 20, "Beta paragraph " * 20  # 320 and 300 characters
    boiler = "Copyright the authors, all rights reserved."  # 43
    fresh = "Fresh words here " * 15  # 255
    pages = [
        _page("a", long_a, boiler, "tiny", long_a.upper()),  # not prose and a repeat within the page go
        _page("b", long_b, boiler),  # the boilerplate was kept before: it goes, the page stays
        _page("c", long_a, long_b, fresh),  # 255 new of 875 characters: a near copy, dropped
        _page("d", long_a, "Delta paragraph " * 10),  # 160 new bytes: under MIN_DOCUMENT_BYTES
        _page("e", long_b, fresh, "Epsilon " * 10),  # 335 new of 635: kept, with only its new paragraphs
    ]
    seen: set[bytes] = set()
    kept = list(pb.clean_pages(iter(pages), seen))
    assert [p.path for p in kept] == ["a", "b", "e"]
    assert [p.paragraphs for p in kept] == [[long_a, boiler], [long_b], [fresh, "Epsilon " * 10]]
    assert seen == {pb.normalised(t) for t in (long_a, boiler, long_b, fresh, "Epsilon " * 10)}


def test_dropped_pages_do_not_mark_their_paragraphs_seen():
    text = "A paragraph long enough to count as prose. " * 2
    near_copy = _page("x", "Seen before, long enough paragraph. " * 8, text)
    seen = {pb.normalised("Seen before, long enough paragraph. " * 8)}
    assert list(pb.clean_pages(iter([near_copy]), seen)) == []
    assert [p.paragraphs for p in pb.clean_pages(iter([_page("y", text * 3)]), seen)] == [[text * 3]]


def test_language_codes_and_page_keys_tie_translations_together():
    assert [pb.language_code(c) for c in ("C", "en_US", "de-DE", "pt_BR", "zh-TW", "sr@latin", "ca-valencia")] == [
        "en", "en", "de", "pt-br", "zh-tw", "sr", "ca"]
    source = pb.Source("x", r"usr/share/help/(?P<lang>[^/]+)/guide/.+\.page", "markup", "", "MIT")
    import re

    identities = [pb.page_identity(source, re.fullmatch(source.pattern, f"usr/share/help/{lang}/guide/a.page"))
                  for lang in ("C", "de", "pt_BR")]
    assert identities == [("en", "usr/share/help/*/guide/a.page"), ("de", "usr/share/help/*/guide/a.page"),
                          ("pt-br", "usr/share/help/*/guide/a.page")]
    fixed = pb.Source("y", r"doc/.+\.html", "markup", "en", "MIT")
    assert pb.page_identity(fixed, re.fullmatch(fixed.pattern, "doc/a.html")) == ("en", "doc/a.html")


def test_heldout_rule_is_the_hash_formula_with_about_one_percent():
    keys = [f"usr/share/doc/x/page{i}.html" for i in range(20000)]
    brute = [int(hashlib.sha256(k.encode()).hexdigest()[:16], 16) % 100 == 0 for k in keys]
    assert [pb.is_heldout(k) for k in keys] == brute
    assert 0.007 < sum(brute) / len(keys) < 0.013


def test_libreoffice_pages_held_out_by_the_corpus_are_recognised_in_every_language():
    for page in ("text/swriter/guide/main.html", "text/shared/01/0101.html", "text/scalc/01/func_sum.html"):
        expected = split_of(page) == "heldout"
        assert pb.libreoffice_heldout(f"usr/share/libreoffice/help/de/{page}") == expected
        assert pb.libreoffice_heldout(f"usr/share/libreoffice/help/en-US/{page}") == expected


def test_shard_cuts_keep_pages_whole_and_under_the_limit():
    rng = np.random.default_rng(0)
    sizes = [int(s) for s in rng.integers(1, 40, 300)]
    cuts = pb.shard_cuts(sizes, 100)
    assert cuts[0][0] == 0 and cuts[-1][1] == len(sizes)
    assert all(end == start for (_, end), (start, _) in zip(cuts, cuts[1:]))
    assert all(sum(sizes[a:b]) <= 100 for a, b in cuts)
    assert all(sum(sizes[a:b + 1]) > 100 for a, b in cuts[:-1])  # a shard is cut only when the next page won't fit
    with pytest.raises(BabelError, match="exceeds the shard size"):
        pb.shard_cuts([10, 101], 100)


def _deb(tmp_path, files: dict[str, str], links: dict[str, str] | None = None):
    """A minimal .deb holding `files` (path -> text) and symlinks (path -> target), built with dpkg-deb."""
    import subprocess

    root = tmp_path / "root"
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text, encoding="utf-8")
    for path, target in (links or {}).items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).symlink_to(target)
    (root / "DEBIAN").mkdir(parents=True, exist_ok=True)
    (root / "DEBIAN" / "control").write_text("Package: docs\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\n"
                                             "Description: test\n")
    deb = tmp_path / "docs_1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True, capture_output=True)
    return deb


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs Debian's dpkg-deb")
def test_read_source_reads_matching_files_in_path_order_with_language_and_copyright(tmp_path):
    page = "<page><info><desc>meta</desc></info><title>{}</title><p>{}</p></page>"
    deb = _deb(tmp_path, {
        "usr/share/doc/docs/copyright": "Files: *\nLicense: MIT\n",
        "usr/share/help/de/guide/b.page": page.format("Titel", "Ein Satz."),
        "usr/share/help/C/guide/b.page": page.format("Title", "A sentence."),
        "usr/share/help/C/guide/a.page": page.format("First", "One."),
        "usr/share/help/C/guide/notes.txt": "not matched",
    }, links={"usr/share/help/de/guide/a.page": "../../C/guide/a.page"})
    source = pb.Source("docs", r"usr/share/help/(?P<lang>[^/]+)/guide/.+\.page", "markup", "", "MIT")
    pages, copyright_text = pb.read_source(source, deb)
    assert [(p.path, p.language, p.key, p.paragraphs) for p in pages] == [
        ("usr/share/help/C/guide/a.page", "en", "usr/share/help/*/guide/a.page", ["First", "One."]),
        ("usr/share/help/C/guide/b.page", "en", "usr/share/help/*/guide/b.page", ["Title", "A sentence."]),
        ("usr/share/help/de/guide/b.page", "de", "usr/share/help/*/guide/b.page", ["Titel", "Ein Satz."]),
    ]  # sorted paths, the symlink and the unmatched file skipped
    assert copyright_text == b"Files: *\nLicense: MIT\n"
    with pytest.raises(BabelError, match="no file matching"):
        pb.read_source(pb.Source("docs", r"usr/share/nothing/.+", "markup", "en", "MIT"), deb)
    linked = _deb(tmp_path / "linked", {"usr/share/help/C/guide/a.page": page.format("T", "x")})
    with pytest.raises(BabelError, match="has no usr/share/doc/docs/copyright"):
        pb.read_source(source, linked)
    assert pb.read_source(dataclasses.replace(source, copyright="docs-common"), linked)[1] == b""


# ------------------------------------------------------------------------------------------ shards and reader


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE like the zoo's (its trainer), on synthetic text."""
    from babel_lib.sparsing.zoo.data import train_tokenizer

    return train_tokenizer([f"Page {i} text. Second paragraph {i}." for i in range(200)], 300)


def _manifest(folder, entries):
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "shards": entries}))


def test_write_shards_splits_orders_and_round_trips(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setattr(pb, "SHARD_TOKENS", 2000)
    pages = [_page(f"doc/p{i}.html", f"Page {i} text. " * (5 + i % 7), f"Second paragraph {i}.") for i in range(400)]
    entries, tokens_of = pb.write_shards(pages, tokenizer.to_str(), tmp_path)
    eos = tokenizer.token_to_id("<eos>")
    _manifest(tmp_path, entries)
    assert {e["split"] for e in entries} == {"train", "heldout"} and sum(e["split"] == "train" for e in entries) > 1
    for split in ("train", "heldout"):
        expected = sorted((p for p in pages if pb.is_heldout(p.key) == (split == "heldout")), key=pb.page_order)
        ids = np.concatenate([[*tokenizer.encode(p.text).ids, eos] for p in expected]).astype(np.uint16)
        assert np.array_equal(load_tokens(tmp_path, split), ids)
        assert sum(tokens_of[k] for k in tokens_of if k[2] == split) == ids.size
    for entry in entries:  # each shard alone: whole pages, xz of uint16 LE, under the limit
        raw = lzma.decompress((tmp_path / entry["file"]).read_bytes())
        shard = np.frombuffer(raw, "<u2")
        assert shard.size == entry["tokens"] <= 2000 and shard[-1] == eos and (shard == eos).sum() == entry["documents"]
    assert pb.shard_bytes(np.arange(50)) == pb.shard_bytes(np.arange(50))  # deterministic


@pytest.fixture
def position_shards(tmp_path):
    """Three train shards and one held-out shard whose token ids are their positions (each id occurs once)."""
    entries, start = [], 0
    for name, split, size in (("train-000.u16.xz", "train", 1000), ("train-001.u16.xz", "train", 1500),
                              ("train-002.u16.xz", "train", 700), ("heldout-000.u16.xz", "heldout", 300)):
        data = pb.shard_bytes(np.arange(start, start + size))
        (tmp_path / name).write_bytes(data)
        entries.append({"file": name, "split": split, "tokens": size, "documents": 1,
                        "sha256": hashlib.sha256(data).hexdigest()})
        start += size
    _manifest(tmp_path, entries)
    return tmp_path


def test_one_epoch_never_reads_a_token_twice(position_shards):
    batches = list(iter_windows(position_shards, seq_len=33, batch_size=4, seed=7))
    windows = np.concatenate(batches)
    assert windows.dtype == np.int64 and windows.shape[1] == 33
    assert len(windows) == 4 * (window_count(position_shards, 33) // 4) == 4 * (3200 // 33 // 4)
    assert np.unique(windows).size == windows.size  # no position (token) in two windows, no window twice
    assert (np.diff(windows, axis=1) == 1).all() and (windows < 3200).all()  # contiguous training tokens only
    assert not np.array_equal(windows, np.sort(windows, axis=0))  # shuffled


def test_epoch_is_seeded_and_resumable(position_shards):
    full = list(iter_windows(position_shards, seq_len=16, batch_size=8, seed=1))
    assert all(np.array_equal(a, b) for a, b in zip(full, iter_windows(position_shards, 16, 8, seed=1)))
    resumed = list(iter_windows(position_shards, seq_len=16, batch_size=8, seed=1, skip_batches=5))
    assert len(resumed) == len(full) - 5 and all(np.array_equal(a, b) for a, b in zip(full[5:], resumed))
    with pytest.raises(BabelError, match="skip_batches"):
        next(iter_windows(position_shards, 16, 8, skip_batches=-1))
    with pytest.raises(BabelError, match="seq_len"):
        next(iter_windows(position_shards, 0, 8))
    other = np.concatenate(list(iter_windows(position_shards, 16, 8, seed=2)))
    assert set(np.concatenate(full)[:, 0]) == set(other[:, 0])


def test_a_subset_of_shards_reads_only_them(position_shards):
    (position_shards / "train-001.u16.xz").unlink()
    assert present_shards(position_shards) == ["train-000.u16.xz", "train-002.u16.xz"]
    tokens = load_tokens(position_shards, "train", shards=present_shards(position_shards))
    assert np.array_equal(tokens, np.r_[0:1000, 2500:3200])
    assert np.array_equal(load_tokens(position_shards, "heldout"), np.arange(3200, 3500))
    with pytest.raises(BabelError, match="missing"):
        load_tokens(position_shards, "train")
    with pytest.raises(BabelError, match="distinct train shards"):
        load_tokens(position_shards, "train", shards=["heldout-000.u16.xz"])


def test_corrupt_shard_or_manifest_is_a_clear_error(position_shards):
    path = position_shards / "train-002.u16.xz"
    data = bytearray(path.read_bytes())
    data[40] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(BabelError, match="does not match the sha256 in manifest.json"):
        load_tokens(position_shards, "train")
    manifest = json.loads((position_shards / MANIFEST).read_text())
    manifest["format"] = "uint32"
    (position_shards / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BabelError, match="make pretrain"):
        load_tokens(position_shards, "heldout")
    with pytest.raises(BabelError, match="make pretrain"):
        load_tokens(position_shards / "nowhere", "train")


# ------------------------------------------------------------------------------------------ committed provenance


def test_committed_provenance_records_every_source_with_version_sha256_licence_and_copyright():
    record = json.loads((pb.PROVENANCE_DIR / pb.PROVENANCE_FILE).read_text())
    packages = {p["package"]: p for p in record["packages"]}
    assert list(packages) == [s.package for s in pb.SOURCES] + list(pb.COPYRIGHT_ONLY)
    for package in packages.values():
        assert package["version"] and len(package["sha256"]) == 64 and package["licence"]
        assert (pb.PROVENANCE_DIR / package["copyright"]).read_text(encoding="utf-8", errors="replace").strip()
    manifest = record["manifest"]
    assert hashlib.sha256(pb.json_bytes(manifest)).hexdigest() == record["manifest_sha256"]
    assert all(e["bytes"] <= 55 * 2**20 for e in manifest["shards"])
    counted = sum(c.get(split, {}).get("tokens", 0) for c in record["counts"]["sources"].values()
                  for split in ("train", "heldout"))
    assert counted == sum(manifest["tokens"].values())
