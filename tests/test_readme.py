"""The README and the pages in docs/ stay true: their code runs, their links resolve, and the
commands and files they name exist.

``python`` blocks are executed (from the repository root, so relative paths such as
``configs/smoke.py`` work); ``python-norun`` blocks, for work too slow for a test, are compiled
only. Paths under ``mslora_jax/`` in the prose are not checked here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 300
SHELL_LANGS = {"bash", "sh", "shell", "console"}


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence


def _split(text: str) -> tuple[list[Block], str]:
    """The fenced code blocks of a Markdown text, and the text with them blanked out (line
    numbers kept), so that prose checks never read code."""
    blocks, prose, lines = [], [], text.split("\n")
    fence = None  # (marker, lang, start line, code lines) of the open block
    for number, line in enumerate(lines, 1):
        stripped = line.lstrip()
        if fence is None:
            match = re.match(r"(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if match:
                fence = (match.group(1), match.group(2), number, [])
                prose.append("")
            else:
                prose.append(line)
        elif stripped.startswith(fence[0]) and not stripped.strip(fence[0][0]).strip():
            blocks.append(Block(fence[1], "\n".join(fence[3]) + "\n", fence[2]))
            fence = None
            prose.append("")
        else:
            fence[3].append(line)
            prose.append("")
    assert fence is None, f"unclosed code block opened at line {fence[2]}"
    return blocks, "\n".join(prose)


def _inline_code(prose: str) -> list[tuple[str, int]]:
    """Inline code spans of the prose, with the line each starts on."""
    return [
        (m.group(2), prose.count("\n", 0, m.start()) + 1)
        for m in re.finditer(r"(`+)(.+?)\1", prose, re.S)
    ]


def _without_inline_code(prose: str) -> str:
    return re.sub(r"(`+)(.+?)\1", lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose, flags=re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    _, prose = _split(path.read_text())
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.M):
        slug, n = _slug(heading), 0
        while (slug if n == 0 else f"{slug}-{n}") in anchors:
            n += 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(path: Path) -> list[tuple[str, str, int]]:
    """(text, target, line) of every Markdown link and image in the prose of a page."""
    _, prose = _split(path.read_text())
    prose = _without_inline_code(prose)
    return [
        (m.group(1), m.group(2), prose.count("\n", 0, m.start()) + 1)
        for m in re.finditer(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
    ]


def _is_external(target: str) -> bool:
    return re.match(r"[a-z][a-z0-9+.-]*:", target) is not None  # http:, https:, mailto:, ...


def _resolve(page: Path, target: str) -> tuple[Path, str]:
    path, _, anchor = target.partition("#")
    return ((page.parent / path).resolve() if path else page), anchor


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_python_blocks_run(page, monkeypatch):
    monkeypatch.chdir(ROOT)
    blocks, _ = _split(page.read_text())
    for block in blocks:
        if block.lang not in ("python", "python-norun"):
            continue
        where = f"{_rel(page)}, python block at line {block.line}"
        code = compile(block.code, where, "exec")
        if block.lang == "python":
            try:
                exec(code, {"__name__": "__readme__"})
            except Exception as e:
                raise AssertionError(f"{where} fails: {type(e).__name__}: {e}") from e


def test_readme_has_a_running_example():
    blocks, _ = _split(README.read_text())
    assert any(b.lang == "python" for b in blocks), "README.md: no ```python block runs"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    broken = []
    for text, target, line in _links(page):
        if _is_external(target):
            continue
        path, anchor = _resolve(page, target)
        if not path.exists():
            broken.append(f"{_rel(page)}:{line}: [{text}]({target}): no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{_rel(page)}:{line}: [{text}]({target}): no heading #{anchor}")
    assert not broken, "\n".join(broken)


def test_readme_links_every_docs_page_and_each_links_back():
    assert DOCS, "no docs/*.md"
    linked = {_resolve(README, t)[0] for _, t, _ in _links(README) if not _is_external(t)}
    missing = [_rel(p) for p in DOCS if p not in linked]
    assert not missing, f"README.md does not link {', '.join(missing)}"
    no_way_back = [
        _rel(p) for p in DOCS if README not in {_resolve(p, t)[0] for _, t, _ in _links(p)}
    ]
    assert not no_way_back, f"no link back to README.md in {', '.join(no_way_back)}"


def _command_names() -> set[str]:
    from mslora_jax.cli.commands import COMMANDS
    from mslora_jax.cli.interop_commands import INTEROP_COMMANDS

    return {c.name for c in (*COMMANDS, *INTEROP_COMMANDS)}


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_commands_are_real(page):
    names = _command_names()
    blocks, prose = _split(page.read_text())
    snippets = [(b.code, b.line + 1) for b in blocks if b.lang in SHELL_LANGS]
    snippets += _inline_code(prose)
    wrong = []
    for code, first_line in snippets:
        for m in re.finditer(r"(?<![\w/-])mslora-jax[ \t]+([^\s\\`]+)", code):
            word = m.group(1)
            if word.startswith("-") or word in names:
                continue
            line = first_line + code.count("\n", 0, m.start())
            wrong.append(f"{_rel(page)}:{line}: `mslora-jax {word}`: no command {word!r}")
    assert not wrong, "\n".join(wrong) + f"\n(commands: {', '.join(sorted(names))})"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_files_exist(page):
    """configs/*.py, experiments/*.py and package paths (``mslora_jax/run/``, ``.../sweep.py``)."""
    text = page.read_text()
    named = r"(?<![\w./-])((?:configs|experiments|mslora_jax)/[\w/-]*(?:\.py\b|/|(?=[`)\s])))"
    missing = sorted(
        {
            f"{_rel(page)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(1)} does not exist"
            for m in re.finditer(named, text)
            if not (ROOT / m.group(1)).exists()
        }
    )
    assert not missing, "\n".join(missing)


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, at most {README_MAX_LINES}: move detail into docs/"
    )


def _table_after(text: str, title: str) -> list[str]:
    """The rows of the first Markdown table after the line ``title``."""
    lines = text.split("\n")
    start = lines.index(title) + 1
    while start < len(lines) and not lines[start].startswith("|"):
        start += 1
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return lines[start:end]


def test_readme_results_table_is_the_results_page_one():
    """The README's one results table is the first of docs/results.md; they must not drift."""
    title = "**Accuracy (%), n = 3 seeds**"
    readme = _table_after(README.read_text(), title)
    results = _table_after((ROOT / "docs" / "results.md").read_text(), title)
    assert readme, f"README.md: no table after {title}"
    assert readme == results, (
        "README.md's results table differs from the first one in docs/results.md:\n"
        + "\n".join(sorted(set(readme) ^ set(results)))
    )
