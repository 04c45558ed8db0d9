"""Sections of a generated Markdown document (docs/benchmarks.md), each written by its own run.

A section is the text between `<!-- NAME:start -->` and `<!-- NAME:end -->`. Writing one replaces
what is between its markers and keeps everything else in the file as it is; a section the file does
not have yet is appended at its end. So `make bench`, `make bench-bigimages` and `make fleet-bench`
each rewrite their own part of one page, in whatever order they run.
"""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(path: Path, name: str, text: str, title: str = "# Benchmarks") -> None:
    """Write `text` as section `name` of the Markdown file at `path` (created with `title` if missing)."""
    start, end = markers(name)
    if start in text or end in text:
        raise ValueError(f"section {name!r}: its text contains its own markers")
    block = f"{start}\n{text.strip(chr(10))}\n{end}"
    doc = path.read_text() if path.exists() else f"{title}\n"
    if start in doc:
        head, rest = doc.split(start, 1)
        if end not in rest:
            raise ValueError(f"{path}: section {name!r} has {start} but no {end}")
        doc = head + block + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(doc)


def section(path: Path, name: str) -> str | None:
    """The text of section `name` of the file at `path` (without its markers), or None if it has none."""
    start, end = markers(name)
    doc = path.read_text() if path.exists() else ""
    if start not in doc:
        return None
    return doc.split(start, 1)[1].split(end, 1)[0].strip("\n")
