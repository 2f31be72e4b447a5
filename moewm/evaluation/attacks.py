"""Attacks on watermarked text: edits applied before detection.

``apply_attack(texts, cfg, tokenizer=..., ...)`` returns the attacked texts. ``cfg.strength`` in [0, 1]
sets how much is changed, and strength 0 returns the input strings unchanged for every attack. Each
text gets its own generator seeded by (``seed``, attack, text index), so results do not depend on batch
composition and repeat exactly for a seed.

============== ==============================================================================================
attack         what ``strength`` = s means
============== ==============================================================================================
deletion       delete round(s * words) randomly chosen words (with one adjacent whitespace run each)
substitution   replace round(s * tokens) randomly chosen tokens by one of their ``SUBSTITUTION_NEIGHBOURS``
               nearest tokens in the model's input-embedding space (cosine; never the token itself or a
               special token)
insertion      insert round(s * tokens) uniformly drawn non-special tokens at random positions
swap           swap round(s * words / 2) disjoint pairs of adjacent words (a fraction s of words moves)
truncation     keep the first round((1 - s) * words) words
copy_paste     CP-k (Kirchenbauer et al., "On the Reliability of Watermarks for Large Language Models"):
               ``cfg.copy_paste_spans`` watermarked spans with round((1 - s) * words) words in total, taken
               from the watermarked text, embedded in the unwatermarked text of the same prompt, output of
               the watermarked text's word count; s is the unwatermarked fraction (1: none watermarked)
paraphrase     an LLM rewrites round(s * units) of the text's sentences (at least one when s > 0; sentences
               over ``PARAPHRASE_UNIT_WORDS`` words are split), prompted with ``PARAPHRASE_PROMPT``, sampling
retokenisation the generated token ids decoded to text (as every output shows it) and that text encoded again:
               what a detector that sees only the published text scores. No degrees: any s > 0 is the round
               trip; the text itself is unchanged, its token ids need not be (``retokenise``)
============== ===============================================================================================

Word-level attacks keep the text's own whitespace: its leading and trailing runs, and between two kept words
the run that followed the left one (copy_paste: every copied span and run verbatim, with the run before it;
paraphrase: every sentence it does not rewrite verbatim). So an edit changes no token before it, and a
continuation keeps its first token (``Ġline`` stays ``Ġline``; deletion once stripped the text, and
copy_paste and paraphrase joined words with single spaces). Substitution and insertion work on token ids and
decode the result; retokenisation works on token ids (text in, the same text out).
"""

from __future__ import annotations

import logging
import re
import zlib
from typing import Any, Optional, Sequence

import numpy as np
import torch

from moewm.config import ATTACK_KINDS, AttackConfig, ConfigError, GenerationConfig, ModelConfig
from moewm.engine.generation import usable_tokens

log = logging.getLogger(__name__)

SUBSTITUTION_NEIGHBOURS = 5
PARAPHRASE_PROMPT = "Paraphrase the following text:\n{text}\nParaphrase:"
PARAPHRASE_UNIT_WORDS = 40
_PIECES = re.compile(r"\S+|\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_PARAPHRASERS: dict[str, tuple[Any, Any]] = {}


def _rng(seed: int, name: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(name.encode()), int(index)])


def _pieces(text: str) -> tuple[list[str], np.ndarray]:
    """Words and whitespace runs in order, and the indices of the word pieces."""
    pieces = _PIECES.findall(text)
    words = np.array([i for i, p in enumerate(pieces) if not p.isspace()], dtype=np.int64)
    return pieces, words


def _count(strength: float, n: int) -> int:
    return int(min(n, round(strength * n)))


# -- word-level ----------------------------------------------------------------------------------
def _edges(pieces: list[str]) -> tuple[str, str]:
    """The text's leading and trailing whitespace runs ("" where there is none)."""
    lead = pieces[0] if pieces and pieces[0].isspace() else ""
    trail = pieces[-1] if len(pieces) > 1 and pieces[-1].isspace() else ""
    return lead, trail


def delete_words(text: str, strength: float, rng: np.random.Generator) -> str:
    """Delete round(strength * words) random words. Each remaining word keeps the whitespace run that followed
    it (the last one the text's trailing run), and the text keeps its leading run: nothing before the first
    deleted word changes, not even the first token's leading space."""
    pieces, words = _pieces(text)
    k = _count(strength, len(words))
    if k == 0:
        return text
    keep = np.ones(len(words), dtype=bool)
    keep[rng.choice(len(words), size=k, replace=False)] = False
    kept = words[keep]
    lead, trail = _edges(pieces)
    # between two kept words: the run after the left one (interior, so a whitespace piece); after the last: trail
    out = [lead]
    for j, w in enumerate(kept):
        out.append(pieces[w])
        out.append(pieces[w + 1] if j + 1 < len(kept) else trail)
    return "".join(out) if len(kept) else lead + trail


def swap_words(text: str, strength: float, rng: np.random.Generator) -> str:
    pieces, words = _pieces(text)
    n = len(words)
    if n < 2:
        return text
    offset = int(rng.integers(0, 2)) if n > 2 else 0
    starts = offset + 2 * np.arange((n - offset) // 2)
    m = min(len(starts), int(round(strength * n / 2)))
    if m == 0:
        return text
    chosen = rng.choice(starts, size=m, replace=False)
    perm = np.arange(n)
    perm[chosen], perm[chosen + 1] = chosen + 1, chosen
    out = list(pieces)
    for slot, src in zip(words, words[perm]):
        out[slot] = pieces[src]
    return "".join(out)


def truncate_words(text: str, strength: float) -> str:
    pieces, words = _pieces(text)
    keep = len(words) - _count(strength, len(words))
    if keep == len(words):
        return text
    if keep == 0:
        return ""
    return "".join(pieces[: words[keep - 1] + 1])


def _segments(parts: list[tuple[list[str], np.ndarray, int, int]], lead: str) -> str:
    """Words ``start`` .. ``stop - 1`` of each (pieces, word indices, start, stop) in turn, verbatim with the
    whitespace between them. The output starts with ``lead``; every later segment with the whitespace run
    before its first word in its source (one space at its source's word 0 when that text has no leading run);
    the last segment keeps its text's trailing run when it reaches that text's end."""
    out: list[str] = []
    last = None
    for pieces, words, start, stop in parts:
        if stop <= start:
            continue
        a, b = int(words[start]), int(words[stop - 1])
        out.append(lead if not out else (pieces[a - 1] if a > 0 else " "))
        out.append("".join(pieces[a : b + 1]))
        last = (pieces, b, stop == len(words))
    if last is not None and last[2] and last[1] + 1 < len(last[0]):
        out.append(last[0][last[1] + 1])
    return "".join(out)


def copy_paste(wm_text: str, unwm_text: str, strength: float, spans: int, rng: np.random.Generator) -> str:
    """CP-``spans``: watermarked spans (a 1 - strength share of the words) inside unwatermarked text. Every span
    and every unwatermarked run is copied verbatim, the output starting with the watermarked text's leading
    whitespace (:func:`_segments`)."""
    wp, w = _pieces(wm_text)
    up, u = _pieces(unwm_text)
    total = len(w)
    n_fill = _count(strength, total)
    n_keep = total - n_fill
    if n_fill > len(u):
        log.warning("copy_paste: unwatermarked text has %d words, %d wanted; using all of it", len(u), n_fill)
        n_fill = len(u)
    if n_keep == 0:
        return _segments([(up, u, 0, n_fill)], _edges(wp)[0])
    k = min(spans, n_keep)
    # span lengths as equal as possible; their places in the watermarked text random and disjoint:
    # span j starts after the spans before it plus c_j skipped words, c sorted in [0, total - n_keep]
    lengths = n_keep // k + (np.arange(k) < n_keep % k)
    skipped = np.sort(rng.integers(0, total - n_keep + 1, size=k))
    starts = np.cumsum(np.r_[0, lengths[:-1]]) + skipped
    # the beginning of the unwatermarked text, cut into k + 1 runs around the spans
    bounds = np.r_[0, np.sort(rng.integers(0, n_fill + 1, size=k)), n_fill]
    parts: list[tuple[list[str], np.ndarray, int, int]] = []
    for j in range(k + 1):
        parts.append((up, u, int(bounds[j]), int(bounds[j + 1])))
        if j < k:
            parts.append((wp, w, int(starts[j]), int(starts[j] + lengths[j])))
    return _segments(parts, _edges(wp)[0])


# -- token-level ---------------------------------------------------------------------------------
def nearest_neighbours(embeddings: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor, k: int, chunk: int = 256) -> torch.Tensor:
    """(len(tokens), k) nearest valid tokens by cosine of input embeddings, excluding the token itself."""
    emb = torch.nn.functional.normalize(embeddings.detach().float().cpu(), dim=-1)
    valid = valid.cpu()
    k = min(k, int(valid.sum()) - 1)
    out = []
    for part in tokens.split(chunk):  # bounded (chunk, V) similarity blocks
        sims = emb[part] @ emb.T
        sims[:, ~valid] = float("-inf")
        sims[torch.arange(len(part)), part] = float("-inf")
        out.append(torch.topk(sims, k, dim=-1).indices)
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)


def substitute_tokens(
    ids_list: list[list[int]], strength: float, embeddings: torch.Tensor, valid: torch.Tensor, rngs: list[np.random.Generator]
) -> list[list[int]]:
    chosen = []
    for ids, rng in zip(ids_list, rngs):
        k = _count(strength, len(ids))
        chosen.append(np.sort(rng.choice(len(ids), size=k, replace=False)) if k else np.zeros(0, dtype=np.int64))
    wanted = sorted({ids[j] for ids, pos in zip(ids_list, chosen) for j in pos})
    if not wanted:
        return [list(ids) for ids in ids_list]
    table = nearest_neighbours(embeddings, torch.tensor(wanted), valid, SUBSTITUTION_NEIGHBOURS).numpy()
    row_of = {t: i for i, t in enumerate(wanted)}
    out = []
    for ids, pos, rng in zip(ids_list, chosen, rngs):
        new = np.array(ids, dtype=np.int64)
        if len(pos):
            rows = np.array([row_of[t] for t in new[pos]])
            new[pos] = table[rows, rng.integers(0, table.shape[1], size=len(pos))]
        out.append(new.tolist())
    return out


def insert_tokens(ids_list: list[list[int]], strength: float, valid: torch.Tensor, rngs: list[np.random.Generator]) -> list[list[int]]:
    pool = torch.nonzero(valid, as_tuple=True)[0].numpy()
    out = []
    for ids, rng in zip(ids_list, rngs):
        k = int(round(strength * len(ids)))
        at = np.sort(rng.integers(0, len(ids) + 1, size=k))
        out.append(np.insert(np.array(ids, dtype=np.int64), at, pool[rng.integers(0, len(pool), size=k)]).tolist())
    return out


def retokenise(ids_list: Sequence[Sequence[int]], tokenizer: Any) -> list[list[int]]:
    """The ids a detector gets from the published text: decode each id list as the outputs show it, encode it again.

    A tokenizer need not give back the generated ids (a word the model spelled in two tokens is one token when
    encoded; special tokens are dropped), so the routing contexts and the scored units change.
    """
    return [list(tokenizer(tokenizer.decode(list(ids), skip_special_tokens=True), add_special_tokens=False)["input_ids"])
            for ids in ids_list]


# -- paraphrase ----------------------------------------------------------------------------------
def _unit_spans(pieces: list[str], words: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) word ranges of a text's paraphrase units: its sentences (ending at a word that ends with
    . ! or ?), those over ``PARAPHRASE_UNIT_WORDS`` words cut into pieces of that many."""
    ends = np.flatnonzero([pieces[w][-1] in ".!?" for w in words]) + 1
    spans = []
    for a, b in zip(np.r_[0, ends], np.r_[ends, len(words)]):
        spans += [(int(s), int(min(s + PARAPHRASE_UNIT_WORDS, b))) for s in range(int(a), int(b), PARAPHRASE_UNIT_WORDS)]
    return spans


def _units(text: str) -> list[str]:
    """A text's paraphrase units as the paraphraser sees them (words joined by single spaces)."""
    pieces, words = _pieces(text)
    return [" ".join(pieces[w] for w in words[a:b]) for a, b in _unit_spans(pieces, words)]


def _replace_units(text: str, new: dict[int, str]) -> str:
    """``text`` with unit j replaced by ``new[j]``; every other unit, the whitespace between units and the
    text's leading and trailing whitespace stay verbatim."""
    pieces, words = _pieces(text)
    spans = _unit_spans(pieces, words)
    lead, trail = _edges(pieces)
    out = [lead]
    for j, (a, b) in enumerate(spans):
        out.append(new[j] if j in new else "".join(pieces[words[a] : words[b - 1] + 1]))
        out.append(pieces[words[b - 1] + 1] if j + 1 < len(spans) else trail)
    return "".join(out)


def _paraphraser(cfg: AttackConfig, model: Any, tokenizer: Any) -> tuple[Any, Any]:
    if cfg.paraphrase_model is None:
        if model is None:
            raise ConfigError("attack.name=paraphrase needs a model: pass model= (the job's own) or set attack.paraphrase_model")
        return model, tokenizer
    if cfg.paraphrase_model not in _PARAPHRASERS:
        from moewm.models.loading import load_model

        _PARAPHRASERS.clear()  # one extra model in memory at a time
        _PARAPHRASERS[cfg.paraphrase_model] = load_model(ModelConfig(name="paraphraser", path=cfg.paraphrase_model))
    return _PARAPHRASERS[cfg.paraphrase_model]


def paraphrase(
    texts: Sequence[str], cfg: AttackConfig, model: Any, tokenizer: Any, seed: int, batch_size: int = 8,
    processors: Sequence[Any] = (),
) -> list[str]:
    """Rewrite a ``cfg.strength`` share of each text's sentences with an LLM (sampling, seeded).

    ``processors``: logits processors that steer the rewrite (the stealing attacker's scrubbing,
    :class:`moewm.evaluation.stealing.StealingProcessor` with a negative delta); none by default."""
    from moewm.engine.generation import encode_prompt, generate_batched

    para_model, para_tok = _paraphraser(cfg, model, tokenizer)
    units = [_units(t) for t in texts]
    jobs: list[tuple[int, int]] = []
    for i, u in enumerate(units):
        if not u:
            continue
        k = max(1, _count(cfg.strength, len(u)))
        for j in np.sort(_rng(seed, "paraphrase", i).choice(len(u), size=k, replace=False)):
            jobs.append((i, int(j)))
    if not jobs:
        return list(texts)
    prompt_ids = [encode_prompt(para_tok, PARAPHRASE_PROMPT.format(text=units[i][j])) for i, j in jobs]
    gen = GenerationConfig(
        max_new_tokens=cfg.paraphrase_max_new_tokens, do_sample=True, temperature=0.7, top_p=0.95, batch_size=batch_size, sampling_seed=seed
    )
    new_ids = generate_batched(para_model, para_tok, prompt_ids, gen, list(processors))
    empty = 0
    rewrites: list[dict[int, str]] = [{} for _ in texts]
    for (i, j), ids in zip(jobs, new_ids):
        text = para_tok.decode(ids, skip_special_tokens=True).split("\n\n")[0].strip()
        if text:
            rewrites[i][j] = text
        else:
            empty += 1
    if empty:
        log.warning("paraphrase: %d of %d rewrites came back empty; those sentences were kept as they were", empty, len(jobs))
    return [_replace_units(t, r) if r else t for t, r in zip(texts, rewrites)]


# -- entry points --------------------------------------------------------------------------------
TOKEN_ATTACKS = ("substitution", "insertion", "retokenisation")


def attack_token_ids(
    ids_list: Sequence[Sequence[int]],
    cfg: AttackConfig,
    *,
    tokenizer: Any,
    embeddings: Optional[torch.Tensor] = None,
    model: Any = None,
    seed: Optional[int] = None,
) -> list[list[int]]:
    """The token-level attacks (substitution, insertion, retokenisation) on token ids.

    Substitution and insertion make no decode / encode round trip of their own; retokenisation is that round trip.
    Same generators as :func:`apply_attack`, so ``apply_attack`` = decode(attack_token_ids(encode(texts))).
    """
    cfg.validate()
    if cfg.name not in TOKEN_ATTACKS:
        raise ValueError(f"attack_token_ids: attack.name={cfg.name!r} is not a token-level attack {TOKEN_ATTACKS}")
    seed = cfg.seed if seed is None else int(seed)
    ids_list = [list(ids) for ids in ids_list]
    if cfg.strength == 0:
        return ids_list
    if cfg.name == "retokenisation":
        return retokenise(ids_list, tokenizer)
    rngs = [_rng(seed, cfg.name, i) for i in range(len(ids_list))]
    if embeddings is None and model is not None:
        embeddings = model.get_input_embeddings().weight
    vocab = int(embeddings.shape[0]) if embeddings is not None else len(tokenizer)
    valid = usable_tokens(tokenizer, vocab)  # the same tokens a pool may hold
    if cfg.name == "substitution":
        if embeddings is None:
            raise ValueError("attack.name=substitution needs embeddings= (or model=) for nearest neighbours")
        return substitute_tokens(ids_list, float(cfg.strength), embeddings, valid, rngs)
    return insert_tokens(ids_list, float(cfg.strength), valid, rngs)


def apply_attack(
    texts: Sequence[str],
    cfg: AttackConfig,
    *,
    tokenizer: Any,
    embeddings: Optional[torch.Tensor] = None,
    model: Any = None,
    unwatermarked: Optional[Sequence[str]] = None,
    seed: Optional[int] = None,
) -> list[str]:
    """The attacked texts (same order). ``seed`` defaults to ``cfg.seed``.

    ``embeddings`` (V, H) are needed for substitution (default: ``model``'s input embeddings);
    ``unwatermarked`` texts (one per text) for copy_paste; ``model`` (or ``cfg.paraphrase_model``)
    for paraphrase.
    """
    cfg.validate()
    seed = cfg.seed if seed is None else int(seed)
    texts = list(texts)
    if cfg.name == "none" or cfg.strength == 0:
        return texts
    s = float(cfg.strength)
    name = cfg.name
    rngs = [_rng(seed, name, i) for i in range(len(texts))]
    if name == "deletion":
        return [delete_words(t, s, r) for t, r in zip(texts, rngs)]
    if name == "swap":
        return [swap_words(t, s, r) for t, r in zip(texts, rngs)]
    if name == "truncation":
        return [truncate_words(t, s) for t in texts]
    if name == "copy_paste":
        if unwatermarked is None or len(unwatermarked) != len(texts):
            raise ValueError("attack.name=copy_paste needs unwatermarked= texts, one per watermarked text")
        return [copy_paste(t, u, s, cfg.copy_paste_spans, r) for t, u, r in zip(texts, unwatermarked, rngs)]
    if name == "paraphrase":
        return paraphrase(texts, cfg, model, tokenizer, seed)
    if name == "retokenisation":  # the published text is the text: only its token ids change (attack_token_ids)
        return texts
    if name in TOKEN_ATTACKS:
        ids_list = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        new = attack_token_ids(ids_list, cfg, tokenizer=tokenizer, embeddings=embeddings, model=model, seed=seed)
        return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
    raise ConfigError(f"attack.name={name!r}: allowed values are {ATTACK_KINDS}")
