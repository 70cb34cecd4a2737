"""Build the shipped parallel corpus from Debian's libreoffice-help-<lang> packages (`make data`).

    python -m babel_lib.data.build                  # rebuild data/libreoffice-help/ from the recorded versions
    python -m babel_lib.data.build --check          # rebuild into a temporary folder, compare bytes (exit 1 if not)
    python -m babel_lib.data.build --use-available  # build from the versions apt offers now and record them

Needs apt-get and dpkg (packages are fetched with `apt-get download` and unpacked with `dpkg -x`, nothing is
installed). The help pages ship pre-rendered as HTML; each paragraph keeps the stable id it has in the .xhp source.
HTML parsing and element kinds are in help_pages, the alignment and quality rules in alignment.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from babel_lib.data.alignment import HELDOUT_EVERY, NEAR_COPY_RATIO, REUSED_FOR, RULES, SOURCE, align, page_of
from babel_lib.data.corpus import CORPUS_DIR, CORPUS_FILE, PROVENANCE_FILE, SPLITS, read_provenance
from babel_lib.data.help_pages import KINDS, Paragraph, page_paragraphs
from babel_lib.data.languages import CORPUS_LANGUAGES
from babel_lib.errors import BabelError

DEBS_DIR = CORPUS_DIR.parent / "debs"
HELP_ROOT = Path("usr/share/libreoffice/help")
# babel code -> LibreOffice locale, where the two differ (the package name is the locale in lower case).
LIBREOFFICE_LOCALE = {"en": "en-US"}
XZ_PRESET = 9
BUILD_COMMAND = "python -m babel_lib.data.build"


@dataclass(frozen=True)
class Package:
    """One Debian package the corpus is built from: language, name, version, .deb sha256 and file name."""

    language: str
    package: str
    version: str
    sha256: str
    deb: str


def locale(code: str) -> str:
    """The LibreOffice locale (help folder name) of a babel language code."""
    return LIBREOFFICE_LOCALE.get(code, code)


def package_name(code: str) -> str:
    """The Debian package holding the help pages of one language."""
    return f"libreoffice-help-{locale(code).lower()}"


def deb_filename(package: str, version: str) -> str:
    """The file name `apt-get download package=version` writes (the epoch colon is URL-encoded)."""
    return f"{package}_{version.replace(':', '%3a')}_all.deb"


# ------------------------------------------------------------------------------------------ .deb -> paragraphs


def read_help(deb: Path, code: str) -> dict[str, Paragraph]:
    """`page path#paragraph id` -> (cleaned text, kind) for every help page in one language's .deb (via dpkg -x)."""
    with tempfile.TemporaryDirectory(prefix="babel-help-") as unpacked:
        _run(["dpkg", "-x", str(deb), unpacked])
        root = Path(unpacked) / HELP_ROOT / locale(code)
        pages = sorted(root.rglob("*.html"))
        if not pages:
            raise BabelError(f"{deb.name} has no help pages under {HELP_ROOT / locale(code)}; is it the right package?")
        paragraphs = {}
        for page in pages:
            path = page.relative_to(root).as_posix()
            for pid, paragraph in page_paragraphs(page.read_text(encoding="utf-8")).items():
                paragraphs[f"{path}#{pid}"] = paragraph
        return paragraphs


# ------------------------------------------------------------------------------------------ files


def corpus_bytes(rows: list[dict]) -> bytes:
    """The deterministic file content: sorted-key JSON lines, xz-compressed with a fixed preset."""
    lines = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n" for row in rows)
    return lzma.compress(lines.encode("utf-8"), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)


def provenance_bytes(packages: list[Package], data: bytes, rows: list[dict]) -> bytes:
    """The provenance record: exact package versions and sha256, corpus sha256 and counts, commands, rules."""
    counts = Counter(row["split"] for row in rows)
    pages = {split: len({page_of(row["segment_id"]) for row in rows if row["split"] == split}) for split in SPLITS}
    kinds = Counter((row["kind"], row["split"]) for row in rows)
    record = {
        "build_command": BUILD_COMMAND,
        "check_command": f"{BUILD_COMMAND} --check",
        "corpus": {
            "file": CORPUS_FILE,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "paragraphs": {split: counts[split] for split in SPLITS},
            "pages": pages,
            "kinds": {kind: {split: kinds[kind, split] for split in SPLITS} for kind in KINDS},
        },
        "quality": {"near_copy_ratio": NEAR_COPY_RATIO, "reused_for": REUSED_FOR, "heldout_every": HELDOUT_EVERY},
        "languages": [package.language for package in packages],
        "licence": "MPL-2.0, with parts under Apache-2.0 (LibreOffice help content and translations; see NOTICE)",
        "packages": [asdict(package) for package in packages],
        "rules": list(RULES),
        "source": "Debian 12 (bookworm) binary packages built from the source package libreoffice",
    }
    return (json.dumps(record, ensure_ascii=False, indent=1, sort_keys=True) + "\n").encode("utf-8")


def _write_atomically(path: Path, data: bytes) -> None:
    """Write data to path through a temporary file and a rename, so a reader never sees half a file."""
    temporary = path.with_name(path.name + ".partial")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def write_corpus(directory: Path, packages: list[Package], rows: list[dict]) -> Path:
    """Write the corpus and its provenance into directory; returns the corpus path."""
    directory.mkdir(parents=True, exist_ok=True)
    data = corpus_bytes(rows)
    _write_atomically(directory / CORPUS_FILE, data)
    _write_atomically(directory / PROVENANCE_FILE, provenance_bytes(packages, data, rows))
    return directory / CORPUS_FILE


# ------------------------------------------------------------------------------------------ apt


def _run(command: list[str], cwd: Path | None = None) -> str:
    """Run a Debian tool and return its stdout; a missing tool or a failure raises BabelError."""
    try:
        return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise BabelError(
            f"{command[0]} not found: `make data` needs Debian's apt-get and dpkg "
            "(`make figures` uses the shipped corpus and needs neither)"
        ) from None
    except subprocess.CalledProcessError as err:
        tail = " ".join(err.stderr.split())[-300:]
        raise BabelError(f"`{' '.join(command)}` failed ({tail}); try `apt-get update` first") from None


def available_versions(package: str) -> list[str]:
    """The versions of a package apt can download now, newest first (`apt-cache madison`)."""
    lines = _run(["apt-cache", "madison", package]).splitlines()
    versions = [line.split("|")[1].strip() for line in lines if line.count("|") >= 2]
    return list(dict.fromkeys(versions))


def recorded_packages(directory: Path) -> list[Package]:
    """The packages to build from: recorded versions where provenance has them, else an empty version."""
    recorded = {}
    if (directory / PROVENANCE_FILE).is_file():
        recorded = {p["language"]: Package(**p) for p in read_provenance(directory).get("packages", [])}
    empty = {code: Package(code, package_name(code), "", "", "") for code in CORPUS_LANGUAGES}
    return [recorded.get(code, empty[code]) for code in CORPUS_LANGUAGES]


def resolve_versions(packages: list[Package], debs: Path, use_available: bool) -> list[Package]:
    """Keep each recorded version that is in debs/ or downloadable; else report the difference and stop,
    or (use_available) switch to the newest version apt offers."""
    resolved, differences = [], []
    for package in packages:
        if package.version and (debs / package.deb).is_file():
            resolved.append(package)
            continue
        versions = available_versions(package.package)
        if package.version and package.version in versions:
            resolved.append(package)
            continue
        newest = versions[0] if versions else ""
        differences.append(f"  {package.package}: recorded {package.version or '(none)'}, apt has {newest or '(none)'}")
        resolved.append(Package(package.language, package.package, newest, "", deb_filename(package.package, newest)))
    if differences:
        print("Package versions that differ from the recorded ones:", *differences, sep="\n", file=sys.stderr)
    if differences and not use_available:
        raise BabelError(
            f"{len(differences)} packages cannot be fetched at their recorded version (listed above): put those "
            f".deb files in {debs} (e.g. from https://snapshot.debian.org/binary/<package>/) to rebuild the shipped "
            "corpus byte for byte, or pass --use-available to build from the versions apt has (the corpus will differ)"
        )
    missing = [package.package for package in resolved if not package.version]
    if missing:
        raise BabelError(f"apt has no version of {missing}; add Debian bookworm (main) to the apt sources")
    return resolved


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(package: Package, debs: Path) -> Package:
    """Make sure debs/ holds the package's .deb (apt-get download) and that its sha256 is the recorded one."""
    path = debs / package.deb
    if not path.is_file():
        debs.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", "download", f"{package.package}={package.version}"], cwd=debs)
        if not path.is_file():
            raise BabelError(f"apt-get download {package.package}={package.version} did not write {path}")
    digest = sha256_file(path)
    if package.sha256 and digest != package.sha256:
        raise BabelError(f"{path} has sha256 {digest}, not the recorded {package.sha256}; delete it, rerun `make data`")
    return replace(package, sha256=digest)


# ------------------------------------------------------------------------------------------ command line


def build(packages: list[Package], debs: Path, directory: Path) -> tuple[Path, list[dict]]:
    """Fetch, unpack, clean and align every language and write the corpus into directory."""
    fetched = [fetch(package, debs) for package in packages]
    texts, kinds = {}, {}
    for package in fetched:
        paragraphs = read_help(debs / package.deb, package.language)
        texts[package.language] = {key: paragraph.text for key, paragraph in paragraphs.items()}
        if package.language == SOURCE:
            kinds = {key: paragraph.kind for key, paragraph in paragraphs.items()}
        print(f"{package.language}: {len(paragraphs)} paragraphs from {package.package}={package.version}")
    rows = align(texts, kinds)
    return write_corpus(directory, fetched, rows), rows


def check(packages: list[Package], debs: Path, shipped: Path) -> bool:
    """Rebuild into a temporary folder and compare its bytes with the shipped corpus file."""
    if not (shipped / CORPUS_FILE).is_file():
        raise BabelError(f"no {shipped / CORPUS_FILE} to check; build it with `make data`")
    with tempfile.TemporaryDirectory(prefix="babel-corpus-") as scratch:
        rebuilt, _ = build(packages, debs, Path(scratch))
        same = rebuilt.read_bytes() == (shipped / CORPUS_FILE).read_bytes()
        print(f"shipped {sha256_file(shipped / CORPUS_FILE)}\nrebuilt {sha256_file(rebuilt)}")
    print("identical: the shipped corpus rebuilds byte for byte" if same else "DIFFERENT: the rebuild does not match")
    return same


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of `make data` (build) and `make data-check` (--check)."""
    parser = argparse.ArgumentParser(prog="python -m babel_lib.data.build", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="rebuild into a temporary folder and compare bytes")
    parser.add_argument("--use-available", action="store_true", help="build from the versions apt has, recording them")
    parser.add_argument("--debs", type=Path, default=DEBS_DIR, help="folder of downloaded .deb files")
    parser.add_argument("--out", type=Path, default=CORPUS_DIR, help="folder of the corpus and its provenance")
    args = parser.parse_args(argv)
    if args.check and args.use_available:
        parser.error("--check compares against the recorded versions; it cannot be combined with --use-available")
    started = time.perf_counter()
    try:
        packages = resolve_versions(recorded_packages(args.out), args.debs, args.use_available)
        if args.check:
            same = check(packages, args.debs, args.out)
            print(f"checked in {time.perf_counter() - started:.0f} s")
            return 0 if same else 1
        path, rows = build(packages, args.debs, args.out)
    except BabelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = Counter(row["split"] for row in rows)
    print(
        f"wrote {path} ({path.stat().st_size} bytes): {len(rows)} paragraphs x {len(packages)} languages "
        f"({', '.join(f'{split} {counts[split]}' for split in SPLITS)}) in {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
