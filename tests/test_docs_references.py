"""Every document reference in the code resolves to a heading, rule or matrix row in docs/.

Scans the .py files under qil_core/, nodes/, tests/ and bench/ for citations such as `model_spec §4.4`,
`model_spec.md §3.4-§3.8`, `robustness D7/L9`, `robustness L1-L6, L12`, `robustness.md rule 5`,
`robustness.md 2.12`, `performance.md`, `architecture.md`, a bare `(§4.2)` (read in the document the file cited
last, else model_spec.md), and for test names that carry a bad-input matrix row (`test_s13_...`,
`test_l3_l4_l6_...`, `..._c7`) or a model_spec §11 check (`test_spec_check_3_...`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SCANNED = ("qil_core", "nodes", "tests", "bench")

# Our own documents (by stem) that code may cite; any other `X.md` (README.md, ComfyUI's QUANTIZATION.md) is
# not ours to check. users.md and house_style.md are listed so that a citation of them fails: not shipped.
DOC_STEMS = ("model_spec", "robustness", "performance", "architecture", "psd", "users", "house_style")
# Stems that are specific enough to count as a citation without ".md" when a section, rule or row follows.
BARE_STEMS = ("model_spec", "robustness")
MATRIX_LETTERS = "LDTCS"  # L loading, D decompose, T transform/recolor, C composite, S save PSD

_ANCHOR = re.compile(r"\b(?P<stem>" + "|".join(DOC_STEMS) + r")(?P<md>\.md)?\b")
_SEP = re.compile(r"(?:\s*[,/(]\s*|\s+and\s+|\s*-\s*|\s+)")
_ITEM = re.compile(
    r"§\s*(?P<sec>\d+(?:\.\d+)*)(?:\s+check\s+(?P<check>\d+))?"
    r"|rule\s+(?P<rule>\d+)(?!\.?\d)"
    r"|section\s+(?P<section>\d+(?:\.\d+)*)"
    r"|(?P<rows>rows?)\b"
    rf"|(?P<id>[{MATRIX_LETTERS}]\d{{1,2}})(?:-(?P<id2>[{MATRIX_LETTERS}]?\d{{1,2}}))?(?![\w.])"
    r"|(?P<num>\d+(?:\.\d+)*)(?![\w.]|\.\d)"
)
_LINE_ID = re.compile(rf"(?<![\w-])([{MATRIX_LETTERS}])(\d{{1,2}})(?:-[{MATRIX_LETTERS}]?(\d{{1,2}}))?(?![\w.])")
_BARE_SECTION = re.compile(r"§\s*(\d+(?:\.\d+)*)")
_TEST_DEF = re.compile(r"^\s*(?:async\s+)?def\s+(test_\w+)\s*\(", re.MULTILINE)
_TEST_LEADING_IDS = re.compile(rf"^test_((?:[{MATRIX_LETTERS.lower()}]\d{{1,2}}_)+)")
_TEST_TRAILING_ID = re.compile(rf"_([{MATRIX_LETTERS.lower()}]\d{{1,2}})$")
_TEST_SPEC_CHECK = re.compile(r"(?:^|_)spec_check_(\d+)(?:_|$)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*\S)\s*$", re.MULTILINE)
_HEADING_NUMBER = re.compile(r"^(\d+(?:\.\d+)*)\.?(?=\s|$)")
_HEADING_RULE = re.compile(r"\bRule\s+(\d+)\b")
_TABLE_ID = re.compile(rf"^\|\s*([{MATRIX_LETTERS}]\d{{1,2}})\s*\|", re.MULTILINE)


@dataclass(frozen=True)
class Ref:
    """One citation: the document file and what in it (kind: file, section, check, rule or row)."""

    doc: str
    kind: str
    value: str
    where: str

    def describe(self) -> str:
        what = {
            "file": "",
            "section": f" §{self.value}",
            "check": f" §11 check {self.value}",
            "rule": f" rule {self.value}",
            "row": f" row {self.value}",
        }[self.kind]
        return f"{self.where}: {self.doc}{what}"


@dataclass
class DocIndex:
    """What a docs/ file offers to cite: numbered headings, PSD rules, matrix rows, §11 checks."""

    exists: bool
    sections: set[str]
    rules: set[str]
    rows: set[str]
    checks: set[str]


@cache
def doc_index(name: str) -> DocIndex:
    """Parse docs/<name> (an empty index when the file is missing)."""
    path = DOCS / name
    if not path.is_file():
        return DocIndex(False, set(), set(), set(), set())
    text = path.read_text(encoding="utf-8")
    sections: set[str] = set()
    rules: set[str] = set()
    headings = list(_HEADING.finditer(text))
    checks: set[str] = set()
    for i, m in enumerate(headings):
        title = m.group(2)
        num = _HEADING_NUMBER.match(title)
        if num:
            sections.add(num.group(1))
            if num.group(1) == "11":  # the numbered checks of model_spec §11
                end = headings[i + 1].start() if i + 1 < len(headings) else len(text)
                checks.update(re.findall(r"^(\d+)\.\s", text[m.end() : end], re.MULTILINE))
        rule = _HEADING_RULE.search(title)
        if rule:
            rules.add(rule.group(1))
    rows = set(_TABLE_ID.findall(text))
    return DocIndex(True, sections, rules, rows, checks)


def _expand(letter: str, first: int, last: int | None) -> list[str]:
    """Row IDs of one token: `L1` or the range `L1-L6`."""
    if last is None:
        return [f"{letter}{first}"]
    return [f"{letter}{k}" for k in range(first, last + 1)]


def parse_citations(text: str, where: str) -> list[Ref]:
    """Every document citation in `text` (one source file)."""
    refs: list[Ref] = []
    consumed: list[tuple[int, int]] = []
    for anchor in _ANCHOR.finditer(text):
        stem, md = anchor.group("stem"), anchor.group("md")
        doc = f"{stem}.md"
        line = f"{where}:{text.count(chr(10), 0, anchor.start()) + 1}"
        pos = anchor.end()
        items: list[Ref] = []
        while True:
            sep = _SEP.match(text, pos)
            start = sep.end() if sep else pos
            m = _ITEM.match(text, start)
            if not m or ((m.group("id") or m.group("num")) and stem != "robustness"):
                break  # row IDs and bare numbers ("robustness.md 2.12") only follow robustness
            if m.group("sec"):
                items.append(Ref(doc, "section", m.group("sec"), line))
                if m.group("check"):
                    items.append(Ref(doc, "check", m.group("check"), line))
            elif m.group("section") or m.group("num"):
                items.append(Ref(doc, "section", m.group("section") or m.group("num"), line))
            elif m.group("rule"):
                items.append(Ref(doc, "rule", m.group("rule"), line))
            elif m.group("id"):
                first = m.group("id")
                last = m.group("id2")
                end = int(last.lstrip(MATRIX_LETTERS)) if last else None
                items += [Ref(doc, "row", r, line) for r in _expand(first[0], int(first[1:]), end)]
            pos = m.end()
        if md is None and not items:
            continue  # a plain word ("robustness", "performance"), not a citation
        refs.append(Ref(doc, "file", "", line))
        refs += items
        consumed.append((anchor.start(), pos))
    # Row IDs elsewhere on a line that cites robustness: "rows L1-L12 of robustness.md", "(S3, S4)".
    for lineno, line_text in enumerate(text.splitlines(), 1):
        if "robustness" not in line_text:
            continue
        for m in _LINE_ID.finditer(line_text):
            end = int(m.group(3)) if m.group(3) else None
            refs += [
                Ref("robustness.md", "row", r, f"{where}:{lineno}") for r in _expand(m.group(1), int(m.group(2)), end)
            ]
    # Bare "§X.Y": in the document this file cited last before it, else model_spec.md. "paper §4.2" is not ours.
    for m in _BARE_SECTION.finditer(text):
        if any(a <= m.start() < b for a, b in consumed):
            continue
        before = text[: m.start()].rstrip()
        if before and (before[-1].isalnum() or before[-1] == "_"):
            continue  # "paper §4.2", "PAPER §3": another document's numbering
        cited = [a for a in _ANCHOR.finditer(text, 0, m.start()) if a.group("md") or a.group("stem") in BARE_STEMS]
        doc = f"{cited[-1].group('stem')}.md" if cited else "model_spec.md"
        line = f"{where}:{text.count(chr(10), 0, m.start()) + 1}"
        refs += [Ref(doc, "file", "", line), Ref(doc, "section", m.group(1), line)]
    return list(dict.fromkeys(refs))  # a row cited right after the name is also found by the line scan


def parse_test_names(text: str, where: str) -> list[Ref]:
    """Matrix rows and §11 checks carried by the test function names in `text`."""
    refs: list[Ref] = []
    for m in _TEST_DEF.finditer(text):
        name = m.group(1)
        line = f"{where}:{text.count(chr(10), 0, m.start()) + 1} {name}"
        ids: list[str] = []
        lead = _TEST_LEADING_IDS.match(name)
        if lead:
            ids += [t for t in lead.group(1).split("_") if t]
        trail = _TEST_TRAILING_ID.search(name)
        if trail and not (lead and trail.start() < lead.end()):
            ids.append(trail.group(1))
        refs += [Ref("robustness.md", "row", t.upper(), line) for t in ids]
        check = _TEST_SPEC_CHECK.search(name)
        if check:
            refs.append(Ref("model_spec.md", "check", check.group(1), line))
    return refs


def resolves(ref: Ref) -> bool:
    """True when the cited file exists and holds the cited section, rule, row or check."""
    idx = doc_index(ref.doc)
    if not idx.exists:
        return False
    if ref.kind == "file":
        return True
    if ref.kind == "section":
        return ref.value in idx.sections
    if ref.kind == "rule":  # PSD rule N is also heading 2.N
        return ref.value in idx.rules or f"2.{ref.value}" in idx.sections
    if ref.kind == "row":
        return ref.value in idx.rows
    return ref.value in idx.checks


def _sources() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


@cache
def all_refs() -> tuple[tuple[Ref, ...], tuple[Ref, ...]]:
    """(citations, test-name references) over every scanned file."""
    cites: list[Ref] = []
    names: list[Ref] = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT).as_posix()
        if rel == "tests/test_docs_references.py":
            continue  # this file's own examples are not citations
        cites += parse_citations(text, rel)
        if rel.startswith("tests/"):
            names += parse_test_names(text, rel)
    return tuple(cites), tuple(names)


def test_every_citation_in_the_code_resolves() -> None:
    cites, _ = all_refs()
    assert len(cites) >= 60, f"only {len(cites)} citations found: the scanner is broken"
    bad = [r.describe() for r in cites if not resolves(r)]
    assert not bad, "citations with no matching file, heading, rule or row in docs/:\n" + "\n".join(bad)


def test_every_matrix_row_in_a_test_name_resolves() -> None:
    _, names = all_refs()
    assert len(names) >= 40, f"only {len(names)} test names carry a row ID: the scanner is broken"
    bad = [r.describe() for r in names if not resolves(r)]
    assert not bad, "test names carrying a row or check that docs/ lacks:\n" + "\n".join(bad)


def test_docs_index_links_exist() -> None:
    text = (DOCS / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert {"model_spec.md", "robustness.md", "performance.md", "psd.md", "architecture.md"} <= set(links)
    missing = [link for link in links if not (DOCS / link).is_file()]
    assert not missing, f"docs/README.md links to missing files: {missing}"


def test_docs_cite_nothing_outside_the_repository() -> None:
    for path in DOCS.glob("*.md"):
        text = path.read_text(encoding="utf-8")
        outside = re.search(r"\.\.[/\\]shared|shared/docs", text)
        assert outside is None, f"{path.name} points outside the checkout: {outside.group(0) if outside else ''}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(model_spec §3.4-§3.8)", {("model_spec.md", "section", "3.4"), ("model_spec.md", "section", "3.8")}),
        (
            "model_spec.md §7, robustness §4.1).",
            {("model_spec.md", "section", "7"), ("robustness.md", "section", "4.1")},
        ),
        (
            "per model_spec §4.4 / §11 check 3,",
            {("model_spec.md", "section", "4.4"), ("model_spec.md", "section", "11"), ("model_spec.md", "check", "3")},
        ),
        ("(robustness D7/L9).", {("robustness.md", "row", "D7"), ("robustness.md", "row", "L9")}),
        ("(robustness L1-L3, L12)", {("robustness.md", "row", r) for r in ("L1", "L2", "L3", "L12")}),
        (
            "(robustness.md 2.12, 3.3, S3-S4)",
            {
                ("robustness.md", "section", "2.12"),
                ("robustness.md", "section", "3.3"),
                ("robustness.md", "row", "S3"),
                ("robustness.md", "row", "S4"),
            },
        ),
        ("(robustness.md rule 10).", {("robustness.md", "rule", "10")}),
        (
            "rows L1-L2 of robustness.md §4.1:",
            {("robustness.md", "row", "L1"), ("robustness.md", "row", "L2"), ("robustness.md", "section", "4.1")},
        ),
        ("follow performance.md: 86 KB", {("performance.md", "file", "")}),
        ("(performance.md 4.2 GB per megapixel)", {("performance.md", "file", "")}),
        ("(architecture.md); every", {("architecture.md", "file", "")}),
        ("trained with 20 layers (paper §4.2)", set()),
        ("a pitfall (§3.6): e^mu", {("model_spec.md", "section", "3.6")}),
        ("performance tuning and robustness in general", set()),
        ("see README.md and ComfyUI's QUANTIZATION.md", set()),
    ],
)
def test_citation_forms(text: str, expected: set[tuple[str, str, str]]) -> None:
    got = {(r.doc, r.kind, r.value) for r in parse_citations(text, "x.py")}
    assert got == expected | {(doc, "file", "") for doc, _, _ in expected}  # every citation also names its file


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("test_s13_nan_pixels_raise_and_leave_no_file", {"S13"}),
        ("test_l3_l4_l6_corrupt_files", {"L3", "L4", "L6"}),
        ("test_bad_scale_t1", {"T1"}),
        ("test_matches_psd_tools_compositor_within_2_of_255_c1", {"C1"}),
        ("test_spec_check_3_positions_640_n4", set()),
        ("test_h200_keeps_everything_resident", set()),
        ("test_source_over_partial_alpha_w3c", set()),
        ("test_decode_rows_s16", {"S16"}),
    ],
)
def test_test_name_forms(name: str, expected: set[str]) -> None:
    got = {r.value for r in parse_test_names(f"def {name}() -> None:\n", "t.py") if r.kind == "row"}
    assert got == expected
