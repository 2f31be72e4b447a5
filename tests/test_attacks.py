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
