"""LibreOffice help page HTML -> paragraphs: the visible text of every p/h1-h6 element with an id, and its kind.

The kind says what the element is on the page (derived from its tag, class and enclosing containers), so that
per-language statistics can keep sentences and leave out headings, icon labels, menu paths and code.
"""

from __future__ import annotations

from collections import Counter
from html.parser import HTMLParser
from typing import NamedTuple

PARAGRAPH_TAGS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6"})
VOID_TAGS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"})
SKIPPED_TAGS = frozenset({"script", "style", "img"})

# Element kinds, in the order they are decided: the first rule that matches names the kind.
KIND_RULES = (
    ("heading", "an h1-h6 element"),
    ("code", "class code/codeintable/smathcode, or inside pre/code or a bascode/pycode/sqlcode container"),
    ("icon_table", "inside an icontable/iconcell container (the text next to a toolbar icon: a label or a sentence)"),
    ("menu_path", "inside a howtoget container (\"Choose Format - Character\")"),
    ("note", "inside a note/warning/tip container"),
    ("list_item", "inside li, or class listitem/ol_item/ul_item/listitemintable/ilistitem"),
    ("table_cell", "inside table/td/th, or a class ending in 'intable'"),
    ("paragraph", "any other p element"),
)
KINDS = tuple(kind for kind, _ in KIND_RULES)
_CODE_CLASSES = frozenset({"code", "codeintable", "smathcode"})
_CODE_CONTAINERS = frozenset({"bascode", "pycode", "sqlcode"})
_ICON_CONTAINERS = frozenset({"icontable", "iconcell"})
_NOTE_CONTAINERS = frozenset({"note", "warning", "tip"})
_LIST_CLASSES = frozenset({"listitem", "ol_item", "ul_item", "listitemintable", "ilistitem"})


class Paragraph(NamedTuple):
    """One paragraph of a help page: its cleaned text and its element kind (one of KINDS)."""

    text: str
    kind: str


class _Element:
    """A parsed HTML element: tag, attributes and children (elements and text)."""

    __slots__ = ("tag", "attrs", "children")

    def __init__(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tag, self.attrs, self.children = tag, {k: v or "" for k, v in attrs}, []

    @property
    def classes(self) -> set[str]:
        """The element's class names."""
        return set(self.attrs.get("class", "").split())


class _TreeBuilder(HTMLParser):
    """Builds an element tree; entities are decoded, void tags get no children, stray end tags are ignored."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = _Element("#root", [])
        self._open = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = _Element(tag, attrs)
        self._open[-1].children.append(element)
        if tag not in VOID_TAGS:
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self._open) - 1, 0, -1):
            if self._open[depth].tag == tag:
                del self._open[depth:]
                return

    def handle_data(self, data: str) -> None:
        self._open[-1].children.append(data)


def _switch_case(switch: _Element) -> list[_Element]:
    """The case a switchinline shows by default (the `default...` one, else the first); the others are hidden."""
    cases = [child for child in switch.children if isinstance(child, _Element)]
    default = [case for case in cases if case.attrs.get("id", "").startswith("default")]
    return (default or cases)[:1]


def _collect_text(element: _Element, pieces: list[str]) -> None:
    """Append the visible text of an element's children to pieces (inline tags -> their text)."""
    for child in element.children:
        if isinstance(child, str):
            pieces.append(child)
        elif child.tag == "br":
            pieces.append(" ")
        elif "switchinline" in child.classes:
            for case in _switch_case(child):
                _collect_text(case, pieces)
        elif child.tag not in SKIPPED_TAGS:
            _collect_text(child, pieces)


def clean_text(element: _Element) -> str:
    """The cleaned text of one paragraph element: visible text with whitespace collapsed."""
    pieces: list[str] = []
    _collect_text(element, pieces)
    return " ".join("".join(pieces).split())


def element_kind(element: _Element, ancestors: list[_Element]) -> str:
    """The kind of a paragraph element (KIND_RULES): from its tag, its classes and its enclosing elements."""
    tags = {ancestor.tag for ancestor in ancestors}
    containers = set().union(*(ancestor.classes for ancestor in ancestors))
    classes = element.classes
    if element.tag != "p":
        return "heading"
    if classes & _CODE_CLASSES or tags & {"pre", "code"} or containers & _CODE_CONTAINERS:
        return "code"
    if containers & _ICON_CONTAINERS:
        return "icon_table"
    if "howtoget" in containers:
        return "menu_path"
    if containers & _NOTE_CONTAINERS:
        return "note"
    if "li" in tags or classes & _LIST_CLASSES:
        return "list_item"
    if tags & {"table", "td", "th"} or any(name.endswith("intable") for name in classes):
        return "table_cell"
    return "paragraph"


def _paragraph_elements(element: _Element, ancestors: list[_Element], found: list[tuple[_Element, str]]) -> None:
    """Append (element, kind) for every p/h1-h6 element with an id below element (paragraphs do not nest)."""
    for child in element.children:
        if isinstance(child, _Element):
            if child.tag in PARAGRAPH_TAGS and child.attrs.get("id"):
                found.append((child, element_kind(child, ancestors)))
            else:
                _paragraph_elements(child, [*ancestors, child], found)


def page_paragraphs(html: str) -> dict[str, Paragraph]:
    """Paragraph id -> (cleaned text, kind) for one help page; ids that occur more than once are dropped."""
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    found: list[tuple[_Element, str]] = []
    _paragraph_elements(builder.root, [], found)
    counts = Counter(element.attrs["id"] for element, _ in found)
    return {element.attrs["id"]: Paragraph(clean_text(element), kind)
            for element, kind in found if counts[element.attrs["id"]] == 1}
