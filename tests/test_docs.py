"""The user documentation: every relative link resolves, the README stays short, and the docs speak about
the product only (no work-log vocabulary, no paths outside the repository)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
CARD = "MODEL_CARD.md"
CARDS = sorted((ROOT / "weights").glob(f"*/{CARD}"))

# [text](target) and ![alt](target); the target ends at whitespace or ")" (an optional "title" may follow)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|#)", re.I)  # http:, https:, mailto:, ... and #anchors

FORBIDDEN = [
    (re.compile(re.escape("../shared")), "a path outside the repository"),
    (re.compile(r"/work/"), "a path outside the repository"),
    (re.compile(r"DESIGN(?:-model)?\.md"), "a design note outside the repository"),
    (re.compile(r"Session "), "work-log vocabulary"),
    (re.compile(r"\b[Ss]ession \d"), "work-log vocabulary"),
    (re.compile(r"\b[Ss]essions? \d+\s*[–-]\s*\d+"), "work-log vocabulary"),
    (re.compile(r"\b[Ll]ent\b"), "an account of how compute was obtained"),
    (re.compile(r"\b[Ii]ssue \d"), "an issue number"),
    (re.compile(r"INTERFACES\.md"), "a removed document"),
]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def links(path: Path) -> list[str]:
    """Relative link targets of a Markdown file, outside code blocks and inline code."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    text = INLINE_CODE.sub("", text)
    return [t for t in LINK.findall(text) if not EXTERNAL.match(t)]


LINKING = [README, *DOCS, *CARDS]


def test_the_documents_exist():
    assert README.is_file()
    names = {p.name for p in DOCS}
    for name in ("API.md", "DEPLOY.md", "TRAINING.md", "PERFORMANCE.md", "ARCHITECTURE.md"):
        assert name in names, f"docs/{name} is missing"


@pytest.mark.parametrize("path", LINKING, ids=_rel)
def test_relative_links_resolve(path):
    broken = []
    for target in links(path):
        file_part = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if not file_part:
            continue
        resolved = path.parent / file_part
        if resolved.exists():
            continue
        if resolved.name == CARD and resolved.parent.parent.resolve() == (ROOT / "weights").resolve() \
                and (resolved.parent / "manifest.json").is_file():
            continue  # the card of a shipped model that has none yet: written beside its weights later
        broken.append(target)
    assert not broken, f"{_rel(path)} links to missing files: {broken}"


def test_link_parser_sees_links():
    # guards the regex: the README links the docs, and the docs link each other
    assert "docs/API.md" in links(README)
    assert any(t.startswith("weights/") for t in links(README))


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_keeps_the_models_table_markers():
    text = README.read_text(encoding="utf-8")
    start, end = text.find("<!-- models-table:start -->"), text.find("<!-- models-table:end -->")
    assert 0 <= start < end


@pytest.mark.parametrize("path", [README, *DOCS], ids=_rel)
def test_docs_speak_about_the_product_only(path):
    text = path.read_text(encoding="utf-8")
    found = []
    for pattern, why in FORBIDDEN:
        for m in pattern.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"line {line}: {m.group(0)!r} ({why})")
    assert not found, f"{_rel(path)}: " + "; ".join(found)


def test_forbidden_patterns_do_not_flag_ordinary_words():
    ordinary = "silently equivalent excellent sessions of work; a session-less client; issue a request"
    assert not any(p.search(ordinary) for p, _ in FORBIDDEN)
    assert any(p.search("Session 7") for p, _ in FORBIDDEN)
    assert any(p.search("session 12") for p, _ in FORBIDDEN)
    assert any(p.search("a GPU lent for 15 minutes") for p, _ in FORBIDDEN)
