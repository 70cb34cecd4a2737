"""Build the single-epoch pretraining corpus from Debian documentation packages (`make pretrain`).

    python -m babel_lib.data.pretrain_build                  # rebuild .tokens/pretrain/ from the recorded versions
    python -m babel_lib.data.pretrain_build --check          # rebuild into a temporary folder, compare bytes
    python -m babel_lib.data.pretrain_build --use-available  # build from the versions apt offers now, record them

Each source is one freely licensed Debian package (SOURCES): its files are read straight from the .deb
(`dpkg-deb --fsys-tarfile`, nothing installed), turned into paragraphs by doc_text, cleaned and deduplicated
(RULES), split into train and held-out by page, tokenised with the zoo's BPE and written as xz shards of uint16
ids (read them with babel_lib.data.pretrain). The provenance (package versions, sha256, licences, counts per
source and language, shard sha256) and each package's copyright file are committed under data/pretrain/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import multiprocessing
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from babel_lib.data.build import DEBS_DIR, Package, deb_filename, fetch, resolve_versions
from babel_lib.data.doc_text import file_paragraphs
from babel_lib.data.pretrain import FORMAT, MANIFEST, SPLITS, TOKENIZER, TOKENS_DIR
from babel_lib.errors import BabelError

PROVENANCE_DIR = Path(__file__).resolve().parents[2] / "data" / "pretrain"
PROVENANCE_FILE = "provenance.json"
COPYRIGHT_DIR = "copyright"
BUILD_COMMAND = "python -m babel_lib.data.pretrain_build"

# Lengths are in UTF-8 bytes, so that a CJK character (3 bytes) weighs about what its English gloss does.
MIN_PARAGRAPH_BYTES = 20  # shorter paragraphs (headings, labels, table cells, menu items) are dropped
MIN_LETTER_SHARE = 0.4  # of a paragraph's non-space characters; tables of numbers and ASCII art are dropped
MIN_DOCUMENT_BYTES = 200  # a page with less kept text is dropped
MIN_NEW_SHARE = 0.5  # a page whose kept characters are under this share of its candidates is a near-copy: dropped
HELDOUT_EVERY = 100  # a page is held out when the first 8 bytes of sha256(page key) are 0 mod 100: about 1 %
SHARD_TOKENS = 25_000_000  # 50 MB of uint16 before compression: a shard never exceeds 55 MiB, even incompressible
XZ_PRESET = 6
PARAGRAPH_SEPARATOR = "\n\n"
LIBREOFFICE_HELP = "usr/share/libreoffice/help/"
LANGUAGE_ALIASES = {"c": "en"}  # path language folders that name another code
REGIONAL = frozenset({"zh", "pt"})  # languages whose region stays in the code (zh-cn/zh-tw scripts, pt/pt-br)

RULES = (
    ("files: each source's files whose path inside the .deb matches its pattern, in sorted path order; "
    "symlinks and hard links skipped; .gz files gunzipped; UTF-8 with replacement characters"),
    ("paragraphs: markup (HTML/Mallard/DocBook) -> text of block elements, tags dropped, entities decoded, scripts, "
    "styles, heads and metadata dropped, whitespace collapsed except in pre/screen/programlisting (lines kept); "
    "man pages -> text lines and the text arguments of font/heading macros, escapes decoded, comments and other "
    "requests dropped"),
    (f"a paragraph is kept with at least {MIN_PARAGRAPH_BYTES} bytes of UTF-8, and at least {MIN_LETTER_SHARE:.0%} "
    "of the non-space ones are letters"),
    ("dedup: a paragraph whose normalised text (casefolded, digit runs as 0, whitespace removed) is in a page kept "
    "before it, or earlier in its own page, is dropped (boilerplate, navigation, repeated notices)"),
    (f"a page is kept when its kept text has at least {MIN_DOCUMENT_BYTES} bytes of UTF-8 and at least "
    f"{MIN_NEW_SHARE:.0%} of the bytes of its candidate paragraphs (else it is a near-copy of pages before "
    "it: another version, an untranslated page); sources are read in the recorded order"),
    ("language: the source's language, or the language folder of the path as a lower-case code (C = en; the region "
    "kept only for zh and pt: en-us = en, zh-tw and pt-br stay)"),
    "page key: the path with its language folder replaced by *, so translations of one page share a key",
    f"split by page key: held out when int.from_bytes(sha256(key)[:8], 'big') % {HELDOUT_EVERY} == 0, else train",
    ("LibreOffice help: pages held out by the LibreOffice corpus (data/libreoffice-help) are dropped in every "
    "language, so the zoo's held-out evaluation there stays unseen"),
    "order: pages of a split sorted by sha256(package/path) (a fixed shuffle: any prefix mixes every source)",
    (f"tokens: a page's paragraphs joined by a blank line, encoded with the zoo tokenizer, then <eos>; shards cut at "
    f"page boundaries before {SHARD_TOKENS:,} tokens, uint16 little endian, xz preset {XZ_PRESET}"),
)


@dataclass(frozen=True)
class Source:
    """One Debian package and how to read it: file pattern (a `lang` group names the language folder), doc_text
    reader (markup or man), the language when the path does not say it, its licence, and the package whose
    copyright file covers it when its own doc folder is a link there ("" = its own)."""

    package: str
    pattern: str
    reader: str
    language: str
    licence: str
    copyright: str = ""


def _lo(code: str) -> Source:
    return Source(f"libreoffice-help-{code}", r"usr/share/libreoffice/help/(?P<lang>[^/]+)/.+\.html", "markup",
                  "", "MPL-2.0 (parts Apache-2.0)")


def _man(code: str) -> Source:
    return Source(f"manpages-{code}", r"usr/share/man/(?P<lang>[^/]+)/man\d[^/]*/[^/]+\.gz", "man", "",
                  "GPL-2+/GPL-3+/BSD/MIT/Verbatim (manpages-l10n, per page: see copyright)")


def _gimp(code: str) -> Source:
    return Source(f"gimp-help-{code}", r"usr/share/gimp/2\.0/help/(?P<lang>[^/]+)/.+\.html", "markup", "",
                  "GFDL-1.2+ without invariant sections", "gimp-help-common")


def _debref(code: str) -> Source:
    return Source(f"debian-reference-{code}", r"usr/share/debian-reference/[^/]+\.(?P<lang>[^./]+)\.html",
                  "markup", "", "GPL-2+")


LO_LANGUAGES = ("en-us", "de", "fr", "es", "ru", "pl", "el", "fi", "et", "hu", "eu", "tr", "ja", "ko", "zh-cn", "vi",
                "id", "ca", "cs", "da", "gl", "hi", "it", "nl", "pt", "pt-br", "sl", "sv", "zh-tw")
MAN_LANGUAGES = ("cs", "da", "de", "el", "es", "fi", "fr", "hu", "id", "it", "ja", "mk", "nb", "nl", "pl", "pt-br",
                 "ro", "ru", "sr", "sv", "tr", "uk", "vi", "zh")
GIMP_LANGUAGES = ("en", "de", "fr", "es", "it", "ja", "ko", "ru", "zh-cn", "pt-br", "nl", "sv", "ca", "cs", "el",
                  "fi", "hu", "uk")
DEBREF_LANGUAGES = ("en", "de", "es", "fr", "id", "it", "ja", "pt", "pt-br", "zh-cn", "zh-tw")
MAN_DEV_LANGUAGES = ("cs", "da", "de", "es", "fr", "it", "ja", "nl", "pl", "pt-br", "ru", "uk")
DEVREF_LANGUAGES = ("de", "fr", "it", "ja", "ru")
KICAD_LANGUAGES = ("en", "de", "es", "fr", "it", "ja", "pl", "ru", "zh")
COPYRIGHT_ONLY = ("gimp-help-common",)  # fetched only for the copyright file that gimp-help-<lang> link to

SOURCES: tuple[Source, ...] = (
    Source("python3.11-doc", r"usr/share/doc/python3\.11/html/(?!_sources/|genindex|py-modindex).+\.html", "markup",
           "en", "PSF-2.0"),
    Source("linux-doc-6.1", r"usr/share/doc/linux-doc-6\.1/html/(?!_sources/|genindex).+\.html", "markup", "en",
           "GPL-2"),
    Source("postgresql-doc-15", r"usr/share/doc/postgresql-doc-15/html/.+\.html", "markup", "en", "PostgreSQL"),
    Source("git-doc", r"usr/share/doc/git-doc/.+\.html", "markup", "en", "GPL-2"),
    Source("python-django-doc", r"usr/share/doc/python-django-doc/html/(?!_sources/|genindex).+\.html", "markup",
           "en", "BSD-3-clause"),
    Source("python-scipy-doc", r"usr/share/doc/python-scipy-doc/html/(?!_sources/|genindex).+\.html", "markup",
           "en", "BSD-3-clause"),
    Source("python-pandas-doc", r"usr/share/doc/python-pandas-doc/html/(?!_sources/|genindex).+\.html", "markup",
           "en", "BSD-3-clause"),
    Source("nodejs-doc", r"usr/share/doc/nodejs/api/.+\.html", "markup", "en", "Expat"),
    Source("qtbase5-doc-html", r"usr/share/qt5/doc/.+\.html", "markup", "en", "GFDL-1.3 without invariant sections"),
    Source("cppreference-doc-en-html", r"usr/share/cppreference/doc/html/en/.+\.html", "markup", "en", "CC-BY-SA-3.0"),
    Source("openjdk-17-doc", r"usr/share/doc/openjdk-17-jre-headless/api/(?!.*class-use/|index-files/).+\.html",
           "markup", "en", "GPL-2 with Classpath exception"),
    Source("rust-doc", r"usr/share/doc/rust-doc/html/.+\.html", "markup", "en", "MIT or Apache-2.0"),
    Source("debian-handbook", r"usr/share/doc/debian-handbook/html/(?P<lang>[^/]+)/.+\.html", "markup", "",
           "GPL-2+ or CC-BY-SA-3.0"),
    Source("installation-guide-amd64", r"usr/share/doc/installation-guide-amd64/(?P<lang>[^/]+)/.+\.html", "markup",
           "", "GPL-2"),
    Source("gnome-user-docs", r"usr/share/help/(?P<lang>[^/]+)/[^/]+/.+\.page", "markup", "", "CC-BY-SA-3.0"),
    Source("mate-user-guide", r"usr/share/help/(?P<lang>[^/]+)/[^/]+/.+\.xml", "markup", "", "GFDL-1.1+"),
    Source("lilypond-doc-html", r"usr/share/doc/lilypond/html/Documentation/(?!.*-big-page).+\.html", "markup",
           "en", "GFDL-1.3+ without invariant sections"),
    Source("erlang-doc", r"usr/share/doc/erlang-doc/.+\.html", "markup", "en", "Apache-2.0"),
    Source("apache2-doc", r"usr/share/doc/apache2-doc/manual/(?P<lang>[^/]+)/.+\.html", "markup", "", "Apache-2.0"),
    Source("sqlite3-doc", r"usr/share/doc/sqlite3/.+\.html", "markup", "en", "public domain"),
    Source("octave-doc", r"usr/share/doc/octave/.+\.html", "markup", "en", "GPL-3+"),
    Source("libboost1.74-doc", r"usr/share/doc/libboost1\.74-doc/doc/html/.+\.html", "markup", "en", "BSL-1.0"),
    Source("qtdeclarative5-doc-html", r"usr/share/qt5/doc/.+\.html", "markup", "en",
           "GFDL-1.3 without invariant sections"),
    Source("qttools5-doc-html", r"usr/share/qt5/doc/.+\.html", "markup", "en", "GFDL-1.3 without invariant sections"),
    Source("vim-doc", r"usr/share/doc/vim/html/.+\.html", "markup", "en", "Vim (parts OPL-1+ without options)"),
    Source("maxima-doc", r"usr/share/doc/maxima-doc/html/.+\.html", "markup", "en", "GPL-2 (Maxima)"),
    Source("sphinx-doc", r"usr/share/doc/sphinx-doc/html/(?!_modules/|_sources/|genindex).+\.html", "markup", "en",
           "BSD-2-clause"),
    Source("python-sklearn-doc", r"usr/share/doc/python-sklearn-doc/html/(?!_modules/|_sources/|genindex).+\.html",
           "markup", "en", "BSD-3-clause"),
    Source("gnome-devel-docs", r"usr/share/help/(?P<lang>[^/]+)/[^/]+/.+\.page", "markup", "",
           "CC-BY-SA-3.0/4.0, parts GFDL-1.1+ without invariant sections"),
    Source("developers-reference", r"usr/share/developers-reference/[^/]+\.html", "markup", "en", "GPL-2"),
    *(Source(f"developers-reference-{code}", r"usr/share/developers-reference/(?P<lang>[^/]+)/[^/]+\.html",
             "markup", "", "GPL-2") for code in DEVREF_LANGUAGES),
    Source("debmake-doc", r"usr/share/doc/debmake-doc/html/[^/]+\.(?P<lang>[a-z]{2}(?:-[a-z]{2})?)\.html", "markup",
           "", "Expat (MIT)"),
    Source("manpages", r"usr/share/man/man\d[^/]*/[^/]+\.gz", "man", "en", "Verbatim/GPL-2+/BSD (see copyright)"),
    Source("manpages-dev", r"usr/share/man/man\d[^/]*/[^/]+\.gz", "man", "en", "Verbatim/GPL-2+/BSD (see copyright)",
           "manpages"),
    *(_man(code) for code in MAN_LANGUAGES),
    *(_man(f"{code}-dev") for code in MAN_DEV_LANGUAGES),
    *(_debref(code) for code in DEBREF_LANGUAGES),
    *(_lo(code) for code in LO_LANGUAGES),
    *(_gimp(code) for code in GIMP_LANGUAGES),
    *(Source(f"kicad-doc-{code}", r"usr/share/doc/kicad/help/(?P<lang>[^/]+)/[^/]+\.html", "markup", "",
             "GPL-3+ or CC-BY-3.0+") for code in KICAD_LANGUAGES),
)


@dataclass
class Page:
    """One file of a source: where it came from, its language, split key and cleaned paragraphs."""

    package: str
    path: str
    language: str
    key: str
    paragraphs: list[str]

    @property
    def text(self) -> str:
        return PARAGRAPH_SEPARATOR.join(self.paragraphs)


# ------------------------------------------------------------------------------------------ rules


def language_code(folder: str) -> str:
    """A path's language folder as a babel-style code: lower case, '-' for '_', aliases applied (C = en)."""
    code = folder.lower().replace("_", "-").split(".")[0].split("@")[0]
    language = code.split("-")[0]
    return LANGUAGE_ALIASES.get(code, code if language in REGIONAL else language)


def page_identity(source: Source, match: re.Match) -> tuple[str, str]:
    """(language, page key) of a matched path: the key replaces the language folder by *."""
    if "lang" not in match.re.groupindex:
        return source.language, match.string
    start, end = match.span("lang")
    return language_code(match.group("lang")), match.string[:start] + "*" + match.string[end:]


def is_heldout(key: str) -> bool:
    """Whether a page key is in the held-out split (a fixed hash rule)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % HELDOUT_EVERY == 0


def libreoffice_heldout(path: str) -> bool:
    """Whether a LibreOffice help file is a page the LibreOffice corpus holds out (its rule on the page path)."""
    from babel_lib.data.alignment import HELDOUT_EVERY as LO_EVERY

    page = path.removeprefix(LIBREOFFICE_HELP).split("/", 1)[1]  # <locale>/<page path>
    return int.from_bytes(hashlib.sha256(page.encode("utf-8")).digest()[:8], "big") % LO_EVERY == 0


def normalised(paragraph: str) -> bytes:
    """The dedup key of a paragraph: 8 bytes of sha256 of its casefolded text, digit runs as 0, whitespace removed."""
    text = re.sub(r"\d+", "0", "".join(paragraph.casefold().split()))
    return hashlib.sha256(text.encode("utf-8")).digest()[:8]


def _size(text: str) -> int:
    """The UTF-8 length of a text."""
    return len(text.encode("utf-8"))


def is_prose(paragraph: str) -> bool:
    """Whether a paragraph is long enough and mostly letters (MIN_PARAGRAPH_BYTES, MIN_LETTER_SHARE)."""
    if _size(paragraph) < MIN_PARAGRAPH_BYTES:
        return False
    visible = [char for char in paragraph if not char.isspace()]
    return sum(unicodedata.category(char).startswith("L") for char in visible) >= MIN_LETTER_SHARE * len(visible)


def clean_pages(pages: Iterator[Page], seen: set[bytes]) -> Iterator[Page]:
    """Apply the paragraph and page rules in order; `seen` holds the dedup keys of kept pages and grows."""
    for page in pages:
        candidates = [p for p in page.paragraphs if is_prose(p)]
        kept, keys, own = [], [], set()
        for paragraph in candidates:
            key = normalised(paragraph)
            if key not in seen and key not in own:
                own.add(key)
                kept.append(paragraph)
                keys.append(key)
        kept_size = sum(_size(p) for p in kept)
        if kept_size < MIN_DOCUMENT_BYTES or kept_size < MIN_NEW_SHARE * sum(_size(p) for p in candidates):
            continue
        seen.update(keys)
        yield Page(page.package, page.path, page.language, page.key, kept)


# ------------------------------------------------------------------------------------------ .deb -> pages


def _deb_members(deb: Path) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """The regular files of a .deb's data archive, streamed (`dpkg-deb --fsys-tarfile`)."""
    try:
        process = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise BabelError("dpkg-deb not found: `make pretrain` needs Debian's dpkg "
                         "(training needs only the shards)") from None
    with tarfile.open(fileobj=process.stdout, mode="r|") as archive:
        for member in archive:
            if member.isfile():
                yield archive, member
    if process.wait() != 0:
        raise BabelError(f"dpkg-deb could not read {deb} ({process.stderr.read().decode()[-200:].strip()}); "
                         "delete it and rerun `make pretrain`")


def read_source(source: Source, deb: Path) -> tuple[list[Page], bytes]:
    """The pages of one source in sorted path order, and the package's copyright file (b"" when another
    package's covers it)."""
    pattern = re.compile(source.pattern)
    copyright_path = f"usr/share/doc/{source.copyright or source.package}/copyright"
    files, copyright_text = {}, b""
    for archive, member in _deb_members(deb):
        name = member.name.removeprefix("./")
        if name == copyright_path:
            copyright_text = archive.extractfile(member).read()
        elif pattern.fullmatch(name):
            files[name] = archive.extractfile(member).read()
    if not files:
        raise BabelError(f"{deb.name} has no file matching {source.pattern}; the package layout changed: "
                         "update its pattern in SOURCES")
    if not copyright_text and not source.copyright:
        raise BabelError(f"{deb.name} has no {copyright_path}; name the package holding it as the source's copyright")
    pages = []
    for name in sorted(files):
        if name.startswith(LIBREOFFICE_HELP) and libreoffice_heldout(name):
            continue
        language, key = page_identity(source, pattern.fullmatch(name))
        pages.append(Page(source.package, name, language, key, file_paragraphs(files[name], name, source.reader)))
    return pages, copyright_text


# ------------------------------------------------------------------------------------------ tokens


def zoo_tokenizer():
    """The zoo's BPE as `prepare --profile default` trains it: on the LibreOffice calibration split, all languages."""
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the BPE trainer gives the same merges on one thread
    from babel_lib.data.corpus import corpus_info, load_corpus
    from babel_lib.sparsing.zoo.data import train_tokenizer
    from babel_lib.sparsing.zoo.spec import spec_from_profile

    spec = spec_from_profile("default")
    codes = list(spec.languages or corpus_info()["languages"])
    table = load_corpus(codes, split="calibration", limit=spec.paragraphs)
    return train_tokenizer([text for code in codes for text in table[code]], spec.vocab_size)


def page_order(page: Page) -> str:
    """The fixed shuffle of pages within a split."""
    return hashlib.sha256(f"{page.package}/{page.path}".encode()).hexdigest()


def shard_bytes(ids: np.ndarray) -> bytes:
    """One shard's file content: uint16 little-endian ids, xz-compressed with a fixed preset."""
    return lzma.compress(ids.astype("<u2").tobytes(), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write data through a temporary file and a rename, so a reader never sees half a file."""
    temporary = path.with_name(path.name + ".partial")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def shard_cuts(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """[start, end) page ranges of consecutive shards: whole pages, each shard at most `limit` tokens."""
    cuts, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        if size > limit:
            raise BabelError(f"a page of {size:,} tokens exceeds the shard size {limit:,}; raise SHARD_TOKENS")
        if total + size > limit:
            cuts.append((start, index))
            start, total = index, 0
        total += size
    if start < len(sizes):
        cuts.append((start, len(sizes)))
    return cuts


_ENCODER = None  # the tokenizer of an encoding worker process


def _start_encoder(tokenizer_json: str) -> None:
    """Pool initializer: load the tokenizer once per worker."""
    global _ENCODER
    from tokenizers import Tokenizer

    _ENCODER = Tokenizer.from_str(tokenizer_json)


def _encode(texts: list[str]) -> list[np.ndarray]:
    """Each text's ids followed by <eos>, as uint16 (in a worker)."""
    eos = _ENCODER.token_to_id("<eos>")
    return [np.asarray([*encoding.ids, eos], dtype=np.uint16) for encoding in _ENCODER.encode_batch(texts)]


def encode_pages(pages: list[Page], tokenizer_json: str, workers: int = 2) -> list[np.ndarray]:
    """Each page's ids followed by <eos>, as uint16, in page order (`workers` processes; progress printed)."""
    chunks = [[page.text for page in pages[start:start + 1000]] for start in range(0, len(pages), 1000)]
    encoded: list[np.ndarray] = []
    with multiprocessing.get_context("fork").Pool(workers, _start_encoder, (tokenizer_json,)) as pool:
        for number, ids in enumerate(pool.imap(_encode, chunks)):
            encoded.extend(ids)
            if number % 20 == 19:
                print(f"  encoded {len(encoded):,} of {len(pages):,} pages", flush=True)
    return encoded


def write_shards(pages: list[Page], tokenizer_json: str, out: Path) -> tuple[list[dict], Counter]:
    """Split, order and tokenise the pages and write each split's shards into out; returns the manifest
    entries and the tokens per (package, language, split)."""
    entries, tokens_of = [], Counter()
    for split in SPLITS:
        ordered = sorted((p for p in pages if is_heldout(p.key) == (split == "heldout")), key=page_order)
        encoded = encode_pages(ordered, tokenizer_json)
        for page, ids in zip(ordered, encoded):
            tokens_of[page.package, page.language, split] += int(ids.size)
        for number, (start, end) in enumerate(shard_cuts([ids.size for ids in encoded], SHARD_TOKENS)):
            ids = np.concatenate(encoded[start:end])
            data = shard_bytes(ids)
            name = f"{split}-{number:03d}.u16.xz"
            _write_atomically(out / name, data)
            entries.append({"file": name, "split": split, "tokens": int(ids.size), "documents": end - start,
                            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            print(f"  {name}: {ids.size:,} tokens, {end - start:,} pages, {len(data) / 2**20:.1f} MiB", flush=True)
    return entries, tokens_of


# ------------------------------------------------------------------------------------------ provenance


def json_bytes(record: dict) -> bytes:
    """Deterministic JSON: sorted keys, one-space indent, UTF-8, final newline."""
    return (json.dumps(record, ensure_ascii=False, indent=1, sort_keys=True) + "\n").encode("utf-8")


def recorded_packages(directory: Path) -> list[Package]:
    """The packages of SOURCES, then COPYRIGHT_ONLY, with the versions and sha256 recorded in provenance.json
    (empty when new)."""
    recorded = {}
    if (directory / PROVENANCE_FILE).is_file():
        record = json.loads((directory / PROVENANCE_FILE).read_text(encoding="utf-8"))
        names = [field.name for field in fields(Package)]
        recorded = {p["package"]: Package(**{name: p[name] for name in names}) for p in record.get("packages", [])}
    wanted = [(s.language or "multi", s.package) for s in SOURCES] + [("", name) for name in COPYRIGHT_ONLY]
    return [recorded.get(name, Package(language, name, "", "", "")) for language, name in wanted]


def newest_versions(packages: list[Package]) -> list[Package]:
    """Packages without a recorded version get the newest apt offers (one `apt-cache madison` call for all)."""
    names = [package.package for package in packages if not package.version]
    newest: dict[str, str] = {}
    if names:
        try:
            lines = subprocess.run(["apt-cache", "madison", *names], check=True, capture_output=True, text=True).stdout
        except (FileNotFoundError, subprocess.CalledProcessError):
            return packages  # resolve_versions asks package by package and reports what is wrong
        for line in lines.splitlines():
            fields_ = [field.strip() for field in line.split("|")]
            if len(fields_) >= 3:
                newest.setdefault(fields_[0], fields_[1])
    return [replace(p, version=newest[p.package], deb=deb_filename(p.package, newest[p.package]))
            if not p.version and p.package in newest else p for p in packages]


def counts_table(pages: list[Page], tokens_of: Counter) -> dict:
    """Pages, characters and tokens per source and per language, each per split."""
    table = {group: defaultdict(lambda: defaultdict(Counter)) for group in ("sources", "languages")}
    for page in pages:
        split = "heldout" if is_heldout(page.key) else "train"
        for group, name in (("sources", page.package), ("languages", page.language)):
            table[group][name][split]["pages"] += 1
            table[group][name][split]["characters"] += len(page.text)
    for (package, language, split), tokens in tokens_of.items():
        table["sources"][package][split]["tokens"] += tokens
        table["languages"][language][split]["tokens"] += tokens
    return {group: {name: {split: dict(counts) for split, counts in splits.items()} for name, splits in rows.items()}
            for group, rows in table.items()}


def _read(job: tuple[Source, Path]) -> tuple[list[Page], bytes]:
    """read_source for a worker process."""
    return read_source(*job)


def copyright_file(package: str, deb: Path) -> bytes:
    """usr/share/doc/<package>/copyright from a .deb."""
    wanted = f"usr/share/doc/{package}/copyright"
    for archive, member in _deb_members(deb):
        if member.name.removeprefix("./") == wanted:
            return archive.extractfile(member).read()
    raise BabelError(f"{deb.name} has no {wanted}; the package layout changed")


def store_copyright(text: bytes, package: str, provenance_dir: Path, stored: dict[str, str]) -> str:
    """Write a copyright file once per distinct text (named after the first package that has it: a family of
    packages shares one), and return its path relative to the provenance folder; `stored` maps sha256 -> path."""
    digest = hashlib.sha256(text).hexdigest()
    if digest not in stored:
        stored[digest] = f"{COPYRIGHT_DIR}/{package}.txt"
        _write_atomically(provenance_dir / stored[digest], text)
    return stored[digest]


def build(packages: list[Package], debs: Path, out: Path, provenance_dir: Path, workers: int = 2) -> dict:
    """Fetch and read every source (`workers` processes unpack and parse; cleaning runs in order in this one),
    clean, split, tokenise and write shards, manifest, provenance and copyright files."""
    out.mkdir(parents=True, exist_ok=True)
    (provenance_dir / COPYRIGHT_DIR).mkdir(parents=True, exist_ok=True)
    fetched = [fetch(package, debs) for package in packages]
    pages, seen, raw, copyright_of, stored = [], set(), Counter(), {}, {}
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        jobs = [(source, debs / package.deb) for source, package in zip(SOURCES, fetched)]
        for source, package, (read, copyright_text) in zip(SOURCES, fetched, pool.imap(_read, jobs)):
            raw[source.package] = len(read)
            kept = list(clean_pages(iter(read), seen))
            pages.extend(kept)
            if copyright_text:
                copyright_of[source.package] = store_copyright(copyright_text, source.package, provenance_dir, stored)
            print(f"{source.package}={package.version}: {len(kept):,} of {len(read):,} pages kept, "
                  f"{sum(len(p.text) for p in kept) / 1e6:.1f}M characters", flush=True)
    for package in fetched[len(SOURCES):]:
        copyright_of[package.package] = store_copyright(copyright_file(package.package, debs / package.deb),
                                                        package.package, provenance_dir, stored)
    tokenizer = zoo_tokenizer()
    tokenizer_text = tokenizer.to_str()
    _write_atomically(out / TOKENIZER, tokenizer_text.encode("utf-8"))
    entries, tokens_of = write_shards(pages, tokenizer_text, out)
    manifest = {"format": FORMAT, "tokenizer": {"file": TOKENIZER, "vocab": tokenizer.get_vocab_size(),
                "eos_id": tokenizer.token_to_id("<eos>"),
                "sha256": hashlib.sha256(tokenizer_text.encode("utf-8")).hexdigest()},
                "shards": entries, "tokens": {split: sum(e["tokens"] for e in entries if e["split"] == split)
                                              for split in SPLITS},
                "documents": {split: sum(e["documents"] for e in entries if e["split"] == split) for split in SPLITS},
                "sources": sorted({page.package for page in pages}), "split_rule": RULES[-4]}
    manifest_bytes = json_bytes(manifest)
    _write_atomically(out / MANIFEST, manifest_bytes)
    licences = {s.package: s.licence for s in SOURCES} | {name: "(copyright file only)" for name in COPYRIGHT_ONLY}
    holders = {s.package: s.copyright or s.package for s in SOURCES}
    provenance = {
        "build_command": BUILD_COMMAND, "check_command": f"{BUILD_COMMAND} --check",
        "source": "Debian 12 (bookworm) main, binary documentation packages",
        "packages": [asdict(p) | {"licence": licences[p.package], "files_read": raw[p.package],
                                  "copyright": copyright_of[holders.get(p.package, p.package)]}
                     for p in fetched],
        "sources": [asdict(s) for s in SOURCES],
        "rules": list(RULES),
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(), "manifest": manifest,
        "counts": counts_table(pages, tokens_of),
    }
    _write_atomically(provenance_dir / PROVENANCE_FILE, json_bytes(provenance))
    return manifest


def check(packages: list[Package], debs: Path, shipped: Path, provenance_dir: Path) -> bool:
    """Rebuild into a temporary folder and compare every file byte for byte with the built one."""
    if not (shipped / MANIFEST).is_file():
        raise BabelError(f"no {shipped / MANIFEST} to check; build it with `make pretrain`")
    with tempfile.TemporaryDirectory(prefix="babel-pretrain-") as scratch:
        tokens, record = Path(scratch) / "tokens", Path(scratch) / "provenance"
        build(packages, debs, tokens, record)
        different = [path.name for path in sorted(tokens.iterdir())
                     if not (shipped / path.name).is_file() or (shipped / path.name).read_bytes() != path.read_bytes()]
        for path in sorted(record.rglob("*")):
            committed = provenance_dir / path.relative_to(record)
            if path.is_file() and (not committed.is_file() or committed.read_bytes() != path.read_bytes()):
                different.append(str(path.relative_to(record)))
    print("identical: the shards and provenance rebuild byte for byte" if not different
          else f"DIFFERENT: {', '.join(different)}")
    return not different


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of `make pretrain` (build) and `make pretrain-check` (--check)."""
    parser = argparse.ArgumentParser(prog=BUILD_COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="rebuild into a temporary folder and compare bytes")
    parser.add_argument("--use-available", action="store_true", help="build from the versions apt has, recording them")
    parser.add_argument("--debs", type=Path, default=DEBS_DIR, help="folder of downloaded .deb files")
    parser.add_argument("--out", type=Path, default=TOKENS_DIR, help="folder of the shards and manifest")
    parser.add_argument("--provenance", type=Path, default=PROVENANCE_DIR, help="folder of the committed provenance")
    args = parser.parse_args(argv)
    if args.check and args.use_available:
        parser.error("--check compares against the recorded versions; it cannot be combined with --use-available")
    started = time.perf_counter()
    try:
        packages = recorded_packages(args.provenance)
        if args.use_available:
            packages = newest_versions(packages)
        packages = resolve_versions(packages, args.debs, args.use_available)
        if args.check:
            same = check(packages, args.debs, args.out, args.provenance)
            print(f"checked in {time.perf_counter() - started:.0f} s")
            return 0 if same else 1
        manifest = build(packages, args.debs, args.out, args.provenance)
    except BabelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {manifest['tokens']['train']:,} train and {manifest['tokens']['heldout']:,} held-out "
          f"tokens in {len(manifest['shards'])} shards, {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
