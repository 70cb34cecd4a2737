"""Documentation files -> paragraphs of plain text, for the pretraining corpus: markup (HTML, XHTML, Mallard,
DocBook) and troff man pages, each by a small deterministic pure-Python reader (no groff, no lxml), so the same
.deb gives the same paragraphs on any machine."""

from __future__ import annotations

import gzip
import html
import re

# Markup elements whose text is not prose: scripts, styles, the HTML head, Mallard/DocBook metadata, navigation.
MARKUP_SKIPPED = frozenset({"script", "style", "head", "info", "nav", "noscript", "svg", "math", "template",
                            "credit", "license", "revision", "keywordset", "indexterm"})
# Elements that end a paragraph (HTML blocks, Mallard and DocBook blocks); all others are inline.
MARKUP_BLOCKS = frozenset({
    "p", "div", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "br", "hr",
    "table", "tr", "td", "th", "caption", "blockquote", "section", "article", "aside", "header", "footer",
    "figure", "figcaption", "body", "title", "page", "item", "desc", "list", "terms", "tree", "note", "screen",
    "synopsis", "listing", "example", "para", "simpara", "listitem", "entry", "term", "programlisting",
    "literallayout", "row", "refsect1", "refsect2", "sect1", "sect2", "sect3", "chapter", "appendix"})
# Elements whose text keeps its lines (code, terminal sessions); everything else has its whitespace collapsed.
MARKUP_VERBATIM = frozenset({"pre", "screen", "programlisting", "literallayout", "synopsis"})
VOID_TAGS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"})

# troff: requests that start a new paragraph, requests whose arguments are text, and escapes
MAN_BREAKS = frozenset({"SH", "SS", "PP", "LP", "P", "TP", "IP", "HP", "TQ", "RS", "RE", "sp", "br", "nf", "fi",
                        "EX", "EE", "Sh", "Ss", "Pp", "Bl", "El", "It", "Bd", "Ed", "TH", "Dd", "Dt", "Os"})
MAN_TEXT = frozenset({"SH", "SS", "B", "I", "R", "BI", "BR", "IB", "IR", "RB", "RI", "SM", "SB", "TP", "IP", "Nm",
                      "Nd", "Sh", "Ss", "It", "Fl", "Ar", "Cm", "Pa", "Xr", "Em", "Sy", "Dq", "Qq", "Sq", "Ql",
                      "Op", "Li", "Ev", "Fn", "Fa", "Ft", "Va", "Dv", "Er", "Ic", "Ad", "Ux"})
MAN_ALTERNATING = frozenset({"BI", "BR", "IB", "IR", "RB", "RI"})  # arguments are joined without spaces
MAN_TAGGED = frozenset({"IP", "TP"})  # only the first argument is text (the next is an indent)
_MAN_NAMED = {"em": "\u2014", "en": "\u2013", "hy": "-", "lq": "\u201c", "rq": "\u201d", "oq": "\u2018",
              "cq": "\u2019", "aq": "'", "dq": '"', "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122",
              "mu": "\u00d7", "di": "\u00f7", "+-": "\u00b1", "<=": "\u2264", ">=": "\u2265", "->": "\u2192",
              "<-": "\u2190", "aa": "\u00b4", "ga": "`", "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "ba": "|",
              "lB": "[", "rB": "]", "lC": "{", "rC": "}", "Fo": "\u00ab", "Fc": "\u00bb", "fo": "\u2039",
              "fc": "\u203a", "de": "\u00b0", "ss": "\u00df"}
_MAN_ESCAPE = re.compile(
    r"\\(?:\[(?P<bracket>[^\]]*)\]|\((?P<paren>..)|\*(?:\[[^\]]*\]|\(..|.)|f(?:\[[^\]]*\]|\(..|.)"
    r"|s[-+]?(?:\d+|\(\d\d|\[\d*\])|[hvwlLoDbxNRHSZXY]'[^']*'|[kgnm](?:\(..|\[[^\]]*\]|.)"
    r"|(?P<char>.))")
_MAN_CHAR = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "|": "", "^": "", "&": "", ")": "",
             "/": "", ",": "", "%": "", ":": "", "c": "", "'": "\u00b4", "`": "`", ".": ".", "t": " ", "a": ""}


def _collapse(text: str) -> str:
    """Whitespace runs -> one space, ends stripped."""
    return " ".join(text.split())


def _verbatim(text: str) -> str:
    """Code kept line by line: trailing spaces and blank leading/trailing lines removed, tabs as 4 spaces."""
    lines = [line.rstrip() for line in text.expandtabs(4).split("\n")]
    return "\n".join(lines).strip("\n")


# A comment, CDATA, doctype or processing instruction (no name), or a start/end tag: its slash and name.
_MARKUP_TOKEN = re.compile(r"<!--.*?-->|<!\[CDATA\[.*?\]\]>|<[!?][^>]*>"
                           r"|<(/?)([A-Za-z][^\s/>]*)(?:[^>\"']|\"[^\"]*\"|'[^']*')*>", re.DOTALL)


def markup_paragraphs(text: str) -> list[str]:
    """The paragraphs of an HTML/XML document: the text between block elements, inline tags dropped, entities
    decoded, skipped elements left out, whitespace collapsed except inside verbatim elements (a regular-expression
    scan: several times faster than html.parser on the gigabyte of documentation the corpus reads)."""
    paragraphs: list[str] = []
    pieces: list[str] = []
    skipped: list[str] = []  # open skipped elements (only the same tag nests)
    verbatim, position = 0, 0

    def flush() -> None:
        joined = html.unescape("".join(pieces))
        pieces.clear()
        paragraph = _verbatim(joined) if verbatim else _collapse(joined)
        if paragraph.strip():
            paragraphs.append(paragraph)

    for match in _MARKUP_TOKEN.finditer(text):
        if not skipped:
            pieces.append(text[position:match.start()])
        position = match.end()
        if match.group(2) is None:
            continue
        tag, closing, empty = match.group(2).lower(), match.group(1) == "/", match.group(0).endswith("/>")
        if skipped:
            if tag == skipped[-1] and closing:
                skipped.pop()
            elif tag == skipped[-1] and not empty:
                skipped.append(tag)
        elif tag in MARKUP_SKIPPED:
            if not closing and not empty and tag not in VOID_TAGS:
                skipped.append(tag)
        elif tag in MARKUP_BLOCKS:
            flush()
            if tag in MARKUP_VERBATIM and not empty:
                verbatim = max(verbatim - 1, 0) if closing else verbatim + 1
    if not skipped:
        pieces.append(text[position:])
    flush()
    return paragraphs


def _man_unescape(text: str) -> str:
    """troff escapes -> characters: named glyphs, \\- and \\e; font, size and spacing escapes removed."""
    def replace(match: re.Match) -> str:
        name = match.group("bracket") or match.group("paren")
        if name is not None:
            return _MAN_NAMED.get(name, "")
        char = match.group("char")
        return _MAN_CHAR.get(char, "") if char is not None else ""

    return _MAN_ESCAPE.sub(replace, text)


def _man_arguments(line: str) -> list[str]:
    """The arguments of a troff request line: split on spaces, a double-quoted argument may hold spaces."""
    return [quoted.replace('""', '"') or bare for quoted, bare in re.findall(r'"((?:[^"]|"")*)"?|(\S+)', line)]


def man_paragraphs(source: str) -> list[str]:
    """The paragraphs of a troff man page (man or mdoc macros): text lines and the text arguments of font and
    heading requests; comments, other requests and escapes dropped; .nf/.EX blocks keep their lines."""
    paragraphs: list[str] = []
    pieces: list[str] = []
    verbatim = False

    def flush() -> None:
        text = _verbatim("\n".join(pieces)) if verbatim else _collapse(" ".join(pieces))
        pieces.clear()
        if text.strip():
            paragraphs.append(text)

    for raw in source.replace("\r", "").split("\n"):
        if raw.startswith((".\\\"", "'\\\"", '\\"', ".\\#")) or raw.strip() in {".", "'"}:
            continue
        if raw.startswith((".", "'")):
            parts = raw[1:].strip().split(None, 1)
            if not parts:
                continue
            request, rest = parts[0], (parts[1] if len(parts) > 1 else "")
            if request in MAN_BREAKS:
                flush()
                if request in {"nf", "EX"}:
                    verbatim = True
                elif request in {"fi", "EE"}:
                    verbatim = False
            if request in MAN_TEXT and rest:
                args = [_man_unescape(a) for a in _man_arguments(rest)][:1 if request in MAN_TAGGED else None]
                pieces.append(("" if request in MAN_ALTERNATING else " ").join(args))
                if request in {"SH", "SS", "Sh", "Ss"}:
                    flush()
            continue
        pieces.append(_man_unescape(raw))
    flush()
    return paragraphs


READERS = {"markup": markup_paragraphs, "man": man_paragraphs}


def file_paragraphs(data: bytes, name: str, reader: str) -> list[str]:
    """The paragraphs of one file's bytes (gunzipped when the name ends in .gz; UTF-8 with replacement)."""
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    return READERS[reader](data.decode("utf-8", errors="replace"))
