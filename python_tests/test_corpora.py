"""The out-of-domain corpus (GNU info manuals) and the license filter every corpus goes through."""
import gzip
import re

import pytest

from flashback_ext.pipeline.corpora import (
    INFO_DIR,
    drop_license_text,
    gnu_manuals,
    is_license_paragraph,
)
from flashback_ext.pipeline.experiment import load_documents

GFDL = ("     Permission is granted to copy, distribute and/or modify this\n"
        "     document under the terms of the GNU Free Documentation License,\n"
        "     Version 1.3 or any later version.")


def _write_info(folder, name, nodes, parts=1):
    """A gzipped info manual in ``parts`` files: a preamble, then ``\\x1f``-separated nodes."""
    chunks = [f"This is {name}.info, produced by makeinfo.\n\n   Copyright (C) 2020 Someone.\n\n"
              f"{GFDL}\n"]
    for node, body in nodes:
        chunks.append(f"\x1f\nFile: {name}.info,  Node: {node},  Next: x,  Up: Top\n\n{body}\n")
    chunks.append("\x1f\nTag Table:\nNode: Top\x7f1\n\x1f\nEnd Tag Table\n")
    step = -(-len(chunks) // parts)
    for i in range(parts):
        suffix = "" if i == 0 else f"-{i}"
        with gzip.open(folder / f"{name}.info{suffix}.gz", "wt") as fh:
            fh.write("".join(chunks[i * step:(i + 1) * step]))


def test_info_manuals_become_clean_node_documents(tmp_path):
    usage = ("2 Invoking frob\n**************\n\nThe ‘frob’ command turns every input line "
             "around.  It reads standard input when no file is named, and writes the result "
             "to standard output, one line at a time.\n\n* Menu:\n\n* Options::   What it takes.\n"
             "* Exit status::  What it returns.\n\nAfter the menu comes more text about how "
             "frob treats empty lines and very long ones, which it keeps as they are.")
    _write_info(tmp_path, "frob", [
        ("Top", "frob\n****\n\nThis manual is for frob.\n\n" + GFDL),
        ("Invoking frob", usage),
        ("GNU Free Documentation License", "ADDENDUM\n\n" + GFDL + "\n" + "x " * 400),
        ("Concept Index", "* frob:  Invoking frob.   (line 6)\n" * 30),
        ("Tiny", "Too short."),
    ], parts=2)
    docs = gnu_manuals(tmp_path)
    assert [d[0] for d in docs] == ["info:frob:Invoking frob"]
    _, title, text = docs[0]
    assert title == "frob: Invoking frob"
    assert text.startswith("2 Invoking frob\n\nThe ‘frob’ command") and "**" not in text
    assert "* Menu:" not in text and "Options::" not in text  # the menu is navigation, not text
    assert text.endswith("which it keeps as they are.")
    assert gnu_manuals(tmp_path, manuals=["frob"]) == docs
    with pytest.raises(FileNotFoundError, match="no GNU info manuals"):
        gnu_manuals(tmp_path, manuals=["other"])
    with pytest.raises(FileNotFoundError, match="no GNU info manuals"):
        gnu_manuals(tmp_path / "missing")


def test_license_paragraphs_are_dropped_and_other_documents_kept_as_they_are():
    body = "A paragraph about streams.\n  \nAnother one, about buffers and how they fill."
    notice = "Copyright (c) 2001 Some Author.  All rights reserved."
    bsd = ("Redistribution and use in source and binary forms, with or without modification, "
           "are permitted provided that the following conditions are met")
    docs = [("a", "a", body), ("b", "b", body + "\n\n" + notice + "\n\n" + "More text. " * 30),
            ("c", "c", notice + "\n\n" + bsd), ("d", "d", "short\n\n" + notice)]
    kept = drop_license_text(docs)
    assert kept[0] == docs[0]  # nothing removed: byte for byte the same
    assert [d[0] for d in kept] == ["a", "b"]  # c was all license; d too short without it
    assert notice not in kept[1][2] and kept[1][2].startswith("A paragraph about streams.")
    for text in (notice, bsd, GFDL, "THE SOFTWARE IS PROVIDED \"AS IS\"", "GNU General Public "
                 "License", "Licensed under the Apache License, Version 2.0"):
        assert is_license_paragraph(text), text
    for text in ("The copy command copies files.", "Permission bits of the file are kept.",
                 "The license field of a package names its license."):
        assert not is_license_paragraph(text), text


def test_named_corpora_carry_no_license_text():
    docs = load_documents("python-docs")
    assert len(docs) > 150
    for _, _, text in docs:
        assert "Copyright (C) 2001-2019 Vinay Sajip" not in text
        assert not any(is_license_paragraph(p) for p in re.split(r"\n\s*\n", text))


@pytest.mark.skipif(not any(INFO_DIR.glob("*.info*")), reason="this system ships no info manuals")
def test_the_systems_gnu_manuals_are_a_real_corpus():
    docs = load_documents("gnu-manuals")
    manuals = {doc_id.split(":")[1] for doc_id, _, _ in docs}
    assert len(docs) > 300 and len(manuals) >= 5
    assert len({doc_id for doc_id, _, _ in docs}) == len(docs)
    for _, _, text in docs:
        assert "Free Documentation License" not in text and "\x1f" not in text
        assert not any(is_license_paragraph(p) for p in re.split(r"\n\s*\n", text))
