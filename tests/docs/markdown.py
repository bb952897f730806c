"""Read the fenced code blocks and links of the repository's markdown pages.

The convention (documented in ``docs/index.md``, section "Writing docs"): a fenced block
whose info string carries the word ``run`` is executed by ``test_commands.py``;
``norun`` says "shown, deliberately not executed" (long-running services, fragments of
a larger program). ``needs=redis,kafka,waku`` names real services the block uses.
Every shell or Python block must say one or the other, so nothing is skipped by
accident.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT

#: languages whose blocks must be marked ``run`` or ``norun``
EXECUTABLE_LANGUAGES = frozenset({"bash", "sh", "shell", "console", "python", "py"})
#: languages the runner knows how to execute
RUNNABLE_LANGUAGES = frozenset({"bash", "sh", "python"})
#: service name in ``needs=`` -> (variable in ``.services/env``, human name)
SERVICES = {
    "redis": ("PQCNET_REDIS_URL", "Redis"),
    "kafka": ("PQCNET_KAFKA_BOOTSTRAP", "Kafka"),
    "waku": ("PQCNET_WAKU_REST_URLS", "go-waku"),
    "nats": ("PQCNET_NATS_URL", "NATS JetStream"),
}
#: further ``.services/env`` variables a service's blocks get (when set)
SERVICE_EXTRAS = {"nats": ("PQCNET_NATS_CA", "PQCNET_NATS_CLI")}

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_EXPECT = re.compile(r"^<!--\s*expect:\s*(?P<text>.*?)\s*-->\s*$")
_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^(#{1,6})\s+(?P<title>.+?)\s*#*\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block."""

    path: Path
    line: int          # 1-based line of the opening fence
    language: str
    flags: frozenset[str]
    needs: tuple[str, ...]
    text: str
    #: ``<!-- expect: ... -->`` lines that follow the block
    expect: tuple[str, ...]

    @property
    def runnable(self) -> bool:
        return "run" in self.flags

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_pages() -> list[Path]:
    """Every user-facing markdown page the docs tests cover."""
    pages = [ROOT / name for name in ("README.md", "ARCHITECTURE.md", "CHANGELOG.md")]
    pages += sorted((ROOT / "docs").rglob("*.md"))
    pages += sorted((ROOT / "runbook").glob("*.md"))
    pages.append(ROOT / "benchmarks" / "README.md")
    return [p for p in pages if p.exists()]


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of one page, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, words = m.group("fence"), m.group("info").split()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence[0] * len(fence))
                                      and not lines[i].strip().strip(fence[0])):
            body.append(lines[i])
            i += 1
        i += 1  # closing fence
        expect: list[str] = []
        j = i
        while j < len(lines) and (not lines[j].strip() or _EXPECT.match(lines[j])):
            e = _EXPECT.match(lines[j])
            if e:
                expect.append(e.group("text"))
            j += 1
        language = words[0].lower() if words else ""
        flags = frozenset(w for w in words[1:] if "=" not in w)
        needs: tuple[str, ...] = ()
        for w in words[1:]:
            if w.startswith("needs="):
                needs = tuple(s for s in w[len("needs="):].split(",") if s)
        out.append(Block(path, start + 1, language, flags, needs, "\n".join(body),
                         tuple(expect)))
    return out


def slug(title: str) -> str:
    """GitHub's anchor for a heading."""
    title = re.sub(r"[`*_]", "", title.strip().lower())
    title = re.sub(r"[^\w\- ]", "", title)
    return title.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Anchors of a page's headings (outside code blocks)."""
    found: set[str] = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            in_code = not in_code
            continue
        m = _HEADING.match(line)
        if m and not in_code:
            found.add(slug(m.group("title")))
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every markdown link outside code blocks."""
    out: list[tuple[int, str]] = []
    in_code = False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if _FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        for m in _LINK.finditer(re.sub(r"`[^`]*`", "", line)):
            out.append((n, m.group("target")))
    return out
