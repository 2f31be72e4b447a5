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


def _folder(name: str) -> Path:
    if name not in HUMAN_CORPORA:
        raise ValueError(f"unknown human corpus {name!r}; the shipped corpora are: {', '.join(HUMAN_CORPORA)}")
    return CORPORA_DIR / name


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
    ``words`` (per-chunk min / mean / max / total), ``provenance`` (path of its PROVENANCE.md) and more."""
    folder = _folder(name)
    info = json.loads((folder / "info.json").read_text(encoding="utf-8"))
    info["provenance"] = str(folder / "PROVENANCE.md")
    return info
