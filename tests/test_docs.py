"""The documentation stays current: every module named in docs/ARCHITECTURE.md, a short README that
links every page of docs/, links that resolve, and the project speaking of itself only."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "exitwise"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 200
# Words that belong to the history of the work, not to the project (spelled so this file does not match).
FORBIDDEN = re.compile(r"this\s+session|issue\s+[0-9]+|METHODS\.md", re.IGNORECASE)
SCANNED = (README, DOCS, ROOT / "src", ROOT / "benchmarks", ROOT / "tests")


def layout_names() -> list[str]:
    """Every package (``engine/drafts/``) and module (``engine/llm.py``) under src/exitwise, as the path
    relative to it; a package's ``__init__.py`` is covered by the package, the top level's is named."""
    names = ["__init__.py"]
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if "__pycache__" in rel or rel == "__init__.py":
            continue
        if path.name == "__init__.py":
            names.append(rel.removesuffix("__init__.py"))
        else:
            names.append(rel)
    return names


def named(text: str, name: str) -> bool:
    return re.search(r"(?<![\w/.])" + re.escape(name) + r"(?![\w/])", text) is not None


def test_architecture_names_every_module():
    text = (DOCS / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [name for name in layout_names() if not named(text, name)]
    assert not missing, ("docs/ARCHITECTURE.md does not name these modules of src/exitwise; add one line each "
                         "to its Layout (path relative to src/exitwise, then one sentence): " + ", ".join(missing))


def test_architecture_names_no_module_that_is_gone():
    text = (DOCS / "ARCHITECTURE.md").read_text(encoding="utf-8")
    layout = text.split("## Layout", 1)[1].split("```", 2)[1]
    listed = [line.split()[0] for line in layout.splitlines() if line.strip()]
    gone = [name for name in listed if not (PACKAGE / name).exists()]
    assert not gone, "docs/ARCHITECTURE.md lists paths that are not under src/exitwise: " + ", ".join(gone)


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail into docs/"


def test_readme_links_every_doc():
    text = README.read_text(encoding="utf-8")
    unlinked = [p.name for p in sorted(DOCS.glob("*.md"))
                if not re.search(r"\]\(docs/" + re.escape(p.name) + r"(#[^)]*)?\)", text)]
    assert not unlinked, "README.md does not link these pages of docs/: " + ", ".join(unlinked)


def test_relative_links_resolve():
    broken = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, "links to files that do not exist: " + "; ".join(broken)


def test_project_words_only():
    hits = []
    for top in SCANNED:
        for path in [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()):
            if "__pycache__" in path.parts or any(part.endswith(".egg-info") for part in path.parts):
                continue  # build outputs, not the project's text
            data = path.read_bytes()
            if b"\0" in data:
                continue  # binary (PNG, safetensors)
            for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
                if FORBIDDEN.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, ("session talk, issue numbers or a file outside the repository cited (say what is so, "
                      "cite docs/papers.md for the methods):\n" + "\n".join(hits))
