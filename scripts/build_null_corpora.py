#!/usr/bin/env python
"""Build ``moewm/assets/corpora``: human-written English text for measuring a detector's null distribution.

A watermark detector's p-value is a promise about text that was *not* watermarked, above all text written by
people. These corpora are such text, written by nobody on this project, in five genres (three for the jobs and
the design studies, two held out for the per-key validity study), each from a package that can be installed
here:

- ``human_docstrings``: docstrings of the Python standard library that tiny_moe was *not* trained on: first the
  5% held out by ``scripts/build_tiny_moe.py`` (the same ``extract_docstrings`` and ``is_heldout`` functions,
  imported from that script), then the docstrings of the standard library's test suites, which that script
  never reads. Source: the running interpreter's standard library (Python 3.11.7 for the shipped files).
- ``devils_dictionary``: the prose of Ambrose Bierce's *The Devil's Dictionary* (1911, public domain), from
  Debian's ``dict-devil`` (``apt-get install dict-devil``).
- ``kjv_narrative``: the narrative books of the King James Bible (1611, public domain), from Debian's
  ``bible-kjv`` and ``bible-kjv-text`` (``apt-get install bible-kjv``), read through its ``bible`` program.

Two more genres are held out: shipped, but read only by the per-key validity study, never by a job's null
sets or a design study (``info.json`` says ``"held_out": true``):

- ``jargon_file``: the prose of the Jargon File 4.4.7 (2003, public domain), the hackers' lexicon, from
  Debian's ``dict-jargon`` (``apt-get install dict-jargon``); every 5th chunk.
- ``crawl_lore``: the descriptions of monsters, gods, places and artefacts of the game Dungeon Crawl Stone
  Soup 0.28 (GPL-2.0-or-later), from Debian's ``crawl-common`` (``apt-get install crawl-common``).

Each corpus is cut into chunks of 60-100 words (whitespace normalised, at a sentence end where possible, else
at a word boundary), de-duplicated, in source order, and written as ``chunks.jsonl`` (``{"text", "source"}``
per line), ``info.json`` (read by ``moewm.null_corpora.corpus_info``) and ``PROVENANCE.md``.

Run ``python scripts/build_null_corpora.py`` to rebuild all, ``--check`` to compare a rebuild with the
shipped files without writing anything.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "moewm" / "assets" / "corpora"
TINY_SCRIPT = REPO / "scripts" / "build_tiny_moe.py"
TINY_LOG = REPO / "moewm" / "assets" / "tiny_moe" / "build_log.json"

MIN_WORDS, TARGET_WORDS, MAX_WORDS = 60, 75, 100
MAX_BYTES = 1_500_000

DEVIL_DICT = Path("/usr/share/dictd/devil.dict.dz")
DEVIL_INDEX = Path("/usr/share/dictd/devil.index")
KJV_NARRATIVE_BOOKS = (
    "Genesis", "Exodus", "Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "Esther",
    "Jonah", "Matthew", "Mark", "Luke", "John", "Acts",
)
KJV_KEEP_EVERY = 4  # every 4th chunk of those books: spread over all of them, under the size cap

# Held-out genres: shipped, but used only by the per-key validity study (moewm.null_corpora.HELD_OUT_CORPORA).
JARGON_DICT = Path("/usr/share/dictd/jargon.dict.dz")
JARGON_KEEP_EVERY = 5  # every 5th chunk of the lexicon: A to Z, a few hundred chunks
CRAWL_DESCRIPT = Path("/usr/share/crawl/dat/descript")
GPL2 = Path("/usr/share/common-licenses/GPL-2")
CRAWL_FILES = ("branches", "gods", "monsters", "unrand", "features", "items", "species", "backgrounds", "cards",
               "clouds", "spells")  # the lore; left out: quotes.txt (other authors), UI help and game-mechanics lists


# ------------------------------------------------------------------------------------------------ chunks
@dataclass(frozen=True)
class Unit:
    """A piece of source text (a docstring, a paragraph, a verse) with where it came from."""

    text: str
    source: str
    group: str  # chunks never cross from one group to the next


def normalise(text: str) -> str:
    return " ".join(text.split())


_SENTENCE = re.compile(r"\S.*?(?:[.!?][\"')\]]*(?=\s|$)|$)")


def sentences(text: str) -> list[str]:
    """Sentence-like pieces of ``text`` (whitespace normalised): split after ``.``, ``!`` or ``?``."""
    return _SENTENCE.findall(normalise(text))


def pack(units: Iterable[Unit], lo: int = MIN_WORDS, target: int = TARGET_WORDS, hi: int = MAX_WORDS) -> list[tuple[str, list[str]]]:
    """Greedy chunks of ``lo``-``hi`` words: whole sentences while they fit, a chunk closes once it has
    ``target`` words; a sentence that fits nowhere is cut at a word boundary. A group's last words, if fewer
    than ``lo``, are dropped. Returns ``(text, sources)`` pairs in source order."""
    out: list[tuple[str, list[str]]] = []
    words: list[str] = []
    srcs: list[str] = []
    group: Optional[str] = None

    def flush() -> None:
        if len(words) >= lo:
            out.append((" ".join(words), list(srcs)))
        words.clear()
        srcs.clear()

    def add(ws: list[str], source: str) -> None:
        words.extend(ws)
        if not srcs or srcs[-1] != source:
            srcs.append(source)

    for u in units:
        if u.group != group:
            flush()
            group = u.group
        for sent in sentences(u.text):
            w = sent.split()
            while w:
                if len(words) + len(w) <= hi:
                    add(w, u.source)
                    w = []
                    if len(words) >= target:
                        flush()
                elif len(words) >= lo:
                    flush()
                else:
                    take = hi - len(words)
                    add(w[:take], u.source)
                    w = w[take:]
                    flush()
    flush()
    return out


def dedupe(chunks: list[dict[str, str]]) -> tuple[list[dict[str, str]], int]:
    seen: set[str] = set()
    kept = []
    for c in chunks:
        if c["text"] not in seen:
            seen.add(c["text"])
            kept.append(c)
    return kept, len(chunks) - len(kept)


def word_stats(chunks: list[dict[str, str]]) -> dict[str, Any]:
    n = [len(c["text"].split()) for c in chunks]
    return {"min": min(n), "max": max(n), "mean": round(sum(n) / len(n), 1), "total": sum(n)}


# ---------------------------------------------------------------------------------- human_docstrings
def load_tiny_build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_tiny_moe", TINY_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def is_training_file(rel: Path, skip_dirs: set[str]) -> bool:
    """Whether ``extract_docstrings`` of build_tiny_moe.py reads this file (path relative to the stdlib)."""
    return (
        not any(d in skip_dirs or d.startswith("test") for d in rel.parts[:-1])
        and rel.name.endswith(".py")
        and not rel.name.startswith("test_")
    )


def file_docstrings(path: Path) -> Optional[list[str]]:
    """Every docstring of a file, cleaned as build_tiny_moe cleans them, in ``ast.walk`` order; None if unparsable."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return None
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            raw = ast.get_docstring(node, clean=False)
            if raw:
                out.append(inspect.cleandoc(raw).strip())
    return out


_WORD = re.compile(r"^[(\"'`]*[A-Za-z][a-z'-]*[)\"'`.,;:!?]*$")


def prose_like(text: str, min_word_share: float = 0.6) -> bool:
    """A test-suite docstring worth keeping: ASCII, no doctest, and mostly plain words (not code or data)."""
    if not text.isascii() or ">>>" in text:
        return False
    tokens = text.split()
    return sum(bool(_WORD.match(t)) for t in tokens) >= min_word_share * len(tokens)


def docstring_units(tiny: ModuleType, heldout_pct: float) -> tuple[list[Unit], list[Unit], dict[str, Any]]:
    """Held-out docstrings (tiny_moe's exact split) and test-suite docstrings, each with its file (stdlib-relative)."""
    root = tiny.stdlib_root()
    not_stdlib = {"site-packages", "dist-packages", "__pycache__"}
    train_files: list[Path] = []
    test_files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in not_stdlib)
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            rel = (Path(dirpath) / fn).relative_to(root)
            (train_files if is_training_file(rel, tiny.SKIP_DIRS) else test_files).append(rel)

    seen: set[str] = set()
    docs: list[tuple[str, str]] = []  # (text, ref), exactly extract_docstrings' list
    for rel in train_files:
        for text in file_docstrings(root / rel) or ():
            if len(text) < 10 or text in seen:
                continue
            seen.add(text)
            if tiny._keep(text):
                docs.append((text, rel.as_posix()))
    reference, _ = tiny.extract_docstrings(0)
    if [t for t, _ in docs] != reference:
        raise SystemExit("error: the docstring walk differs from build_tiny_moe.extract_docstrings")

    tests: list[tuple[str, str]] = []
    for rel in test_files:
        for text in file_docstrings(root / rel) or ():
            if len(text) < 10 or text in seen:  # never a docstring that tiny_moe saw, nor a repeat
                continue
            seen.add(text)
            if tiny._keep(text) and prose_like(text):
                tests.append((text, rel.as_posix()))
    held = [(t, r) for t, r in docs if tiny.is_heldout(t, heldout_pct)]
    meta = {
        "stdlib": str(root),
        "docstrings": len(docs),
        "heldout_docstrings": len(held),
        "test_files": len(test_files),
        "test_docstrings": len(tests),
    }
    return (
        [Unit(t, r, "stdlib-heldout") for t, r in held],
        [Unit(t, r, "stdlib-tests") for t, r in tests],
        meta,
    )


def build_human_docstrings() -> tuple[list[dict[str, str]], dict[str, Any]]:
    tiny = load_tiny_build_script()
    tiny_log = json.loads(TINY_LOG.read_text())
    pct = float(tiny_log["recipe"]["heldout_pct"])
    held, tests, meta = docstring_units(tiny, pct)
    shipped = tiny_log["corpus"]
    if (meta["docstrings"], meta["heldout_docstrings"], meta["stdlib"]) != (
        shipped["docs"], shipped["heldout_docs"], shipped["stdlib"]
    ):
        raise SystemExit(
            f"error: this interpreter's stdlib ({meta['stdlib']}: {meta['docstrings']} docstrings, "
            f"{meta['heldout_docstrings']} held out) is not the one tiny_moe was built from ({shipped['stdlib']}: "
            f"{shipped['docs']}, {shipped['heldout_docs']}); run this with Python {tiny_log['env']['python']}"
        )
    chunks = []
    for units in (held, tests):
        for text, srcs in pack(units):
            files = list(dict.fromkeys(srcs))
            chunks.append({"text": text, "source": f"{units[0].group}: " + ", ".join(files)})
    chunks, dups = dedupe(chunks)
    n_held = sum(c["source"].startswith("stdlib-heldout:") for c in chunks)
    info = {
        "name": "human_docstrings",
        "genre": "technical: API documentation (Python docstrings)",
        "licence": "PSF-2.0",
        "attribution": "Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved",
        "source": f"Python {sys.version.split()[0]} standard library, {meta['stdlib']}",
        "package": f"CPython {sys.version.split()[0]}",
        "heldout_chunks": n_held,
        "stdlib": meta,
        "duplicates_dropped": dups,
    }
    return chunks, info


# --------------------------------------------------------------------------------- devils_dictionary
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dict_number(s: str) -> int:
    """A dictd index number (base 64, most significant digit first)."""
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def prose_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a dictionary entry (or of the preface), whitespace normalised.

    The e-text separates blocks by blank lines, and starts a paragraph inside a block by indenting its first line.
    Kept: a paragraph whose lines after the first start at column 0 (first line indented at most 8), and a
    block of one line indented at most 8. Verse, block quotations and attributions, indented on every line,
    are left out.
    """
    out = []
    for block in re.split(r"\n[ \t]*\n", text.strip("\n")):
        lines = block.rstrip().split("\n")
        if not block.strip():
            continue
        paragraphs: list[list[str]] = []
        for line in lines:
            if not paragraphs or line[:1].isspace():
                paragraphs.append([line])
            else:
                paragraphs[-1].append(line)
        for para in paragraphs:
            indents = [len(x) - len(x.lstrip()) for x in para]
            if indents[0] <= 8 and all(i == 0 for i in indents[1:]) and (indents[0] == 0 or len(para) > 1 or len(lines) == 1):
                out.append(re.sub(r"_([^_]+)_", r"\1", normalise("\n".join(para))))  # _italics_ of the e-text
    return out


def devil_units(dict_path: Path = DEVIL_DICT, index_path: Path = DEVIL_INDEX) -> list[Unit]:
    data = gzip.open(dict_path).read().decode("utf-8")  # dictzip is gzip-compatible
    entries: dict[int, tuple[int, str]] = {}
    info: Optional[tuple[int, int]] = None
    for line in index_path.read_text(encoding="utf-8").splitlines():
        head, off, size = line.split("\t")
        if head == "00databaseinfo":
            info = (dict_number(off), dict_number(size))
        elif not head.startswith("00database"):
            entries.setdefault(dict_number(off), (dict_number(size), head))
    units = []
    if info is not None:  # Bierce's preface (after the e-text's header, up to his initials)
        text = data[info[0] : info[0] + info[1]]
        start, end = text.find("PREFACE"), text.find("A.B.")
        if start >= 0 and end > start:
            units += [Unit(p, "PREFACE", "devil") for p in prose_paragraphs(text[start + len("PREFACE") : end])]
    for off in sorted(entries):
        size, head = entries[off]
        body = data[off : off + size]
        printed = re.match(r"([A-Z][A-Z0-9'-]*(?: [A-Z0-9'-]+)*)[,.]", body)  # "BOTTLE-NOSED, adj." -> BOTTLE-NOSED
        name = printed.group(1) if printed else head.upper()
        units += [Unit(p, name, "devil") for p in prose_paragraphs(body)]
    return units


def dpkg_version(package: str) -> str:
    try:
        res = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
    except FileNotFoundError:
        return "unknown"
    return res.stdout.strip() if res.returncode == 0 else "not installed"


def build_devils_dictionary() -> tuple[list[dict[str, str]], dict[str, Any]]:
    if not DEVIL_DICT.exists():
        raise SystemExit(f"error: {DEVIL_DICT} missing: apt-get install dict-devil")
    chunks = []
    for text, srcs in pack(devil_units()):
        span = srcs[0] if len(srcs) == 1 else f"{srcs[0]} .. {srcs[-1]}"
        chunks.append({"text": text, "source": f"The Devil's Dictionary: {span}"})
    chunks, dups = dedupe(chunks)
    info = {
        "name": "devils_dictionary",
        "genre": "literary: satirical prose (definitions and anecdotes), American English, 1881-1906",
        "licence": "public-domain",
        "attribution": "Ambrose Bierce, The Devil's Dictionary (New York: Albert and Charles Boni, 1911); "
                       "Internet Wiretap 1st Online Edition, 1993; Debian package dict-devil",
        "source": f"Debian dict-devil {dpkg_version('dict-devil')}, {DEVIL_DICT}",
        "package": f"dict-devil {dpkg_version('dict-devil')} (Debian)",
        "duplicates_dropped": dups,
    }
    return chunks, info


# ------------------------------------------------------------------------------------- kjv_narrative
def kjv_verses(bible: str = "bible") -> list[tuple[str, int, int, str]]:
    """``(book, chapter, verse, text)`` of the whole KJV, as printed by Debian's ``bible`` program."""
    exe = shutil.which(bible)
    if exe is None:
        raise SystemExit("error: the `bible` program is missing: apt-get install bible-kjv")
    env = dict(os.environ, COLUMNS="80", LC_ALL="C.UTF-8")
    res = subprocess.run([exe, "gen1:1-rev22:21"], capture_output=True, env=env, check=True)
    verses: list[tuple[str, int, int, str]] = []
    book, chapter = "", 0
    head = re.compile(r"^([1-3]? ?[A-Z][A-Za-z ]*?) (\d+)$")
    verse = re.compile(r"^\s+(\d+) (.*)$")
    for line in res.stdout.decode("utf-8").splitlines():
        if not line.strip():
            continue
        if m := head.match(line):
            book, chapter = m.group(1), int(m.group(2))
        elif m := verse.match(line):
            verses.append((book, chapter, int(m.group(1)), m.group(2)))
        else:  # a wrapped verse
            b, c, v, t = verses[-1]
            verses[-1] = (b, c, v, t + " " + line)
    return verses


def kjv_ref(a: str, b: str) -> str:
    """``Genesis 1:1`` + ``Genesis 1:5`` -> ``Genesis 1:1-5``; across chapters ``Genesis 1:30-2:3``."""
    book, cv_a = a.rsplit(" ", 1)
    _, cv_b = b.rsplit(" ", 1)
    if a == b:
        return a
    ca, va = cv_a.split(":")
    cb, vb = cv_b.split(":")
    return f"{book} {ca}:{va}-{vb}" if ca == cb else f"{book} {cv_a}-{cv_b}"


def build_kjv_narrative() -> tuple[list[dict[str, str]], dict[str, Any]]:
    verses = kjv_verses()
    books = {b for b, *_ in verses}
    missing = [b for b in KJV_NARRATIVE_BOOKS if b not in books]
    if missing or len(verses) != 31102:
        raise SystemExit(f"error: unexpected KJV text from `bible` ({len(verses)} verses, missing books {missing})")
    order = {b: i for i, b in enumerate(KJV_NARRATIVE_BOOKS)}
    units = [Unit(t, f"{b} {c}:{v}", b) for b, c, v, t in verses if b in order]
    all_chunks = [{"text": text, "source": "KJV " + kjv_ref(srcs[0], srcs[-1])} for text, srcs in pack(units)]
    chunks, dups = dedupe(all_chunks[::KJV_KEEP_EVERY])
    info = {
        "name": "kjv_narrative",
        "genre": "narrative: Early Modern English prose (the King James Bible's narrative books), 1611",
        "licence": "public-domain",
        "attribution": "The Holy Bible, Authorized (King James) Version, 1611; text of the Bible Retrieval System "
                       "by Chip Chapin (1989-1993), Debian packages bible-kjv / bible-kjv-text",
        "source": f"Debian bible-kjv-text {dpkg_version('bible-kjv-text')} (/usr/lib/bible.data), read with "
                  f"bible-kjv {dpkg_version('bible-kjv')}'s `bible gen1:1-rev22:21`",
        "package": f"bible-kjv-text {dpkg_version('bible-kjv-text')}, bible-kjv {dpkg_version('bible-kjv')} (Debian)",
        "books": list(KJV_NARRATIVE_BOOKS),
        "keep_every": KJV_KEEP_EVERY,
        "chunks_before_subsampling": len(all_chunks),
        "duplicates_dropped": dups,
    }
    return chunks, info


# --------------------------------------------------------------------------------- jargon_file (held out)
_BOX = re.compile("[\u2500-\u257f]")  # box-drawing characters: the File's tables
_QUOTE_GAPS = ((re.compile(r"([“‘{]) "), r"\1"), (re.compile(r" ([”}])"), r"\1"))


def jargon_units(dict_path: Path = JARGON_DICT) -> list[Unit]:
    """Prose paragraphs of the Jargon File's entries, in file order, each with its head word.

    The dictd text gives an entry as a head-word line at column 0 (then a pronunciation / part-of-speech line
    indented by one space) and its paragraphs indented by exactly 4 spaces on every line. Kept: those
    paragraphs. Left out: the dictd header (before the first entry), and blocks indented deeper anywhere
    (examples, code, verse, tables). ``{cross-references}`` lose their braces; the wrapping's stray spaces
    inside quotes (``“ zorch cow ”``) are closed up.
    """
    data = gzip.open(dict_path).read().decode("utf-8")
    units: list[Unit] = []
    head: Optional[str] = None
    for block in re.split(r"\n[ \t]*\n", data):
        lines = [x for x in block.split("\n") if x.strip()]
        if not lines:
            continue
        if not lines[0][:1].isspace():  # "head word" (+ " /pron/, n." line): a new entry, or the header
            if len(lines) <= 2 and all(x[:1] == " " and not x[1:2].isspace() for x in lines[1:]):
                head = lines[0].strip()
            continue
        if head is None or any(len(x) - len(x.lstrip()) != 4 for x in lines) or _BOX.search(block):
            continue
        text = re.sub(r"\{([^{}]*)\}", r"\1", normalise(" ".join(lines).replace("\xad", "")))
        if sum(any(c.isalpha() for c in w) for w in text.split()) < 0.6 * len(text.split()):
            continue  # digits or symbols, not prose
        for pattern, repl in _QUOTE_GAPS:
            text = pattern.sub(repl, text)
        units.append(Unit(text, head, "jargon"))
    return units


def build_jargon_file() -> tuple[list[dict[str, str]], dict[str, Any]]:
    if not JARGON_DICT.exists():
        raise SystemExit(f"error: {JARGON_DICT} missing: apt-get install dict-jargon")
    all_chunks = []
    for text, srcs in pack(jargon_units()):
        span = srcs[0] if len(srcs) == 1 else f"{srcs[0]} .. {srcs[-1]}"
        all_chunks.append({"text": text, "source": f"Jargon File 4.4.7: {span}"})
    chunks, dups = dedupe(all_chunks[::JARGON_KEEP_EVERY])
    version = dpkg_version("dict-jargon")
    info = {
        "name": "jargon_file",
        "genre": "lexicon: hacker slang and folklore (informal American English, 1975-2003)",
        "licence": "public-domain",
        "attribution": "The Jargon File, version 4.4.7, 29 Dec 2003 (Eric S. Raymond, ed.; Raphael Finkel, Guy "
                       "Steele and others before him); Debian package dict-jargon",
        "source": f"Debian dict-jargon {version}, {JARGON_DICT}",
        "package": f"dict-jargon {version} (Debian)",
        "held_out": True,
        "keep_every": JARGON_KEEP_EVERY,
        "chunks_before_subsampling": len(all_chunks),
        "duplicates_dropped": dups,
    }
    return chunks, info


# ---------------------------------------------------------------------------------- crawl_lore (held out)
def crawl_units(folder: Path = CRAWL_DESCRIPT) -> tuple[list[Unit], int]:
    """The descriptions of Dungeon Crawl Stone Soup's database files ``CRAWL_FILES``, in file order.

    A file is a list of entries separated by ``%%%%`` lines: a key line, a blank line, the description. Left
    out: ``#`` comment lines, internal keys (``__...``), and every entry with game markup (``{{ lua }}``,
    ``<colour>`` tags, ``<alias>`` references, ``@variables@``, ``$`` escapes) or indented lines (diagrams).
    Returns the units (one per paragraph, source ``file: key``) and the number of entries left out.
    """
    units: list[Unit] = []
    skipped = 0
    for name in CRAWL_FILES:
        text = (folder / f"{name}.txt").read_text(encoding="utf-8")
        text = "\n".join(x for x in text.split("\n") if not x.startswith("#"))
        for entry in text.split("%%%%"):
            entry = entry.strip("\n")
            if not entry.strip():
                continue
            key, _, body = entry.partition("\n")
            if (key.startswith("__") or not body.strip() or re.search(r"\{\{|[<>@$]|\[\[", body)
                    or any(x[:1].isspace() for x in body.split("\n") if x.strip())):
                skipped += 1
                continue
            units += [Unit(normalise(p), f"{name}: {key.strip()}", "crawl") for p in re.split(r"\n[ \t]*\n", body) if p.strip()]
    return units, skipped


def build_crawl_lore() -> tuple[list[dict[str, str]], dict[str, Any]]:
    if not CRAWL_DESCRIPT.is_dir():
        raise SystemExit(f"error: {CRAWL_DESCRIPT} missing: apt-get install crawl-common")
    units, skipped = crawl_units()
    chunks = []
    for text, srcs in pack(units):
        span = srcs[0] if len(srcs) == 1 else f"{srcs[0]} .. {srcs[-1]}"
        chunks.append({"text": text, "source": f"Dungeon Crawl Stone Soup 0.28: {span}"})
    chunks, dups = dedupe(chunks)
    version = dpkg_version("crawl-common")
    info = {
        "name": "crawl_lore",
        "genre": "fiction: fantasy game lore (descriptions of monsters, gods, places and artefacts), 2006-2022",
        "licence": "GPL-2.0-or-later",
        "attribution": "Dungeon Crawl Stone Soup 0.28 (Copyright 1997-2016 Linley Henzell, the dev team, and "
                       "the contributors); Debian package crawl-common",
        "source": f"Debian crawl-common {version}, {CRAWL_DESCRIPT}/{{{','.join(CRAWL_FILES)}}}.txt",
        "package": f"crawl-common {version} (Debian)",
        "held_out": True,
        "files": list(CRAWL_FILES),
        "entries_left_out": skipped,
        "duplicates_dropped": dups,
    }
    return chunks, info


# ------------------------------------------------------------------------------------------ provenance
def _licence_section(name: str) -> list[str]:
    if name == "human_docstrings":
        return [
            "SPDX: `PSF-2.0` (Python Software Foundation License Version 2), the licence of the Python standard "
            "library. Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved. The licence "
            "agreement is shipped beside this file as `LICENSE-PSF.txt` (the `LICENSE.txt` of the same "
            "standard library, copied unchanged).",
        ]
    if name == "devils_dictionary":
        return [
            "Public domain (copyright expired; first published 1911). Debian's `/usr/share/doc/dict-devil/copyright`:",
            "",
            "> The Devil's Dictionary is in the public domain, its copyright has expired. [...]",
            "> Copyright 1911 by Albert and Charles Boni, Inc. A Public Domain Text, Copyright Expired.",
            "> Released April 15 1993. Entered by Aloysius of &tSftDotIotE.",
            "",
            "The dictd header of the data adds: \"No additional restrictions are claimed.\"",
        ]
    if name == "jargon_file":
        return [
            "Public domain. Debian's `/usr/share/doc/dict-jargon/copyright` (and the dictd header of the data) quote "
            "the File's own notice:",
            "",
            "> This document (the Jargon File) is in the public domain, to be freely used, shared, and modified.",
            "> There are (by intention) no legal restraints on what you can do with it, but there are traditions",
            "> about its proper use to which many hackers are quite strongly attached. Please extend the courtesy",
            "> of proper citation when you quote the File, ideally with a version number [...]",
            "",
            "Cited as it asks: \"The on-line hacker Jargon File, version 4.4.7, 29 Dec 2003\". The dictd header adds: "
            "\"No additional restrictions are claimed.\"",
        ]
    if name == "crawl_lore":
        return [
            "SPDX: `GPL-2.0-or-later`. Debian's `/usr/share/doc/crawl-common/copyright`: \"Dungeon Crawl Stone "
            "Soup / Copyright 1997-2016 Linley Henzell, the dev team, and the contributors\" [...] \"This program "
            "is free software; you can redistribute it and/or modify it under the terms of the GNU General Public "
            "License as published by the Free Software Foundation; either version 2 of the License, or (at your "
            "option) any later version.\" The licence is shipped beside this file as `LICENSE-GPL-2.txt` (Debian's "
            "`/usr/share/common-licenses/GPL-2`, copied unchanged). These chunks are a modified extract of the "
            "game's description files (what was changed, and when, is said below and in `info.json`); they are "
            "data shipped beside moewm's MIT-licensed code, not linked into it, and keep their own licence.",
        ]
    return [
        "Public domain (the Authorized Version of 1611; in the United Kingdom alone the Crown's letters patent "
        "still govern the printing of the KJV). Debian's "
        "`/usr/share/doc/bible-kjv-text/copyright`: \"The copyright for the King James Version text of the Bible is "
        "expired since the translation was done in 1611\". The data file comes from the Bible Retrieval System, "
        "whose legend is kept here as it asks:",
        "",
        "> Bible Retrieval System, Chip Chapin, Hewlett Packard Company. Initial release, September 5, 1989.",
        "> Last Updated: April 26, 1993. This file is provided for unrestricted use provided that this legend",
        "> is included on all tape media and as a part of the software program in whole or part. Users may",
        "> copy, modify or distribute this file at will. -- Chip Chapin, September 4, 1989",
    ]


_HOW = {
    "human_docstrings": [
        "1. `scripts/build_tiny_moe.py`'s own `extract_docstrings` and `is_heldout` (imported from that script) "
        "give the docstrings tiny_moe was built from and its held-out 5% (SHA-256 of the text); this build walks "
        "the same files in the same order to record the file of each docstring and refuses to write if its list "
        "differs from `extract_docstrings`, or if the counts of docstrings and held-out docstrings differ from "
        "`moewm/assets/tiny_moe/build_log.json`.",
        "2. All held-out docstrings come first (sources `stdlib-heldout: FILES`), as they are (doctests and "
        "argument lists included: they belong to the genre). Then the docstrings of the files that "
        "`extract_docstrings` skips (folders named `test*`, `tests`, `idle_test`, `test_support`, files "
        "`test_*.py`; sources `stdlib-tests: FILES`), cleaned the same way (`inspect.cleandoc`, at least 10 "
        "characters, printable), leaving out every text that tiny_moe's walk saw (its training and held-out "
        "docstrings), repeats, and those that are not prose-like: non-ASCII, containing a doctest (`>>>`), or "
        "with fewer than 60% plain word tokens. No docstring of tiny_moe's training set is in this corpus.",
        "3. Docstrings are packed in that order into chunks (see below), one docstring after another joined by a "
        "space; a chunk never mixes held-out and test-suite docstrings. FILES lists the stdlib-relative files of "
        "a chunk's docstrings, in order.",
    ],
    "devils_dictionary": [
        "1. The entries are read from `devil.dict.dz` through `devil.index` (dictd format), in file order, "
        "preceded by Bierce's preface (the e-text's header and the dictd headers are left out).",
        "2. Only prose paragraphs are kept (a paragraph starts after a blank line or at a line indented by "
        "spaces): those whose lines after the first start at column 0, the first line indented at most 8 "
        "spaces, and one-line blocks indented at most 8. Verse, indented block quotations and their "
        "attributions (indented on every line) are left out. The "
        "e-text's `_italics_` underscores are removed. Head words (`ABASEMENT, n.`) stay.",
        "3. Paragraphs are packed in order into chunks (see below), across entries; the source names the first "
        "and last head word of a chunk.",
    ],
    "kjv_narrative": [
        "1. `bible gen1:1-rev22:21` (COLUMNS=80) prints the 31,102 verses; verse numbers and chapter heads are "
        "dropped. The BRS text writes hyphenated names joined (`Bethlehemjudah`).",
        f"2. Only the narrative books are used: {', '.join(KJV_NARRATIVE_BOOKS)}.",
        "3. Verses are packed in order into chunks (see below), never across books; then every "
        f"{KJV_KEEP_EVERY}th chunk is kept (the 1st, {KJV_KEEP_EVERY + 1}th, ...), so the corpus spans all of these "
        "books, stays under the size cap, and no two kept chunks are adjacent in the text.",
    ],
    "jargon_file": [
        "1. The dictd text `jargon.dict.dz` is read in file order (A to Z). An entry is a head-word line at column 0, "
        "a pronunciation / part-of-speech line indented by one space, then paragraphs indented by exactly 4 "
        "spaces on every line.",
        "2. Only those paragraphs are kept; blocks indented deeper anywhere (examples, code, verse), tables "
        "(box-drawing characters), paragraphs of which fewer than 60% of the words hold a letter (digits, "
        "symbols) and the dictd header are left out; soft hyphens are dropped. `{cross-references}` lose their braces, and the spaces the wrapping put "
        "inside quotes and braces (`“ zorch cow ”`) are closed up. Etymology tags (`[MIT]`) and sense numbers "
        "stay.",
        "3. Paragraphs are packed in order into chunks (see below), across entries; then every "
        f"{JARGON_KEEP_EVERY}th chunk is kept (the 1st, {JARGON_KEEP_EVERY + 1}th, ...), so the corpus spans the "
        "lexicon from A to Z, stays small, and no two kept chunks are adjacent. The source names the first and "
        "last head word of a chunk.",
    ],
    "crawl_lore": [
        f"1. The description files `{', '.join(f + '.txt' for f in CRAWL_FILES)}` of `{CRAWL_DESCRIPT}` are read "
        "in that order: entries separated by `%%%%` lines, each a key line, a blank line and the description. "
        "Not used: `quotes.txt` (quotations of other authors), and the UI and game-mechanics files (hints, "
        "tutorial, commands, status, abilities, mutations, skills).",
        "2. Left out: `#` comment lines, internal keys (`__...`), and every entry whose description holds game "
        "markup (`{{ lua }}`, `<colour>` tags, `<alias>` references to another entry, `@variables@`, `$`) or "
        "indented lines (diagrams).",
        "3. Description paragraphs are packed in order into chunks (see below), across entries and files; the "
        "source names the first and last `file: key` of a chunk.",
    ],
}

_INSTALL = {
    "human_docstrings": "Nothing to install: run the build with Python 3.11.7 (the interpreter whose standard "
                        "library tiny_moe was built from; the build refuses another).",
    "devils_dictionary": "`apt-get install dict-devil` (Debian; pulls in `dictd`, whose server need not run).",
    "kjv_narrative": "`apt-get install bible-kjv` (Debian; pulls in `bible-kjv-text`).",
    "jargon_file": "`apt-get install dict-jargon` (Debian; pulls in `dictd`, whose server need not run).",
    "crawl_lore": "`apt-get install crawl-common` (Debian; the game's data only, no game).",
}


def provenance(name: str, chunks: list[dict[str, str]], info: dict[str, Any]) -> str:
    w = info["words"]
    lines = [
        f"# {name}: provenance",
        "",
        f"Human-written English for measuring a watermark detector's null distribution. Genre: {info['genre']}.",
        "",
        *([
            "**Held out.** This corpus is not one of a job's null sets (`eval.null_sets` refuses it) and no design "
            "study reads it: only the per-key validity study (`python -m moewm.evaluation.validity`) scores it, "
            "as its final gate on text that no design choice was tuned on (`moewm.null_corpora.HELD_OUT_CORPORA`).",
            "",
        ] if info.get("held_out") else []),
        "## Source",
        "",
        f"- package: {info['package']}",
        f"- original: {info['source']}",
        f"- attribution: {info['attribution']}",
        "",
        "## Licence",
        "",
        *_licence_section(name),
        "",
        "## How the chunks were made",
        "",
        "Rebuild (deterministic): " + _INSTALL[name] + " Then `python scripts/build_null_corpora.py` "
        "(`--check` compares a rebuild with these files).",
        "",
        *_HOW[name],
        f"4. Chunking, as for every corpus here: whitespace collapsed to single spaces; the text split after `.`, "
        f"`!` or `?` (closing quotes and brackets included); sentences added to a chunk while it stays at most "
        f"{MAX_WORDS} words, the chunk closed once it has {TARGET_WORDS}; a sentence that does not fit into a "
        f"chunk of at least {MIN_WORDS} words is cut at a word boundary; the last words of a group (fewer than "
        f"{MIN_WORDS}) are dropped; repeated chunks are dropped (here: {info['duplicates_dropped']}).",
        "",
        "## Counts",
        "",
        f"- chunks: {len(chunks)}" + (f" (the first {info['heldout_chunks']} from tiny_moe's held-out split)"
                                     if "heldout_chunks" in info else ""),
        f"- words per chunk: mean {w['mean']}, min {w['min']}, max {w['max']}; {w['total']:,} words in all",
        f"- `chunks.jsonl`: {info['bytes']:,} bytes",
        "",
        "Files: `chunks.jsonl` (one JSON object a line: `text`, `source`), `info.json` (these facts, for "
        "`moewm.null_corpora.corpus_info`), this file.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main
BUILDERS: dict[str, Callable[[], tuple[list[dict[str, str]], dict[str, Any]]]] = {
    "human_docstrings": build_human_docstrings,
    "devils_dictionary": build_devils_dictionary,
    "kjv_narrative": build_kjv_narrative,
    "jargon_file": build_jargon_file,
    "crawl_lore": build_crawl_lore,
}


def render(name: str) -> dict[str, bytes]:
    """The files of one corpus, as bytes."""
    chunks, info = BUILDERS[name]()
    body = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chunks).encode("utf-8")
    info["count"] = len(chunks)
    info["words"] = word_stats(chunks)
    info["bytes"] = len(body)
    files = {
        "chunks.jsonl": body,
        "info.json": (json.dumps(info, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
        "PROVENANCE.md": provenance(name, chunks, info).encode("utf-8"),
    }
    if name == "human_docstrings":
        files["LICENSE-PSF.txt"] = (Path(info["stdlib"]["stdlib"]) / "LICENSE.txt").read_bytes()
    if name == "crawl_lore":
        files["LICENSE-GPL-2.txt"] = GPL2.read_bytes()
    problems = []
    if len(chunks) < 400:
        problems.append(f"only {len(chunks)} chunks (< 400)")
    if len(body) > MAX_BYTES:
        problems.append(f"chunks.jsonl is {len(body):,} bytes (> {MAX_BYTES:,})")
    if problems:
        raise SystemExit(f"error: {name}: " + "; ".join(problems))
    return files


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", metavar="NAME", help=f"corpora to build, of {', '.join(BUILDERS)} (default: all)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--check", action="store_true", help="rebuild in memory and compare with the files in --out")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in BUILDERS]
    if unknown:
        p.error(f"unknown corpus {', '.join(unknown)}; known: {', '.join(BUILDERS)}")
    out = Path(args.out)
    differ = []
    for name in args.names or list(BUILDERS):
        files = render(name)
        dest = out / name
        if args.check:
            for fn, body in files.items():
                if not (dest / fn).exists() or (dest / fn).read_bytes() != body:
                    differ.append(f"{name}/{fn}")
            print(f"{name}: {'differs' if any(d.startswith(name + '/') for d in differ) else 'same'}")
            continue
        dest.mkdir(parents=True, exist_ok=True)
        for fn, body in files.items():
            with tempfile.NamedTemporaryFile(dir=dest, delete=False) as tmp:
                tmp.write(body)
            os.chmod(tmp.name, 0o644)
            os.replace(tmp.name, dest / fn)
        info = json.loads(files["info.json"])
        print(f"{name}: {info['count']} chunks, words {info['words']}, {info['bytes']:,} bytes -> {dest}")
    if differ:
        print("differ: " + ", ".join(differ), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
