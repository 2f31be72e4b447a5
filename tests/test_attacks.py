"""Attacks: deterministic per seed, strength 0 is the identity, strength does what it says."""

import re

import numpy as np
import pytest
import torch

from moewm.evaluation.attacks import (
    SUBSTITUTION_NEIGHBOURS,
    apply_attack,
    attack_token_ids,
    insert_tokens,
    nearest_neighbours,
    substitute_tokens,
)
from moewm.config import ATTACK_KINDS, AttackConfig, ConfigError

TEXTS = [
    "The committee met on Tuesday to review the budget. Several members raised concerns about the timeline, "
    "and the chair promised a revised draft by the end of the month. The vote was postponed.",
    "Rivers carry sediment from the mountains to the sea. Over thousands of years, this process builds deltas "
    "where fertile soil supports farming and large cities.",
    "She opened the window, listened to the rain for a while, and then went back to her desk to finish the letter.",
    "Short text here.",
]
WM = [f"w{i}" for i in range(60)]
UNWM = [f"u{i}" for i in range(80)]
SIMPLE = ["deletion", "substitution", "insertion", "swap", "truncation", "copy_paste"]


def _attack(name, strength, tokenizer, seed=0, texts=TEXTS, **kw):
    emb = torch.randn(len(tokenizer), 16, generator=torch.Generator().manual_seed(0))
    unwm = kw.pop("unwatermarked", [t[::-1] for t in texts])
    return apply_attack(texts, AttackConfig(name=name, strength=strength), tokenizer=tokenizer, embeddings=emb,
                        unwatermarked=unwm, seed=seed, **kw)


@pytest.mark.parametrize("name", ATTACK_KINDS)
def test_strength_zero_is_the_identity(name, tokenizer):
    out = _attack(name, 0.0, tokenizer)  # paraphrase included: no model needed when nothing changes
    assert out == TEXTS and all(a is b for a, b in zip(out, TEXTS))


@pytest.mark.parametrize("name", SIMPLE)
def test_deterministic_for_a_seed_and_seed_matters(name, tokenizer):
    a = _attack(name, 0.3, tokenizer, seed=7)
    b = _attack(name, 0.3, tokenizer, seed=7)
    c = _attack(name, 0.3, tokenizer, seed=8)
    assert a == b
    assert a != TEXTS
    if name != "truncation":  # truncation has no randomness
        assert a != c


def _words(t):
    return t.split()


def test_deletion_removes_the_requested_share_of_words(tokenizer):
    for s in (0.1, 0.5, 1.0):
        out = _attack("deletion", s, tokenizer)
        for orig, new in zip(TEXTS, out):
            n = len(_words(orig))
            assert len(_words(new)) == n - round(s * n)
            # the kept words are a subsequence of the original, in order
            it = iter(_words(orig))
            assert all(w in it for w in _words(new))


def test_truncation_keeps_a_prefix(tokenizer):
    out = _attack("truncation", 0.25, tokenizer)
    for orig, new in zip(TEXTS, out):
        n = len(_words(orig))
        assert orig.startswith(new)
        assert len(_words(new)) == n - round(0.25 * n)
    assert _attack("truncation", 1.0, tokenizer) == [""] * len(TEXTS)


def test_swap_moves_the_requested_share_of_words_and_keeps_the_multiset(tokenizer):
    out = _attack("swap", 0.6, tokenizer)
    for orig, new in zip(TEXTS, out):
        a, b = _words(orig), _words(new)
        assert sorted(a) == sorted(b)
        moved = sum(x != y for x, y in zip(a, b))
        assert moved <= round(0.6 * len(a) / 2) * 2
        assert moved >= round(0.6 * len(a) / 2) * 2 - 2  # a swap of two equal words moves nothing
        # whitespace layout is preserved
        assert re.findall(r"\s+", orig) == re.findall(r"\s+", new)


@pytest.mark.parametrize("strength", [0.25, 0.5, 1.0])
def test_copy_paste_embeds_watermarked_spans(strength, tokenizer):
    wm, unwm = " ".join(WM), " ".join(UNWM)
    [out] = apply_attack([wm], AttackConfig(name="copy_paste", strength=strength, copy_paste_spans=3), tokenizer=tokenizer,
                         unwatermarked=[unwm], seed=3)
    words = out.split()
    assert len(words) == len(WM)
    marked = [w for w in words if w.startswith("w")]
    assert len(marked) == len(WM) - round(strength * len(WM))
    # at most 3 runs of watermarked words, each a contiguous piece of the watermarked text
    runs, current = [], []
    for w in words:
        if w.startswith("w"):
            current.append(int(w[1:]))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert len(runs) <= 3
    assert all(r == list(range(r[0], r[0] + len(r))) for r in runs)
    assert [w for w in words if w.startswith("u")] == UNWM[: len(words) - len(marked)]  # beginning of the unwm text, in order


def test_copy_paste_needs_unwatermarked_texts(tokenizer):
    with pytest.raises(ValueError, match="unwatermarked"):
        apply_attack(TEXTS, AttackConfig(name="copy_paste", strength=0.5), tokenizer=tokenizer)


def test_nearest_neighbours_excludes_self_and_special_tokens():
    # tokens 2i and 2i+1 point the same way; token 9 is "special"
    base = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    emb = base.repeat_interleave(2, 0) + 1e-3 * torch.randn(10, 8, generator=torch.Generator().manual_seed(2))
    valid = torch.ones(10, dtype=torch.bool)
    valid[9] = False
    nn_ = nearest_neighbours(emb, torch.arange(10), valid, k=1)[:, 0]
    assert nn_[0] == 1 and nn_[1] == 0 and nn_[4] == 5
    assert nn_[8] != 9 and nn_[8] != 8
    assert not (nn_ == torch.arange(10)).any()


def test_substitution_replaces_the_requested_share_by_neighbours(tokenizer):
    emb = torch.randn(len(tokenizer), 16, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(len(tokenizer), dtype=torch.bool)
    valid[torch.tensor(tokenizer.all_special_ids)] = False
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    out = attack_token_ids(ids, AttackConfig(name="substitution", strength=0.4), tokenizer=tokenizer, embeddings=emb, seed=1)
    table = nearest_neighbours(emb, torch.arange(len(tokenizer)), valid, SUBSTITUTION_NEIGHBOURS)
    for a, b in zip(ids, out):
        assert len(a) == len(b)
        changed = [j for j in range(len(a)) if a[j] != b[j]]
        assert len(changed) == round(0.4 * len(a))
        assert all(b[j] in table[a[j]].tolist() for j in changed)
        assert not set(b) & set(tokenizer.all_special_ids)
    # the text entry point is decode(attack_token_ids(encode(text)))
    text_out = apply_attack(TEXTS, AttackConfig(name="substitution", strength=0.4), tokenizer=tokenizer, embeddings=emb, seed=1)
    assert text_out == [tokenizer.decode(b, skip_special_tokens=True) for b in out]


def test_insertion_adds_the_requested_number_of_tokens(tokenizer):
    valid = torch.ones(len(tokenizer), dtype=torch.bool)
    valid[torch.tensor(tokenizer.all_special_ids)] = False
    ids = [list(range(40, 90)), list(range(10, 30))]
    out = insert_tokens(ids, 0.5, valid, [np.random.default_rng(i) for i in range(2)])
    for a, b in zip(ids, out):
        assert len(b) == len(a) + round(0.5 * len(a))
        it = iter(b)
        assert all(t in it for t in a)  # the original is a subsequence
        assert not set(b) & set(tokenizer.all_special_ids)


def test_substitute_tokens_strength_one_changes_every_token(tokenizer):
    emb = torch.randn(len(tokenizer), 16, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(len(tokenizer), dtype=torch.bool)
    out = substitute_tokens([[5, 6, 7, 5]], 1.0, emb, valid, [np.random.default_rng(0)])
    assert all(x != y for x, y in zip([5, 6, 7, 5], out[0]))


def test_strength_out_of_range_is_refused():
    with pytest.raises(ConfigError, match=r"attack.strength=1.5: allowed range is \[0, 1\]"):
        AttackConfig(name="deletion", strength=1.5).validate()
    with pytest.raises(ConfigError, match="attack.name"):
        AttackConfig(name="shuffle").validate()


def test_paraphrase_with_the_jobs_model(micro_qwen, tokenizer):
    cfg = AttackConfig(name="paraphrase", strength=1.0, paraphrase_max_new_tokens=6)
    texts = TEXTS[:2]
    a = apply_attack(texts, cfg, tokenizer=tokenizer, model=micro_qwen, seed=5)
    b = apply_attack(texts, cfg, tokenizer=tokenizer, model=micro_qwen, seed=5)
    assert a == b
    assert all(x != y for x, y in zip(a, texts))
    # half strength rewrites some sentences and keeps the others verbatim
    half = apply_attack([TEXTS[0]], AttackConfig(name="paraphrase", strength=0.34, paraphrase_max_new_tokens=6),
                        tokenizer=tokenizer, model=micro_qwen, seed=5)[0]
    assert half != TEXTS[0]
    assert sum(s in half for s in ["The committee met on Tuesday to review the budget.", "The vote was postponed."]) >= 1
    with pytest.raises(ConfigError, match="paraphrase"):
        apply_attack(texts, cfg, tokenizer=tokenizer, model=None)


# -- whitespace at the ends, and nothing before an edit changes (delete_words once stripped the text) ----------
from pathlib import Path  # noqa: E402

from moewm.evaluation.attacks import _pieces, _rng, _replace_units, _units, copy_paste, delete_words, swap_words, truncate_words  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "moewm" / "assets" / "tiny_moe"
# continuations as the job decodes them: a leading space (the first token is "Ġword"), newlines, a trailing run
CONTINUATIONS = [
    " line of the function returns the number of items in the list.\n  It is used by the caller. Then it stops\n",
    " the rain kept falling on the roofs of the old town, and nobody went out. The market was closed.",
    "\n\tdef count(items):\n        return len(items)  # the number of items\n\n",
]


@pytest.fixture(scope="module")
def bpe():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY))


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _lead(text):
    return re.match(r"\s*", text).group(0)


def _trail(text):
    return re.search(r"\s*$", text).group(0)


@pytest.mark.parametrize("name", ["deletion", "swap", "truncation", "copy_paste", "substitution", "insertion"])
def test_strength_zero_keeps_every_token_id(name, bpe):
    emb = torch.randn(len(bpe), 8, generator=torch.Generator().manual_seed(0))
    out = apply_attack(CONTINUATIONS, AttackConfig(name=name, strength=0.0), tokenizer=bpe, embeddings=emb,
                       unwatermarked=CONTINUATIONS[::-1], seed=0)
    assert [_ids(bpe, t) for t in out] == [_ids(bpe, t) for t in CONTINUATIONS]
    if name in ("substitution", "insertion"):
        ids = [_ids(bpe, t) for t in CONTINUATIONS]
        assert attack_token_ids(ids, AttackConfig(name=name, strength=0.0), tokenizer=bpe, embeddings=emb) == ids


def test_deletion_keeps_the_leading_space_and_first_token_when_the_first_word_stays(bpe):
    kept_first = 0
    for seed in range(40):
        for i, text in enumerate(CONTINUATIONS):
            pieces, words = _pieces(text)
            k = round(0.1 * len(words))
            gone = _rng(seed, "deletion", i).choice(len(words), size=k, replace=False)
            [out] = apply_attack([text], AttackConfig(name="deletion", strength=0.1), tokenizer=bpe, seed=seed) if i == 0 else \
                [delete_words(text, 0.1, _rng(seed, "deletion", i))]
            assert _lead(out) == _lead(text) and _trail(out) == _trail(text)
            if 0 not in gone:
                kept_first += 1
                assert _ids(bpe, out)[0] == _ids(bpe, text)[0]
    assert kept_first > 50


def test_deletion_changes_no_token_before_the_first_deleted_word(bpe):
    checked = 0
    for seed in range(30):
        for i, text in enumerate(CONTINUATIONS):
            pieces, words = _pieces(text)
            for s in (0.05, 0.1, 0.3):
                k = round(s * len(words))
                if k == 0:
                    continue
                first = int(np.min(_rng(seed, "deletion", i).choice(len(words), size=k, replace=False)))
                out = delete_words(text, s, _rng(seed, "deletion", i))
                cut = len("".join(pieces[: words[first] - 1])) if words[first] > 0 else 0  # where its preceding whitespace starts
                enc = bpe(text, add_special_tokens=False, return_offsets_mapping=True)
                before = [t for t, (_, end) in zip(enc["input_ids"], enc["offset_mapping"]) if end <= cut]
                assert _ids(bpe, out)[: len(before)] == before
                assert out[:cut] == text[:cut]
                checked += len(before) > 0
    assert checked > 100


def test_deletion_of_words_keeps_the_whitespace_around_the_kept_words():
    text = " a b\n c  d e\n"
    rng = np.random.default_rng(0)
    assert delete_words(text, 1.0, rng) == " \n"
    # deleting only the last word leaves the text's trailing run; only the first, its leading run
    class Pick:  # a stand-in generator that deletes the given words
        def __init__(self, idx):
            self.idx = np.array(idx)

        def choice(self, n, size, replace):
            return self.idx[:size]
    assert delete_words(text, 0.2, Pick([4])) == " a b\n c  d\n"
    assert delete_words(text, 0.2, Pick([0])) == " b\n c  d e\n"
    assert delete_words(text, 0.4, Pick([1, 2])) == " a d e\n"  # a keeps the run that followed it


def test_swap_and_truncation_keep_the_ends(bpe):
    for seed in range(20):
        for i, text in enumerate(CONTINUATIONS):
            out = swap_words(text, 0.3, _rng(seed, "swap", i))
            assert _lead(out) == _lead(text) and _trail(out) == _trail(text)
            if out.split()[0] == text.split()[0]:
                assert _ids(bpe, out)[0] == _ids(bpe, text)[0]
            cut = truncate_words(text, 0.3)
            assert _lead(cut) == _lead(text) and text.startswith(cut) and _ids(bpe, cut)[0] == _ids(bpe, text)[0]


def _layout(prefix, n, seed):
    """n words ``prefix``0.. separated by varied whitespace, with a leading space (like a continuation)."""
    gaps = np.random.default_rng(seed).choice([" ", " ", " ", "\n", "  ", "\n\t"], size=n)
    return "".join(f"{g if i else ' '}{prefix}{i}" for i, g in enumerate(gaps)) + "\n"


@pytest.mark.parametrize("strength", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_copy_paste_copies_every_span_and_run_verbatim(strength, bpe):
    wm, unwm = _layout("w", 30, 1), _layout("u", 40, 2)
    for seed in range(10):
        out = copy_paste(wm, unwm, strength, 3, np.random.default_rng(seed))
        assert len(out.split()) == 30
        if strength == 0.0:
            assert out == wm
        # cut the output into maximal runs of one source's words, each with the whitespace before it
        pieces, words = _pieces(out)
        runs = []
        for w in words:
            chunk = (pieces[w - 1] if w > 0 else "") + pieces[w]
            src, number = pieces[w][0], int(pieces[w][1:])
            if runs and runs[-1][0] == src and runs[-1][2] + 1 == number:
                runs[-1][1] += chunk
                runs[-1][2] = number
            else:
                runs.append([src, chunk, number])
        assert out.startswith(_lead(wm))  # the output begins like the continuation it replaces
        runs[0][1] = runs[0][1][len(_lead(wm)):]
        for src, chunk, _ in runs:  # every run is its source's text, whitespace before it included (but the first)
            assert chunk in (wm if src == "w" else unwm)
        assert unwm.lstrip().startswith("".join(c for src, c, _ in runs if src == "u").lstrip())  # its beginning, verbatim
        assert sum(src == "w" for src, _, _ in runs) <= 3
        assert _ids(bpe, out)[0] in _ids(bpe, wm) + _ids(bpe, unwm)


def test_paraphrase_units_are_replaced_in_place_and_the_rest_stays_verbatim():
    text = " First sentence here.\n  Second one, with a\nbreak! Third\tand last\n"
    assert _units(text) == ["First sentence here.", "Second one, with a break!", "Third and last"]
    assert _replace_units(text, {}) == text
    assert _replace_units(text, {1: "NEW."}) == " First sentence here.\n  NEW. Third\tand last\n"
    assert _replace_units(text, {2: "End."}) == " First sentence here.\n  Second one, with a\nbreak! End.\n"


def test_paraphrase_keeps_the_leading_space_and_unrewritten_sentences(micro_qwen, tokenizer):
    text = " The committee met on Tuesday.\nThe vote was postponed. Nobody objected."
    cfg = AttackConfig(name="paraphrase", strength=0.34, paraphrase_max_new_tokens=6)
    for seed in range(3):
        [out] = apply_attack([text], cfg, tokenizer=tokenizer, model=micro_qwen, seed=seed)
        assert out.startswith(" ")
        j = int(_rng(seed, "paraphrase", 0).choice(3, size=1, replace=False)[0])
        sentences = ["The committee met on Tuesday.", "The vote was postponed.", "Nobody objected."]
        for other in set(range(3)) - {j}:
            assert sentences[other] in out
        if j != 0:  # the first sentence untouched: the text starts exactly as before
            assert out.startswith(" The committee met on Tuesday.\n")
