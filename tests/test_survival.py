"""Survival diagnostics: alignment of a text and its edit, and what each scheme's context keeps."""

import numpy as np
import pytest

from moewm.config import AttackConfig, EncoderConfig, ExtractorConfig, GenerationConfig, KGWConfig, SynthIDConfig, WatermarkConfig
from moewm.engine.positions import PositionContexts
from moewm.evaluation.attacked import edited_captures, survival_of
from moewm.evaluation.attacks import attack_token_ids
from moewm.evaluation.survival import edit_distance, survival_metrics, survived_pairs
from moewm.schemes.kgw import KGWWatermark
from moewm.schemes.moe_lsh import MoELSHWatermark
from moewm.schemes.synthid import SynthIDWatermark


def test_a_substitution_breaks_the_token_and_the_one_after_it():
    a = list(range(10, 30))
    b = list(a)
    b[7] = 99
    i, j = survived_pairs(a, b)
    assert list(i) == list(j) == [k for k in range(20) if k not in (7, 8)]
    assert list(edit_distance(j, len(b))) == [np.inf] * 7 + list(range(2, 13))


def test_a_deletion_keeps_everything_before_it_in_place_and_shifts_the_rest():
    a = list(range(10, 30))
    b = a[:5] + a[8:]  # three tokens deleted
    i, j = survived_pairs(a, b)
    assert list(i[:5]) == list(j[:5]) == [0, 1, 2, 3, 4]
    assert 8 not in i  # the first token after the gap has a new previous token
    assert list(i[5:]) == list(range(9, 20)) and list(j[5:]) == list(range(6, 17))
    assert list(edit_distance(j, len(b))[5:]) == list(range(2, 13))


def test_an_edit_of_the_first_token_and_an_insertion():
    a = [5, 6, 7, 8]
    i, j = survived_pairs(a, [9, 6, 7, 8])
    assert list(i) == [2, 3]
    i, j = survived_pairs(a, [5, 6, 1, 7, 8])
    assert list(zip(i, j)) == [(0, 0), (1, 1), (3, 4)]
    assert survived_pairs(a, [])[0].size == 0


def _ctx(tokens, context, green, bits=True):
    n = len(tokens)
    context = np.asarray(context)
    return PositionContexts(positions=np.arange(n), tokens=np.asarray(tokens), context=context, green_list=context,
                            green=np.asarray(green, dtype=bool)[:, None], scored=np.ones(n, dtype=bool),
                            evidence=np.asarray(green, dtype=float), bits=bits)


def test_shares_are_pooled_counts_at_survived_positions_only():
    tokens = [1, 2, 3, 4, 5, 6]
    sig = np.zeros((6, 4), dtype=bool)
    before = _ctx(tokens, sig, [1, 1, 1, 0, 1, 1])
    edited = [1, 2, 9, 4, 5, 6]  # positions 2 (edited) and 3 (its previous token edited) did not survive
    sig2 = sig.copy()
    sig2[4, 0] = True  # one flipped bit at position 4
    sig2[2, :] = True  # at the edited position: not compared
    after = _ctx(edited, sig2, [1, 1, 0, 0, 0, 1])
    m = survival_metrics([before], [after], [tokens], [edited], suffix="_x")
    assert m["survival_positions_x"] == pytest.approx(4 / 6)
    assert m["survival_signature_x"] == pytest.approx(3 / 4)
    assert m["survival_bitflip_x"] == pytest.approx(1 / 16)
    assert m["survival_green_x"] == pytest.approx(3 / 4)  # green before at survived 0, 1, 4, 5; 4 is not green after
    assert m["survival_signature_distbefore_x"] == 1.0 and m["survival_count_distbefore_x"] == 2
    assert m["survival_signature_dist2_x"] == 0.0 and m["survival_signature_dist3to4_x"] == 1.0
    assert m["evidence_per_token_clean"] == pytest.approx(5 / 6) and m["evidence_per_token_attacked_x"] == pytest.approx(3 / 6)
    assert m["evidence_changed_clean_x"] == 1.0 and m["evidence_changed_attacked_x"] == 0.0  # position 4: its context changed
    # a text the edit emptied counts as lost: no survived position, the clean evidence still counts
    lost = survival_metrics([before], [None], [tokens], [[]])
    assert lost["survival_positions"] == 0.0 and "survival_signature" not in lost  # nothing to count: left out, not NaN


@pytest.fixture(scope="module")
def texts(micro_qwen, tokenizer):
    from moewm.engine.keys import WatermarkKey

    wm = MoELSHWatermark(micro_qwen, tokenizer, ExtractorConfig(), EncoderConfig(num_bits=16, pool_size=8),
                         WatermarkConfig(delta=4.0, reference_keys=19, alpha=0.05), WatermarkKey("survival-test", 0), cache_dir=None)
    prompts = [wm.encode_prompt(p) for p in ["The quick brown fox", "Once upon a time", "def main():"]]
    ids = wm.generate_from_ids(prompts, GenerationConfig(max_new_tokens=40, min_new_tokens=40))
    yield wm, prompts, ids
    wm.close()


def test_moe_lsh_contexts_agree_with_its_detector_and_need_no_forward(texts, micro_qwen):
    wm, prompts, ids = texts
    caps = wm.capture(ids, prompts)
    det = wm.score(caps)
    calls = []
    handle = micro_qwen.register_forward_hook(lambda *a: calls.append(1))
    try:
        ctx = wm.position_contexts(caps)
    finally:
        handle.remove()
    assert not calls
    for c, cap, text, n_green, n in zip(ctx, caps, ids, det.num_green_tokens, det.num_tokens_scored):
        assert c.bits and c.context.shape == (cap.num_scored, 16)
        assert (np.asarray(text)[c.positions] == c.tokens).all()  # positions index the text ids
        assert int((c.green[:, 0] & c.scored).sum()) == n_green and int(c.scored.sum()) == n
        # the signature is the deployed key's: the generation-time encoder gives the same bits
        assert (wm.encoder.signature(cap.features).numpy() == c.context).all()


def test_moe_lsh_an_edit_changes_no_signature_before_it_and_strength_zero_keeps_all(texts):
    wm, prompts, ids = texts
    caps = wm.capture(ids, prompts)
    for strength in (0.0, 0.2):
        att = attack_token_ids(ids, AttackConfig(name="substitution", strength=strength), tokenizer=wm.tokenizer, model=wm.model)
        new = edited_captures(wm, caps, att, prompts, [a != b for a, b in zip(att, ids)])
        m = survival_of(wm, caps, new, ids, att)
        assert m["survival_signature_distbefore"] == 1.0  # a causal model: nothing before the first edit moves
        if strength == 0:
            assert m["survival_positions"] == m["survival_signature"] == m["survival_green"] == 1.0 and m["survival_bitflip"] == 0.0
            assert m["evidence_per_token_attacked"] == m["evidence_per_token_clean"]
        else:
            assert m["survival_positions"] < 1.0 and 0.0 <= m["survival_bitflip"] <= 1.0


def test_ngram_contexts_survive_exactly_beyond_their_width(texts, micro_qwen, tokenizer):
    from moewm.engine.keys import WatermarkKey

    _, prompts, ids = texts
    key = WatermarkKey("survival-test", 0)
    att = attack_token_ids(ids, AttackConfig(name="substitution", strength=0.1), tokenizer=tokenizer, model=micro_qwen, seed=3)
    kgw = KGWWatermark(micro_qwen, tokenizer, WatermarkConfig(delta=2.0, kgw=KGWConfig(context_width=1)), key)
    m = survival_of(kgw, kgw.capture(ids, prompts), kgw.capture(att, prompts), ids, att)
    assert m["survival_signature"] == m["survival_green"] == 1.0  # context: the previous token, which survived
    assert "survival_bitflip" not in m
    syn = SynthIDWatermark(micro_qwen, tokenizer, WatermarkConfig(synthid=SynthIDConfig(ngram_len=4)), key)
    m = survival_of(syn, syn.capture(ids, prompts), syn.capture(att, prompts), ids, att)
    # the context is the 3 tokens before: it holds the edit at d = 2, 3 and never from d = 4 on
    assert m["survival_signature_dist2"] == 0.0 and m["survival_signature_dist3to4"] < 1.0
    assert m["survival_signature_dist5to8"] == 1.0 and m["survival_signature_distbefore"] == 1.0
    kgw_ctx = kgw.position_contexts(kgw.capture(ids, prompts))
    assert all((c.context[1:, 0] == np.asarray(t)[c.positions[1:] - 1]).all() for c, t in zip(kgw_ctx, ids))


def test_moe_lsh_contexts_with_the_previous_token_hybrid_match_its_detector(micro_qwen, tokenizer):
    """encoder.context_tokens=1 keys green lists by the previous token too: the diagnostics must pass it on
    (the design search's hybrid points failed in every attacked row when they did not)."""
    from moewm.engine.keys import WatermarkKey

    wm = MoELSHWatermark(micro_qwen, tokenizer, ExtractorConfig(),
                         EncoderConfig(num_bits=16, pool_size=8, context_tokens=1, green_lists="vote", vote_lists=5),
                         WatermarkConfig(delta=4.0, reference_keys=19, alpha=0.05), WatermarkKey("survival-test", 1), cache_dir=None)
    try:
        prompts = [wm.encode_prompt(p) for p in ["The quick brown fox", "def main():"]]
        ids = wm.generate_from_ids(prompts, GenerationConfig(max_new_tokens=32, min_new_tokens=32))
        caps = wm.capture(ids, prompts)
        det = wm.score(caps)
        for c, n_green, n in zip(wm.position_contexts(caps), det.num_green_tokens, det.num_tokens_scored):
            assert int((c.green[:, 0] & c.scored).sum()) == n_green and int(c.scored.sum()) == n
        att = attack_token_ids(ids, AttackConfig(name="substitution", strength=0.2), tokenizer=tokenizer, model=micro_qwen)
        m = survival_of(wm, caps, edited_captures(wm, caps, att, prompts, [a != b for a, b in zip(att, ids)]), ids, att)
        assert m["survival_signature_distbefore"] == 1.0 and 0.0 <= m["survival_green"] <= 1.0
    finally:
        wm.close()
