"""Human-written English shipped with moewm, for measuring a watermark detector's null distribution.

A detector's p-value is a promise about text that carries no watermark, and the text it must not flag is
above all text written by people. A null measured on the model's own unwatermarked samples, or on text written
for this project, says little about that. These corpora are written by nobody on this project, come from
packages with a licence that allows shipping them, and differ in genre, so a false-positive rate can be read
per genre:

- ``human_docstrings``: Python standard-library docstrings that tiny_moe was *not* trained on (its held-out
  5% first, then test-suite docstrings), technical prose; PSF-2.0.
- ``devils_dictionary``: Ambrose Bierce's *The Devil's Dictionary* (1911), satirical literary prose; public
  domain.
- ``kjv_narrative``: the narrative books of the King James Bible (1611), Early Modern English narrative; public
  domain.

Two more genres are **held out**: shipped, but read only by the per-key validity studies
(``moewm.evaluation.validity`` as its final gate, ``moewm.evaluation.key_validity`` over many keys), never by a job's null sets (``eval.null_sets`` refuses
them) nor by any design study, so that no design choice was tuned on them:

- ``jargon_file``: the Jargon File 4.4.7 (2003), the hackers' lexicon of slang and folklore; public domain.
- ``crawl_lore``: descriptions of monsters, gods, places and artefacts of the game Dungeon Crawl Stone Soup,
  fantasy fiction; GPL-2.0-or-later (the licence ships beside the chunks).

Each is a list of chunks of 60-100 words (whitespace normalised), in a fixed order; ``assets/corpora/<name>/``
holds ``chunks.jsonl``, ``info.json`` and ``PROVENANCE.md`` (source package and version, licence, how the
chunks were made). ``scripts/build_null_corpora.py`` rebuilds them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

CORPORA_DIR = Path(__file__).resolve().parent / "assets" / "corpora"
HUMAN_CORPORA: tuple[str, ...] = ("human_docstrings", "devils_dictionary", "kjv_narrative")
"""The corpora a job and the design studies may use (``eval.null_sets``)."""
HELD_OUT_CORPORA: tuple[str, ...] = ("jargon_file", "crawl_lore")
"""Used by the per-key validity studies only (the 10-key gate and key validity over many keys): never a job's null set,
never read by a design study."""
ALL_CORPORA: tuple[str, ...] = HUMAN_CORPORA + HELD_OUT_CORPORA


def _folder(name: str) -> Path:
    if name not in ALL_CORPORA:
        raise ValueError(f"unknown human corpus {name!r}; the shipped corpora are: {', '.join(HUMAN_CORPORA)} "
                         f"and, held out for the validity study, {', '.join(HELD_OUT_CORPORA)}")
    return CORPORA_DIR / name


def is_held_out(name: str) -> bool:
    """Whether corpus ``name`` is held out (read by the per-key validity studies only)."""
    _folder(name)
    return name in HELD_OUT_CORPORA


@lru_cache(maxsize=None)
def _chunks(name: str) -> tuple[str, ...]:
    path = _folder(name) / "chunks.jsonl"
    with open(path, encoding="utf-8") as handle:
        return tuple(json.loads(line)["text"] for line in handle if line.strip())


def human_texts(name: str, limit: Optional[int] = None) -> list[str]:
    """The first ``limit`` chunks of corpus ``name`` (all of them for None), always in the same order."""
    texts = _chunks(name)
    if limit is None:
        return list(texts)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= len(texts):
        raise ValueError(
            f"limit={limit!r} for {name!r}: must be an integer from 1 to {len(texts)} (its number of chunks), or None for all"
        )
    return list(texts[:limit])


def corpus_info(name: str) -> dict[str, Any]:
    """Provenance of corpus ``name``: ``licence``, ``source``, ``package``, ``attribution``, ``genre``, ``count``,
    ``words`` (per-chunk min / mean / max / total), ``held_out``, ``provenance`` (path of its PROVENANCE.md)
    and more."""
    folder = _folder(name)
    info = json.loads((folder / "info.json").read_text(encoding="utf-8"))
    info["held_out"] = bool(info.get("held_out", False))
    info["provenance"] = str(folder / "PROVENANCE.md")
    return info
