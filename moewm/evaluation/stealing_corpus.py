"""The watermark-stealing attacker's corpora: what it queried, and what the deployed model and its own model answered.

After Jovanović, Staab and Vechev (2024), "Watermark Stealing in Large Language Models": the attacker sends
prompts to the deployed (watermarked) model and keeps the responses, and answers the same prompts with its
own unwatermarked model. It never sees the key, the routing or anything but text (the token ids of the
public tokenizer).

Prompts (:func:`attacker_prompts`) are word windows of the shipped human corpora that a job and the design
studies may read (:data:`moewm.null_corpora.HUMAN_CORPORA`, never the held-out ones), round-robin over the
corpora so every prefix of the list mixes the three genres, in a fixed order: the first N prompts of a larger
corpus are the corpus of size N, so one run serves every point of a curve over N. The spoofed texts are
written for other prompts (:func:`spoof_prompts`: the windows that start later in the same chunks), so the
attacker is never scored on a prompt it learned from.

A corpus is one JSONL file of ``{"i", "prompt_ids", "ids"}`` rows and a ``.meta.json`` beside it naming the
model, the scheme's settings, the key's fingerprint (never the key), the generation settings and the count.
Rows are appended in batches, so a run that stops keeps what it wrote and a rerun continues from there.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from moewm.null_corpora import HUMAN_CORPORA, human_texts

PROMPT_WORDS = 12
# Word offsets of the windows in each 60-100-word chunk: the attacker queries the first three; spoofing is
# scored on the fourth, which no query saw in full.
QUERY_OFFSETS = (0, 22, 44)
SPOOF_OFFSET = 64


def _windows(offset: int) -> list[str]:
    """One window of PROMPT_WORDS words at ``offset`` from every chunk that has it, round-robin over the corpora."""
    per_corpus = [[" ".join(t.split()[offset : offset + PROMPT_WORDS]) for t in human_texts(name)
                   if len(t.split()) >= offset + PROMPT_WORDS] for name in HUMAN_CORPORA]
    out = []
    for i in range(max(len(c) for c in per_corpus)):
        out += [c[i] for c in per_corpus if i < len(c)]
    return out


def attacker_prompts(count: Optional[int] = None) -> list[str]:
    """The attacker's queries in their fixed order (the first ``count``; all of them for None)."""
    prompts = [p for offset in QUERY_OFFSETS for p in _windows(offset)]
    if count is not None:
        if not 1 <= count <= len(prompts):
            raise ValueError(f"count={count}: allowed range is [1, {len(prompts)}] (the attacker's prompts available)")
        prompts = prompts[:count]
    return prompts


def spoof_prompts(count: int) -> list[str]:
    """Prompts the spoofed texts answer: windows no query covered (the chunks' words from :data:`SPOOF_OFFSET`)."""
    prompts = _windows(SPOOF_OFFSET)
    if not 1 <= count <= len(prompts):
        raise ValueError(f"count={count}: allowed range is [1, {len(prompts)}] (spoofing prompts available)")
    return prompts[:count]


@dataclass(frozen=True)
class CorpusRow:
    """One response: its index in the prompt order, the prompt's ids and the response's ids (eos stripped)."""

    i: int
    prompt_ids: tuple[int, ...]
    ids: tuple[int, ...]


def meta_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name[: -len(".jsonl")] + ".meta.json" if path.name.endswith(".jsonl") else path.name + ".meta.json")


def read_corpus(path: str | Path, count: Optional[int] = None) -> list[CorpusRow]:
    """The first ``count`` rows of a corpus file, in prompt order; an error if it holds fewer."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                r = json.loads(line)
                rows.append(CorpusRow(int(r["i"]), tuple(r["prompt_ids"]), tuple(r["ids"])))
    rows.sort(key=lambda r: r.i)
    if [r.i for r in rows] != list(range(len(rows))):
        raise ValueError(f"{path}: rows are not the prompts 0..{len(rows) - 1} in order (a damaged or mixed corpus)")
    if count is not None:
        if count > len(rows):
            raise ValueError(f"{path}: count={count} but the corpus holds {len(rows)} responses")
        rows = rows[:count]
    return rows


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads(meta_path(path).read_text(encoding="utf-8"))


def rows_done(path: str | Path) -> int:
    """How many rows a (possibly interrupted) corpus file already holds."""
    path = Path(path)
    return len(read_corpus(path)) if path.exists() else 0


def append_rows(path: str | Path, rows: Sequence[CorpusRow]) -> None:
    """Append rows and flush them to disk (a run that stops keeps every finished batch)."""
    with open(path, "a", encoding="utf-8") as handle:
        for r in rows:
            handle.write(json.dumps(asdict(r) | {"prompt_ids": list(r.prompt_ids), "ids": list(r.ids)}) + "\n")
        handle.flush()


def write_meta(path: str | Path, meta: dict[str, Any]) -> None:
    meta_path(path).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def batches(start: int, stop: int, size: int) -> Iterator[range]:
    for s in range(start, stop, size):
        yield range(s, min(stop, s + size))
