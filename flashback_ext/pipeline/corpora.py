"""Offline corpora besides CPython's documentation, and the license filter every corpus goes
through.

``gnu-manuals`` is the out-of-domain corpus: the GNU info manuals a Debian-family system ships in
``/usr/share/info`` (coreutils, grep, sed, find, gzip, wget, gnupg, gettext, bc, ...), one document
per info node. Manuals about command-line tools, written as prose with examples: another style of
text than the Python reference and docstrings the adapters are trained on. Cleaning: the info
headers, menus, tag tables and index nodes are dropped, and so are the license and copyright
notices (below).

License and copyright texts are families of near-duplicates (every GNU manual carries the same
GFDL notice and appendix; many modules the same BSD or MIT header): retrieval finds the twin of a
target's text in another document and every number that follows is flattered. So
:func:`drop_license_text` removes them from every corpus, at paragraph level (whole documents that
are licenses go entirely).
"""
from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

__all__ = ["gnu_manuals", "drop_license_text", "is_license_paragraph", "INFO_DIR",
           "LICENSE_PATTERNS"]

INFO_DIR = Path("/usr/share/info")
MIN_NODE_CHARS = 200

# a paragraph holding any of these is a license or copyright notice, not content
LICENSE_PATTERNS = re.compile("|".join([
    r"copyright\s*(?:\(c\)|©|\d{4})",
    r"permission is (?:hereby )?granted",
    r"free documentation license",
    r"general public license",
    r"lesser general public",
    r"redistribution and use in source and binary",
    r"licensed under the apache",
    r"provided [\"“']?as is[\"”']?",
    r"without (?:any )?warranty",
    r"invariant sections",
    r"front-cover texts?",
    r"back-cover texts?",
    r"free software foundation",
    r"python software foundation license",
    r"all rights reserved",
]), re.IGNORECASE)

# info nodes that are licenses, indexes or boilerplate, dropped whole
_SKIP_NODE = re.compile(r"copying|license|licence|index|gfdl|\bgpl\b|^top$|authors|"
                        r"reporting bugs|contributors", re.IGNORECASE)
_NODE_HEADER = re.compile(r"^File: ([^,]+),\s+Node: ([^,\n]+)")


def is_license_paragraph(paragraph: str) -> bool:
    """Whether ``paragraph`` is (part of) a license or copyright notice."""
    return bool(LICENSE_PATTERNS.search(" ".join(paragraph.split())))


def drop_license_text(docs: Iterable[tuple[str, str, str]],
                      min_chars: int = 200) -> list[tuple[str, str, str]]:
    """``docs`` without their license/copyright paragraphs: a document that had some and is left
    with fewer than ``min_chars`` characters is dropped; one that had none is kept as it is."""
    kept = []
    for doc_id, title, text in docs:
        paragraphs = re.split(r"\n\s*\n", text)
        clean = [p for p in paragraphs if not is_license_paragraph(p)]
        if len(clean) == len(paragraphs):
            kept.append((doc_id, title, text))
        elif len(joined := "\n\n".join(p for p in clean if p.strip())) >= min_chars:
            kept.append((doc_id, title, joined))
    return kept


def _info_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        return fh.read()


def _manual_files(folder: Path) -> dict[str, list[Path]]:
    """``{manual: [its files in order]}``: ``find.info.gz``, ``find.info-1.gz``, ..."""
    manuals: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.info*")):
        match = re.match(r"(.+?)\.info(?:-(\d+))?(?:\.gz)?$", path.name)
        if match:
            manuals.setdefault(match.group(1), []).append((int(match.group(2) or 0), path))
    return {name: [p for _, p in sorted(parts)] for name, parts in manuals.items()}


def _clean_node(body: str) -> str:
    """A node's text without its menu entries and its title underlines."""
    lines = []
    in_menu = False
    for line in body.splitlines():
        if line.startswith("* Menu:"):
            in_menu = True
            continue
        if in_menu:
            if line.startswith("* ") or line.startswith(" ") or not line.strip():
                continue
            in_menu = False
        if re.fullmatch(r"[*=\-.]{3,}", line.strip()):
            continue  # the line under a heading
        lines.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def gnu_manuals(folder: Optional[Path] = None,
                manuals: Optional[Sequence[str]] = None) -> list[tuple[str, str, str]]:
    """The GNU info manuals in ``folder`` (default ``/usr/share/info``) as ``(doc_id, title,
    text)`` documents, one per info node, license text removed. ``manuals`` picks some by name
    (``["sed", "grep"]``). Raises ``FileNotFoundError`` where the system has none."""
    folder = Path(folder or INFO_DIR)
    found = _manual_files(folder) if folder.is_dir() else {}
    if manuals is not None:
        found = {k: v for k, v in found.items() if k in set(manuals)}
    if not found:
        raise FileNotFoundError(f"no GNU info manuals in {folder} (the gnu-manuals corpus reads "
                                "the *.info.gz files a Debian/Ubuntu system installs there)")
    docs = []
    for name, paths in found.items():
        # file by file: each part of a split manual opens with its own preamble
        for chunk in (c for p in paths for c in _info_text(p).split("\x1f")):
            chunk = chunk.strip("\n")
            header = _NODE_HEADER.match(chunk)
            if header is None:
                continue  # the preamble, tag tables, indirect tables
            node = header.group(2).strip()
            if _SKIP_NODE.search(node):
                continue
            body = _clean_node(chunk.split("\n", 1)[1] if "\n" in chunk else "")
            if len(body) >= MIN_NODE_CHARS:  # shorter: a menu or a pointer, no text to model
                docs.append((f"info:{name}:{node}", f"{name}: {node}", body))
    return drop_license_text(docs)
