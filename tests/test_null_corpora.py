"""The human-written corpora shipped for measuring a detector's null (moewm/assets/corpora, moewm.null_corpora)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from moewm.null_corpora import ALL_CORPORA, CORPORA_DIR, HELD_OUT_CORPORA, HUMAN_CORPORA, corpus_info, human_texts, is_held_out

REPO = Path(__file__).resolve().parents[1]
TINY_LOG = REPO / "moewm" / "assets" / "tiny_moe" / "build_log.json"


@lru_cache(maxsize=None)
def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _rows(name: str) -> list[dict]:
    with open(CORPORA_DIR / name / "chunks.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_the_shipped_folders_are_the_named_corpora():
    assert len(HUMAN_CORPORA) >= 2 and len(HELD_OUT_CORPORA) >= 2
    assert not set(HUMAN_CORPORA) & set(HELD_OUT_CORPORA)
    assert sorted(ALL_CORPORA) == sorted(p.name for p in CORPORA_DIR.iterdir() if p.is_dir())
    genres = {corpus_info(n)["genre"].split(":")[0] for n in ALL_CORPORA}
    assert len(genres) == len(ALL_CORPORA)  # one genre each, held-out ones included


@pytest.mark.parametrize("name", ALL_CORPORA)
def test_held_out_is_said_in_info_and_provenance(name):
    info = corpus_info(name)
    assert info["held_out"] is is_held_out(name) is (name in HELD_OUT_CORPORA)
    provenance = Path(info["provenance"]).read_text(encoding="utf-8")
    assert ("**Held out.**" in provenance) is info["held_out"]


def test_held_out_corpora_are_no_null_set_of_a_job():
    """Held out means no job and no design study reads them: eval.null_sets refuses them (by name), the
    defaults do not hold them, and no module but the two per-key validity studies (and the corpus / config modules
    that name them) mentions them."""
    from moewm.config import NULL_SET_NAMES, ConfigError, EvalConfig, check_null_sets

    assert not set(HELD_OUT_CORPORA) & set(NULL_SET_NAMES) and not set(HELD_OUT_CORPORA) & set(EvalConfig().null_sets)
    for name in HELD_OUT_CORPORA:
        with pytest.raises(ConfigError, match=f"eval.null_sets.*{name}.*held out for the per-key validity study"):
            check_null_sets(["greedy", name])
    allowed = {"null_corpora.py", "config.py", "evaluation/validity.py", "evaluation/key_validity.py"}
    words = (*HELD_OUT_CORPORA, "HELD_OUT_CORPORA", "held_out=True")
    users = sorted(
        str(path.relative_to(REPO))
        for root in (REPO / "moewm", REPO / "conf")
        for path in root.rglob("*")
        if path.is_file() and path.suffix in (".py", ".yaml") and any(w in path.read_text(encoding="utf-8") for w in words)
    )
    assert users == sorted(f"moewm/{a}" for a in allowed), users


def test_gpl_corpus_ships_its_licence():
    for name in ALL_CORPORA:
        if corpus_info(name)["licence"].startswith("GPL"):
            text = (CORPORA_DIR / name / "LICENSE-GPL-2.txt").read_text(encoding="utf-8")
            assert "GNU GENERAL PUBLIC LICENSE" in text and "Version 2, June 1991" in text


@pytest.mark.parametrize("name", ALL_CORPORA)
def test_corpus_loads_within_its_limits(name):
    rows = _rows(name)
    texts = human_texts(name)
    assert texts == [r["text"] for r in rows]
    assert all(set(r) == {"text", "source"} and isinstance(r["source"], str) and r["source"] for r in rows)
    assert len(texts) >= 400
    assert len(set(texts)) == len(texts), "a chunk is repeated"
    for text in texts:
        assert 60 <= len(text.split()) <= 100, text
        assert text == " ".join(text.split()), "whitespace not normalised"
    assert (CORPORA_DIR / name / "chunks.jsonl").stat().st_size <= 1_500_000

    info = corpus_info(name)
    assert info["name"] == name and info["count"] == len(texts)
    assert info["licence"] and info["source"] and info["package"] and info["attribution"]
    words = [len(t.split()) for t in texts]
    assert (info["words"]["min"], info["words"]["max"], info["words"]["total"]) == (min(words), max(words), sum(words))
    provenance = Path(info["provenance"]).read_text(encoding="utf-8")
    assert info["package"] in provenance and f"chunks: {len(texts)}" in provenance


@pytest.mark.parametrize("name", ALL_CORPORA)
def test_texts_are_deterministic(name):
    first = human_texts(name, 7)
    assert len(first) == 7 and first == human_texts(name)[:7] == human_texts(name, 7)
    first.append("changed")  # the caller's copy, not the cache
    assert human_texts(name, 7) == human_texts(name)[:7]
    assert human_texts(name, corpus_info(name)["count"]) == human_texts(name)


def test_bad_names_and_limits_are_refused_clearly():
    for call in (lambda: human_texts("wikipedia"), lambda: corpus_info("wikipedia")):
        with pytest.raises(ValueError, match="wikipedia") as err:
            call()
        assert all(n in str(err.value) for n in ALL_CORPORA)
    count = corpus_info("devils_dictionary")["count"]
    for bad in (0, -3, count + 1, True, 2.0):
        with pytest.raises(ValueError, match=f"from 1 to {count}"):
            human_texts("devils_dictionary", bad)


# ------------------------------------------------- human_docstrings: none of tiny_moe's training docstrings
def _words_overlap(doc: str, chunk: str, min_words: int = 5) -> bool:
    """Whether ``doc`` (normalised) is a piece of ``chunk``: inside it, around it, or cut at its start or end."""
    if doc in chunk or chunk in doc:
        return True
    d, c = doc.split(), chunk.split()
    return any(d[-k:] == c[:k] or d[:k] == c[-k:] for k in range(min(len(d), len(c)) - 1, min_words - 1, -1))


@lru_cache(maxsize=None)
def _docstrings(path: Path) -> tuple[str, ...]:
    """The docstrings of a file, cleaned as the corpus builder (and build_tiny_moe) clean them."""
    return tuple(_load_script("build_null_corpora").file_docstrings(path) or ())


def test_human_docstrings_has_no_training_docstring_of_tiny_moe():
    """Recompute tiny_moe's split (same hash rule) on a sample of chunks: every docstring a chunk is made of is
    held out, or comes from a file tiny_moe's corpus walk skips and is no docstring of any file it reads."""
    tiny = _load_script("build_tiny_moe")
    tiny_log = json.loads(TINY_LOG.read_text())
    root = tiny.stdlib_root()
    if str(root) != tiny_log["corpus"]["stdlib"]:
        pytest.skip(f"not the standard library tiny_moe was built from ({tiny_log['corpus']['stdlib']})")
    pct = float(tiny_log["recipe"]["heldout_pct"])

    def read_by_walk(rel: Path) -> bool:  # the rule of tiny.extract_docstrings
        return not any(d in tiny.SKIP_DIRS or d.startswith("test") for d in rel.parts[:-1]) and not rel.name.startswith("test_")

    rows = _rows("human_docstrings")
    held = [r for r in rows if r["source"].startswith("stdlib-heldout: ")]
    tests = [r for r in rows if r["source"].startswith("stdlib-tests: ")]
    n_held = corpus_info("human_docstrings")["heldout_chunks"]
    assert len(held) == n_held > 100 and rows[:n_held] == held and len(held) + len(tests) == len(rows)

    # sources of every file tiny_moe's walk reads, to find where a test-suite docstring could also be
    walked: dict[Path, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in tiny.SKIP_DIRS and not d.startswith("test")]
        for fn in filenames:
            if fn.endswith(".py") and not fn.startswith("test_"):
                walked[Path(dirpath) / fn] = (Path(dirpath) / fn).read_text(encoding="utf-8", errors="replace")

    def in_training(doc: str) -> bool:
        if tiny.is_heldout(doc, pct):
            return False
        first = doc.split("\n", 1)[0]
        probe = max(re.split(r"[\\'\"]", first), key=len)  # escapes and quotes may differ in the source text
        assert len(probe) >= 8, f"cannot look up {doc!r}"
        return any(doc in _docstrings(path) for path, text in walked.items() if probe in text)

    rng = random.Random(0)
    checked_held = checked_tests = 0
    for row in rng.sample(held, 8) + rng.sample(tests, 8):
        group, files = row["source"].split(": ", 1)
        chunk = row["text"]
        pieces = []
        for rel in map(Path, files.split(", ")):
            assert (root / rel).exists(), rel
            assert read_by_walk(rel) == (group == "stdlib-heldout"), (group, rel)
            pieces += [d for d in _docstrings(root / rel) if len(d) >= 10 and _words_overlap(" ".join(d.split()), chunk)]
        assert pieces, f"no docstring of {files} found in {chunk[:80]!r}"
        for doc in pieces:
            if group == "stdlib-heldout":
                assert tiny.is_heldout(doc, pct), f"training docstring shipped: {doc[:80]!r}"
                checked_held += 1
            else:
                assert not in_training(doc), f"training docstring shipped: {doc[:80]!r}"
                checked_tests += 1
    assert checked_held >= 8 and checked_tests >= 8


@pytest.mark.slow
def test_rebuild_gives_the_shipped_files():
    """scripts/build_null_corpora.py --check: needs Python 3.11.7, dict-devil, bible-kjv, dict-jargon and
    crawl-common (Debian)."""
    build = _load_script("build_null_corpora")
    if sys.version.split()[0] != json.loads(TINY_LOG.read_text())["env"]["python"]:
        pytest.skip("not the Python tiny_moe was built with")
    if not build.DEVIL_DICT.exists() or shutil.which("bible") is None or not build.JARGON_DICT.exists() or not build.CRAWL_DESCRIPT.is_dir():
        pytest.skip("apt-get install dict-devil bible-kjv dict-jargon crawl-common")
    assert build.main(["--check"]) == 0
