"""Every relative link in README.md and docs/*.md points at a file or folder that exists.

Markdown links `[text](path)` and images `![alt](path)` are checked relative to the file that contains
them; web (http, https) and mailto links and pure `#anchor` links are skipped, and a `#anchor` suffix is
dropped from a path. Fenced code blocks and inline code are not Markdown, so links inside them are not
checked.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
SKIP = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//|#)", re.I)  # http:, https:, mailto:, other schemes, anchors


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link and image outside code."""
    def blank(m: re.Match) -> str:  # keep line numbers: replace code by as many newlines as it held
        return "\n" * m.group(0).count("\n")
    text = INLINE_CODE.sub(blank, FENCE.sub(blank, text))
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(text)]


def broken_links(path: Path) -> list[str]:
    out = []
    for line, target in links(path.read_text(encoding="utf-8")):
        if not target or SKIP.match(target):
            continue
        rel = target.split("#", 1)[0].split("?", 1)[0]
        if rel and not (path.parent / rel).exists():
            out.append(f"{path.relative_to(ROOT)}:{line}: {target}")
    return out


def test_link_extraction():
    text = """[a](docs/x.md) ![img](pic.png "title") [web](https://x.org/a) [mail](mailto:a@b.c)
[anchor](#top) [with anchor](y.md#part) `[in code](nope.md)` [nested [brackets]](z.md)
```
[in a fence](nope2.md)
```
[after](w.md)"""
    got = [t for _, t in links(text)]
    assert got == ["docs/x.md", "pic.png", "https://x.org/a", "mailto:a@b.c", "#top", "y.md#part", "z.md", "w.md"]
    assert [n for n, t in links(text) if t == "w.md"] == [6]
    assert [t for t in got if not SKIP.match(t)] == ["docs/x.md", "pic.png", "y.md#part", "z.md", "w.md"]


def test_relative_links_resolve():
    files = doc_files()
    assert (ROOT / "README.md").is_file() and len(files) > 1
    checked = sum(1 for f in files for _, t in links(f.read_text(encoding="utf-8")) if t and not SKIP.match(t))
    assert checked > 0, "no relative links found: the link pattern is broken"
    broken = [b for f in files for b in broken_links(f)]
    assert not broken, f"{len(broken)} broken relative link(s):\n" + "\n".join(broken)
