"""The routing-keyed tournament (watermark.kind=moe_tournament): locality of its keys, the tournament itself,
its config errors, detection of its text on tiny_moe, and valid p-values on text written without the key."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pytest
import torch
from scipy.stats import binom, kstest
from transformers.generation.logits_process import SynthIDTextWatermarkLogitsProcessor

from composing import app_config
from moewm.app.schema import validate_app
from moewm.config import (
    ConfigError,
    EncoderConfig,
    ExtractorConfig,
    GenerationConfig,
    ModelConfig,
    TournamentConfig,
    WatermarkConfig,
    routing_free_twin,
)
from moewm.engine.keys import WatermarkKey
from moewm.engine.tournament import NO_TOKEN, TournamentKey, context_codes, g_values, layer_blocks, token_hash, tokens_before, tokens_hash

SECRET = "tournament-test-secret"


def _key(num_bits: int = 32, layers: int = 20, block_bits: int = 4, vocab: int = 300, special: tuple[int, ...] = (),
         context_tokens: int = 0, routing_layers: Optional[int] = None) -> TournamentKey:
    usable = torch.ones(vocab, dtype=torch.bool)
    usable[list(special)] = False
    return TournamentKey(torch.tensor(0x1234567), num_bits, layers, block_bits, usable, context_tokens, routing_layers)


def test_a_flipped_signature_bit_changes_only_the_layers_whose_block_holds_it():
    key = _key(block_bits=4)
    blocks = layer_blocks(32, 20, 4)
    bits = torch.rand(64, 32, generator=torch.Generator().manual_seed(0)) > 0.5
    base = key.contexts(bits)
    for i in (0, 5, 31):
        flipped = bits.clone()
        flipped[:, i] = ~flipped[:, i]
        changed = (key.contexts(flipped) != base).all(0)  # (m,): the layer's context changed for every row
        holds = (blocks == i).any(1)
        assert torch.equal(changed, holds), (i, changed, holds)
        assert (key.contexts(flipped) == base)[:, ~holds].all()
        assert 2 <= int(holds.sum()) <= 3  # 80 bit slots over 32 bits
    whole = _key(block_bits=32)  # one block = the whole signature: any flip changes every layer
    flipped = bits.clone()
    flipped[:, 7] = ~flipped[:, 7]
    assert (whole.contexts(flipped) != whole.contexts(bits)).all()


def test_with_the_previous_token_in_the_context_every_layer_moves_with_that_token_and_blocks_stay_distinct():
    """encoder.context_tokens=1: (block code, previous token) keys each layer. A different previous token gives
    every layer a fresh context; for one token, distinct block codes stay distinct (no collision by design)."""
    key = _key(block_bits=8, context_tokens=1)
    bits = torch.rand(64, 32, generator=torch.Generator().manual_seed(3)) > 0.5
    prev = torch.randint(0, 300, (64, 1), generator=torch.Generator().manual_seed(4))
    base = key.contexts(bits, prev)
    assert torch.equal(base, key.contexts(bits, prev.clone()))
    assert (key.contexts(bits, (prev + 1) % 300) != base).all()
    assert (base != _key(block_bits=8).contexts(bits)).all()  # not the routing-only contexts
    codes = torch.arange(1 << 16).view(-1, 1)
    assert context_codes(codes, torch.full((1 << 16, 1), 17)).unique().numel() == 1 << 16
    assert torch.equal(context_codes(codes), codes)
    with pytest.raises(ValueError, match="context_tokens=1"):
        key.contexts(bits)


def test_with_two_tokens_before_each_layer_moves_with_either_token_and_one_token_keys_as_before():
    """encoder.context_tokens=2: (block code, token two before, previous token). Changing either token gives
    every layer a fresh context; the previous token alone keys exactly as with context_tokens=1, and a
    wider window of tokens is cut to the last two (what generation passes is input_ids' tail)."""
    key2, key1 = _key(block_bits=8, context_tokens=2), _key(block_bits=8, context_tokens=1)
    bits = torch.rand(64, 32, generator=torch.Generator().manual_seed(3)) > 0.5
    before = torch.randint(0, 300, (64, 2), generator=torch.Generator().manual_seed(5))
    base = key2.contexts(bits, before)
    assert torch.equal(base, key2.contexts(bits, torch.cat([torch.zeros(64, 3, dtype=torch.long), before], 1)))
    for column in (0, 1):
        moved = before.clone()
        moved[:, column] = (moved[:, column] + 1) % 300
        assert (key2.contexts(bits, moved) != base).all()
    assert (base != key1.contexts(bits, before[:, 1:])).all()
    assert torch.equal(key1.contexts(bits, before[:, 1:]), key1.contexts(bits, before))
    assert torch.equal(tokens_before(torch.tensor([[7], [8]]), 2), torch.tensor([[NO_TOKEN, 7], [NO_TOKEN, 8]]))
    with pytest.raises(ValueError, match=r"context_tokens=2\): pass them as a \(B, 2\) tensor"):
        key2.contexts(bits, before[:, 1:])


def test_only_the_routed_layers_move_with_the_routing_and_the_twin_is_keyed_by_the_tokens_alone():
    """routing_layers=r: the first r layers' contexts hold the routing block, the others only the tokens before;
    r = 0 (the routing-free twin) makes every layer blind to the signature, r = layers is the routing design."""
    bits = torch.rand(64, 32, generator=torch.Generator().manual_seed(3)) > 0.5
    other = torch.rand(64, 32, generator=torch.Generator().manual_seed(8)) > 0.5
    before = torch.randint(0, 300, (64, 2), generator=torch.Generator().manual_seed(5))
    full, none = _key(block_bits=8, context_tokens=2), _key(block_bits=8, context_tokens=2, routing_layers=20)
    assert torch.equal(full.contexts(bits, before), none.contexts(bits, before))
    twin = _key(block_bits=8, context_tokens=2, routing_layers=0)
    assert torch.equal(twin.contexts(bits, before), twin.contexts(other, before))
    assert (twin.contexts(bits, before) != full.contexts(bits, before)).all()
    moved = before.clone()
    moved[:, 1] = (moved[:, 1] + 1) % 300
    assert (twin.contexts(bits, moved) != twin.contexts(bits, before)).all()  # still keyed by the tokens
    assert _key(block_bits=4, context_tokens=2, routing_layers=0).contexts(bits, before).equal(twin.contexts(bits, before))  # b is moot
    half = _key(block_bits=8, context_tokens=2, routing_layers=7)
    same = half.contexts(bits, before) == half.contexts(other, before)  # (B, m)
    assert same[:, 7:].all() and not same[:, :7].all(0).any()
    assert torch.equal(half.contexts(bits, before)[:, :7], full.contexts(bits, before)[:, :7])
    assert torch.equal(half.contexts(bits, before)[:, 7:], twin.contexts(bits, before)[:, 7:])


def test_with_routed_contexts_only_the_listed_token_contexts_read_the_routing():
    """routed_contexts: a position whose tokens before are listed is keyed as the routing design keys it, any other
    as the twin does (blind to the signature); the list holds tokens_hash values of the c tokens before."""
    bits = torch.rand(64, 32, generator=torch.Generator().manual_seed(3)) > 0.5
    other = torch.rand(64, 32, generator=torch.Generator().manual_seed(8)) > 0.5
    before = torch.randint(0, 300, (64, 2), generator=torch.Generator().manual_seed(5))
    listed = torch.sort(tokens_hash(before[::3])).values  # every third position's pair
    common = _key(block_bits=8, context_tokens=2)
    common.routed_contexts = listed
    full, twin = _key(block_bits=8, context_tokens=2), _key(block_bits=8, context_tokens=2, routing_layers=0)
    routed = torch.isin(tokens_hash(before), listed)
    assert routed[::3].all() and not routed.all()
    got = common.contexts(bits, before)
    assert torch.equal(got[routed], full.contexts(bits, before)[routed])
    assert torch.equal(got[~routed], twin.contexts(bits, before)[~routed])
    assert torch.equal(common.contexts(other, before)[~routed], got[~routed])
    assert (common.contexts(other, before)[routed] != got[routed]).any()


def test_routed_contexts_are_the_most_frequent_token_pairs_of_the_reference_corpora(tiny):
    """context_counts against a plain count over the same corpora, and common_contexts its sorted head."""
    from collections import Counter

    from moewm.null_corpora import HELD_OUT_CORPORA, human_texts
    from moewm.schemes.common_contexts import REFERENCE_CORPORA, common_contexts, context_counts

    _, tok = tiny
    counter: Counter = Counter()
    for name in REFERENCE_CORPORA:
        for text in human_texts(name):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) > 1:  # a context is its 32-bit hash, as the detector keys it (distinct pairs may share one)
                counter.update(tokens_hash(torch.tensor(list(zip(ids, ids[1:])))).tolist())
    hashes, counts = context_counts(tok, 2)
    assert int(counts.sum()) == sum(counter.values()) and hashes.numel() == len(counter)
    top = counter.most_common(50)
    assert counts[:50].tolist() == [c for _, c in top]
    assert set(hashes[:40].tolist()) <= {h for h, _ in top}  # ties at the 50th edge aside
    table = common_contexts(tok, 2, 100)
    assert torch.equal(table, torch.sort(hashes[:100]).values)
    assert not set(HELD_OUT_CORPORA) & set(REFERENCE_CORPORA)  # the held-out corpora stay unseen


def test_routed_contexts_are_checked_before_weights_load():
    with pytest.raises(ConfigError, match=r"watermark.tournament.routed_contexts=0: allowed range is \[1, 1000000\]"):
        validate_app(app_config(["watermark.tournament.routed_contexts=0"]))
    with pytest.raises(ConfigError, match=r"routed_contexts=64 needs watermark.tournament.context_tokens >= 1"):
        validate_app(app_config(["watermark.tournament.routed_contexts=64", "watermark.tournament.context_tokens=0"]))
    with pytest.raises(ConfigError, match=r"routed_contexts=64 needs watermark.tournament.routing_layers > 0"):
        validate_app(app_config(["watermark.tournament.routed_contexts=64", "watermark.tournament.routing_layers=0"]))
    validate_app(app_config(["watermark.tournament.routed_contexts=4096"]))
    twin, _ = routing_free_twin(WatermarkConfig(tournament=TournamentConfig(routed_contexts=64)))
    assert twin.tournament.routing_layers == 0 and twin.tournament.routed_contexts is None
    twin.validate()


def test_routing_layers_are_checked_before_weights_load():
    with pytest.raises(ConfigError, match=r"watermark.tournament.routing_layers=21: allowed range is \[0, 20\]"):
        validate_app(app_config(["watermark.tournament.routing_layers=21"]))
    with pytest.raises(ConfigError, match=r"watermark.tournament.routing_layers=-1: allowed range is \[0, 20\]"):
        validate_app(app_config(["watermark.tournament.routing_layers=-1"]))
    with pytest.raises(ConfigError, match=r"routing_layers=0 needs watermark.tournament.context_tokens >= 1"):
        validate_app(app_config(["watermark.tournament.routing_layers=0", "watermark.tournament.context_tokens=0"]))
    for r in ("0", "10", "20", "null"):
        validate_app(app_config([f"watermark.tournament.routing_layers={r}"]))


def test_the_green_list_twin_is_checked_before_weights_load():
    """encoder.routing_free is MoE-LSH's twin: it needs the token before, takes no margins (they are the routing's) and
    no geometry (no hyperplanes), and the tournament names its own twin setting instead."""
    twin = ["watermark=moe_lsh", "encoder.green_lists=hashed", "encoder.context_tokens=1", "encoder.routing_free=true"]
    validate_app(app_config(twin))
    with pytest.raises(ConfigError, match=r"encoder.routing_free=true needs encoder.context_tokens=1"):
        validate_app(app_config(["watermark=moe_lsh", "encoder.routing_free=true"]))
    with pytest.raises(ConfigError, match=r"watermark.margin_bits=2 with encoder.routing_free=true: allowed value is 0"):
        validate_app(app_config(twin + ["watermark.margin_bits=2"]))
    with pytest.raises(ConfigError, match=r"eval.geometry=true with encoder.routing_free=true: .*allowed value is eval.geometry=false"):
        validate_app(app_config(twin + ["eval.geometry=true"]))
    with pytest.raises(ConfigError, match=r"encoder.routing_free=true: allowed value is false with watermark.kind=moe_tournament .*"
                                          r"watermark.tournament.routing_layers=0"):
        validate_app(app_config(["watermark=moe_tournament", "encoder.green_lists=hashed", "encoder.context_tokens=1", "encoder.routing_free=true"]))


def test_the_tournaments_token_context_is_its_own_setting_checked_before_weights_load():
    with pytest.raises(ConfigError, match=r"watermark.tournament.context_tokens=3: allowed values are 0, 1, 2"):
        validate_app(app_config(["watermark=moe_tournament", "watermark.tournament.context_tokens=3"]))
    with pytest.raises(ConfigError, match=r"encoder.context_tokens=1: allowed value is 0 with watermark.kind=moe_tournament .*"
                                          r"watermark.tournament.context_tokens"):
        validate_app(app_config(["watermark=moe_tournament", "encoder.context_tokens=1"]))
    with pytest.raises(ConfigError, match=r"encoder.context_tokens=2: allowed values are 0, 1"):
        validate_app(app_config(["watermark=moe_lsh", "encoder.context_tokens=2"]))
    for context in (0, 1, 2):
        validate_app(app_config(["watermark=moe_tournament", f"watermark.tournament.context_tokens={context}"]))
    validate_app(app_config(["watermark=moe_lsh", "encoder.context_tokens=1", "watermark.tournament.context_tokens=0"]))
    with pytest.raises(ConfigError, match=r"eval.geometry=true: .* allowed with watermark.kind='moe_lsh'"):
        validate_app(app_config(["eval.geometry=true"]))  # the default scheme has no green lists to measure
    validate_app(app_config(["watermark=moe_lsh", "eval.geometry=true"]))


def test_the_g_values_of_one_context_split_the_vocabulary_in_half():
    ctx = _key().contexts(torch.rand(8, 32, generator=torch.Generator().manual_seed(1)) > 0.5)
    g = g_values(ctx[:, :, None], token_hash(torch.arange(50_000)).view(1, 1, -1)).double()
    share = g.mean(-1)
    assert ((share - 0.5).abs() < 0.02).all(), share
    assert ctx.shape == (8, 20)
    # layers of one position are not copies of each other
    agree = (g[:, :-1] == g[:, 1:]).double().mean()
    assert abs(float(agree) - 0.5) < 0.02


def test_the_tournament_is_synthids_closed_form_and_special_tokens_keep_their_mass():
    vocab, special = 300, (0, 7, 299)
    key = _key(vocab=vocab, special=special)
    scores = torch.randn(4, vocab, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    bits = torch.rand(4, 32, generator=torch.Generator().manual_seed(3)) > 0.5
    probs = torch.softmax(scores, -1)
    out = key.sample_distribution(probs, bits)
    assert torch.allclose(out.sum(-1), torch.ones(4, dtype=torch.float64))
    assert torch.equal(out[:, list(special)], probs[:, list(special)])  # neither gained nor lost
    # the usable part is transformers' SynthID update on the renormalised usable distribution, with our g-values
    usable = key.usable
    ctx = key.contexts(bits)
    g = g_values(ctx[:, None, :], token_hash(torch.arange(vocab)).view(1, -1, 1)).double()  # (B, V, m)
    logits = torch.log(probs[:, usable] / probs[:, usable].sum(-1, keepdim=True))
    reference = torch.exp(SynthIDTextWatermarkLogitsProcessor.update_scores(None, logits, g[:, usable]))
    mine = out[:, usable] / out[:, usable].sum(-1, keepdim=True)
    assert torch.allclose(mine, reference, atol=1e-12)
    # the watermark moves mass to g = 1 tokens at every layer
    first = g[:, :, 0][:, usable]
    assert ((mine * first).sum(-1) > (torch.exp(logits) * first).sum(-1)).all()


def test_a_layer_whose_context_repeats_is_not_played_nor_scored():
    """SynthID's repeated-context rule, per layer: generation leaves the distribution alone for layers not
    played, and detection scores a (layer, context) only at its first occurrence in the text."""
    from moewm.engine.scoring import CaptureBatch
    from moewm.engine.tournament import TournamentScorer

    key = _key()
    probs = torch.softmax(torch.randn(2, 300, generator=torch.Generator().manual_seed(6), dtype=torch.float64), -1)
    bits = torch.rand(2, 32, generator=torch.Generator().manual_seed(7)) > 0.5
    idle = torch.zeros(2, 20, dtype=torch.bool)
    assert torch.allclose(key.sample_distribution(probs, bits, idle), probs, atol=1e-15)
    some = idle.clone()
    some[:, 3] = True
    assert not torch.allclose(key.sample_distribution(probs, bits, some), probs)
    codes = torch.tensor([[3, 3, 5, 3, 5, 7]]).view(1, 1, 6, 1)  # (R, B, n, m): one key, text and layer
    batch = CaptureBatch(torch.zeros(1, 6, 1), torch.tensor([[9, 10, 9, 9, 11, 12]]), torch.zeros(1, 6, 1, dtype=torch.long),
                         torch.zeros(1, 6, 1), torch.ones(1, 6), torch.ones(1, 6, dtype=torch.bool))
    skip = TournamentScorer(32, 1, 4, "green", True, 300, skip_repeated=True).scored_units(batch, codes)
    assert skip.view(-1).tolist() == [True, False, True, False, False, True]
    units = TournamentScorer(32, 1, 4, "green", True, 300, skip_repeated=False).scored_units(batch, codes)
    assert units.view(-1).tolist() == [True, True, True, False, True, True]  # (layer code, token) (3, 9) again
    assert TournamentScorer(32, 1, 4, "green", False, 300).scored_units(batch, codes).all()


def test_process_scores_samples_the_tournament_of_the_tempered_distribution():
    key = _key()
    scores = torch.randn(3, 300, generator=torch.Generator().manual_seed(4))
    scores[0, 5] = float("-inf")  # a token an earlier processor forbade stays forbidden
    bits = torch.rand(3, 32, generator=torch.Generator().manual_seed(5)) > 0.5
    t = 0.7
    processed = key.process_scores(scores, bits, temperature=t)
    sampled = torch.softmax(processed.double() / t, -1)  # what transformers' temperature warper then does
    expected = key.sample_distribution(torch.softmax(scores.double() / t, -1), bits)
    assert torch.allclose(sampled, expected, atol=1e-6)
    assert sampled[0, 5] == 0


def test_tournament_settings_out_of_range_are_refused_naming_key_and_range():
    with pytest.raises(ConfigError, match=r"watermark.tournament.layers=0: allowed range is \[1, 64\]"):
        WatermarkConfig(tournament=TournamentConfig(layers=0)).validate()
    with pytest.raises(ConfigError, match=r"watermark.tournament.layers=65: allowed range is \[1, 64\]"):
        WatermarkConfig(tournament=TournamentConfig(layers=65)).validate()
    with pytest.raises(ConfigError, match=r"watermark.tournament.block_bits=33: allowed range is \[1, 32\]"):
        WatermarkConfig(tournament=TournamentConfig(block_bits=33)).validate()
    # against the encoder, before any weights load
    with pytest.raises(ConfigError, match=r"watermark.tournament.block_bits=16: allowed range is \[1, 8\] \(at most encoder.num_bits=8"):
        validate_app(app_config(["watermark=moe_tournament", "encoder.num_bits=8", "watermark.tournament.block_bits=16"]))
    validate_app(app_config(["watermark=moe_tournament", "encoder.num_bits=8", "watermark.tournament.block_bits=8"]))
    # another scheme ignores the tournament's settings
    validate_app(app_config(["watermark=moe_lsh", "encoder.num_bits=8", "watermark.tournament.block_bits=16"]))


# -- tiny_moe ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from moewm.models.loading import load_model

    return load_model(ModelConfig())


def _wm(tiny, seed: int, encoder: Optional[EncoderConfig] = None, **watermark):
    from moewm.schemes.moe_tournament import MoETournamentWatermark

    model, tok = tiny
    cfg = WatermarkConfig(kind="moe_tournament", statistic=watermark.pop("statistic", "green"), **watermark)
    return MoETournamentWatermark(model, tok, ExtractorConfig(), encoder or EncoderConfig(), cfg, WatermarkKey(SECRET, seed), cache_dir=None)


@pytest.mark.parametrize("context_tokens,routing_layers,routed_contexts",
                         [(0, None, None), (1, None, None), (2, None, None), (2, 0, None), (2, 7, None), (2, None, 4096)])
def test_generation_and_detection_read_the_same_g_values(tiny, context_tokens, routing_layers, routed_contexts):
    """The detector's contexts (bank signatures of the captured features, and the captured tokens before) are
    the processor's (the encoder's signature of the same features, and input_ids[:, -c:] at that step): a drift
    between the two would silently halve the evidence."""
    prompts = open("conf/data/prompts.txt").read().splitlines()[:2]
    tournament = TournamentConfig(block_bits=4, context_tokens=context_tokens, routing_layers=routing_layers, routed_contexts=routed_contexts)
    with _wm(tiny, 1, tournament=tournament) as wm:
        prompt_ids, ids = wm.generate_ids(prompts, GenerationConfig(max_new_tokens=12, min_new_tokens=12))
        caps = wm.capture(ids, prompt_ids)
        from moewm.engine.scoring import CaptureBatch

        batch = CaptureBatch.stack(caps)
        _, detect_ctx = wm.scorer.contexts(batch, wm._true_tables)
        valid = batch.valid.reshape(-1)
        before = batch.tokens_before(context_tokens).reshape(-1, context_tokens) if context_tokens else None
        gen_ctx = wm.logits_processor.tournament.contexts(wm.encoder.signature(batch.features).reshape(-1, 32), before)
        assert torch.equal(detect_ctx[0].reshape(-1, 20)[valid], gen_ctx[valid])
        full = [list(p) + list(t) for p, t in zip(prompt_ids, ids)]
        expect = torch.tensor([row[len(p) - 1 + j] for p, t, row in zip(prompt_ids, ids, full) for j in range(len(t))])
        assert torch.equal(batch.previous[batch.valid], expect)  # the token before each scored one
        two_before = torch.tensor([row[len(p) - 2 + j] for p, t, row in zip(prompt_ids, ids, full) for j in range(len(t))])
        assert torch.equal(batch.earlier[batch.valid], two_before)


def test_survival_contexts_are_the_tournaments_own_g_values_not_moe_lshs_pools(tiny):
    """The diagnostics read the tournament's draws: one g-value per layer, keyed by the layer's block code;
    with nothing skipped their sum is the detector's green count, and watermarked text has positive evidence."""
    prompts = open("conf/data/prompts.txt").read().splitlines()[:3]
    from moewm.config import TournamentConfig as T

    with _wm(tiny, 3, ignore_repeated=False, tournament=T(layers=20, block_bits=8, context_tokens=0, skip_repeated=False)) as wm:
        prompt_ids, ids = wm.generate_ids(prompts, GenerationConfig(max_new_tokens=24, min_new_tokens=24))
        caps = wm.capture(ids, prompt_ids)
        det = wm.score(caps)
        ctx = wm.position_contexts(caps)
    for c, n_green, n in zip(ctx, det.num_green_tokens, det.num_tokens_scored):
        assert c.green.shape == (len(c), 20) and c.green_list.shape == (len(c), 20) and c.context.shape[1] == 32
        assert int(c.green_list.max()) < 2 ** 8
        assert int(c.green[c.scored].sum()) == n_green and int(c.scored.sum()) == n
        assert c.evidence[c.scored].mean() > 0.3  # g-values well above their null mean: the tournament's pull


@pytest.mark.parametrize("statistic,context_tokens", [("green", 0), ("llr", 0), ("green", 1), ("green", 2)])
def test_tournament_text_is_detected_at_the_floor_within_a_few_dozen_tokens(tiny, statistic, context_tokens):
    prompts = open("conf/data/prompts.txt").read().splitlines()[:4]
    gen = GenerationConfig(max_new_tokens=48, min_new_tokens=48, batch_size=4)
    with _wm(tiny, 2, statistic=statistic, statistic_top_k=16, tournament=TournamentConfig(block_bits=4, context_tokens=context_tokens)) as wm:
        prompt_ids, ids = wm.generate_ids(prompts, gen)
        _, plain = wm.generate_ids(prompts, gen, watermark=False)
        out = wm.detect_ids(ids + plain, prompt_ids + prompt_ids)
    p = out.p_value
    assert (p[:4] <= 1e-2).all() and (p[:4] <= 1e-3).sum() >= 3, p  # green, key 2: 0.002 0.001 0.001 0.001 at 48 tokens
    assert (p[4:] > 1e-2).sum() >= 3, p
    assert (out.num_reference_keys[:4] == 999).all()
    assert (out.green_fraction[:4] > 0.6).all() and (np.abs(out.green_fraction[4:] - 0.5) < 0.1).all(), out.green_fraction


@pytest.fixture(scope="module")
def null_captures(tiny):
    """Unwatermarked text of three origins (temperature-1 samples, two human corpora), captured once."""
    from moewm.engine.generation import encode_prompt, generate_batched
    from moewm.null_corpora import human_texts

    model, tok = tiny
    prompts = open("conf/data/prompts.txt").read().splitlines()[:32]
    prompt_ids = [encode_prompt(tok, p) for p in prompts]
    plain = generate_batched(model, tok, prompt_ids, GenerationConfig(max_new_tokens=40, min_new_tokens=32, batch_size=16, sampling_seed=9), [])
    texts, contexts, origin = list(plain), list(prompt_ids), ["plain"] * len(plain)
    for corpus, count in (("human_docstrings", 84), ("kjv_narrative", 84)):
        ids = [list(tok(t, add_special_tokens=False)["input_ids"])[:48] for t in human_texts(corpus, count)]
        texts += ids
        contexts += [[] for _ in ids]
        origin += [corpus] * len(ids)
    keep = [i for i, t in enumerate(texts) if len(t) > 0]
    with _wm(tiny, 0) as wm:
        return wm.capture([texts[i] for i in keep], [contexts[i] for i in keep]), np.array(origin)[keep]


def test_tournament_p_values_are_uniform_over_keys_on_text_written_without_the_key(tiny, null_captures):
    """Each text under its own deployed key, ranked among the same 199 reference keys: exactly uniform on
    {1/200, ..., 1} whatever wrote the text. Salts or hyperplanes of the reference keys drawn unlike the
    deployed key's, or a statistic read differently for the two, make it fail."""
    from moewm.engine.keybank import build_bank
    from moewm.engine.scoring import BankTables, CaptureBatch, calibrated

    captures, origin = null_captures
    model, _ = tiny
    with _wm(tiny, 0, reference_keys=199, alpha=0.01) as wm:
        ref = wm.reference_tables()
        keys = [WatermarkKey(SECRET, 100 + i) for i in range(len(captures))]
        bank = build_bank(wm.encoder_cfg, keys, wm.capture_hooks.dim, model.get_input_embeddings().weight, wm.encoder.usable, wm.vocab_size)
        tables = BankTables.of(bank)
        p = np.array([calibrated(CaptureBatch.stack([c]), tables.select(i, i + 1), ref, wm.statistic_spec, stop_after=None,
                                 draws=wm.scorer.draws).p_value[0] for i, c in enumerate(captures)])
    assert len(p) >= 180
    for q in (0.01, 0.05, 0.2, 0.5):
        k, n = int((p <= q + 1e-12).sum()), len(p)
        assert binom.ppf(0.0005, n, q) <= k <= binom.ppf(0.9995, n, q), (q, k, n)
    assert kstest(p, "uniform").pvalue > 1e-3
    for name in np.unique(origin):
        n = int((origin == name).sum())
        assert int((p[origin == name] <= 0.05).sum()) <= binom.ppf(0.9995, n, 0.05), name


@pytest.mark.parametrize("kind", ["moe_tournament", "moe_lsh"])
def test_many_deployed_keys_share_the_reference_keys_and_get_each_keys_own_p_values(tiny, null_captures, kind):
    """score_keys (the validity study's K deployed keys, reference keys scored once) gives, text by text, the p-value
    that a watermarker built with that key gives: the same Besag-Clifford stop, NaN under min_tokens, watermarked
    text included (its key and another)."""
    from moewm.schemes.registry import build_watermarker

    model, tok = tiny
    captures = list(null_captures[0][:40])
    cfg = WatermarkConfig(kind=kind, reference_keys=99, alpha=0.01, min_tokens=36)  # some of the 32-40-token samples fall short
    keys = [WatermarkKey(SECRET, s) for s in (3, 4, 5)]
    with build_watermarker(kind, model, tok, cfg, keys[0], cache_dir=None) as wm:
        prompts = [[5, 6, 7, 8 + i] for i in range(4)]
        marked = wm.generate_from_ids(prompts, GenerationConfig(max_new_tokens=64, min_new_tokens=64, batch_size=4))
        captures += wm.capture(marked, prompts)
        shared = wm.score_keys(captures, keys)
    for k, key in enumerate(keys):
        with build_watermarker(kind, model, tok, cfg, key, cache_dir=None) as alone:
            own = alone.score(captures).p_value
        np.testing.assert_array_equal(shared[k], own)
    assert np.isnan(shared).any() and (shared[0, -4:] <= 0.01).all()  # short texts get no p; the key finds its text


@pytest.mark.parametrize("kind", ["moe_tournament", "moe_lsh"])
def test_every_reference_key_ranked_among_the_others_gets_the_p_value_calibrated_gives_it(tiny, null_captures, kind):
    """The key-validity study's input: every reference key's statistic (reference_statistics) and each key's p-value
    among the other R - 1 (leave_one_out_p_values) are, text by text, what calibrated() gives that key deployed
    against those references (no early stop): the first key against the rest, the last against those before it."""
    from moewm.engine.scoring import CaptureBatch, calibrated, leave_one_out_p_values
    from moewm.schemes.registry import build_watermarker

    model, tok = tiny
    captures = list(null_captures[0][:24])
    cfg = WatermarkConfig(kind=kind, reference_keys=40, alpha=0.05)
    with build_watermarker(kind, model, tok, cfg, WatermarkKey(SECRET, 0), cache_dir=None) as wm:
        stats = wm.reference_statistics(captures)
        ref = wm.reference_tables()
        batch = CaptureBatch.stack(captures)
        first = calibrated(batch, ref.select(0, 1), ref.select(1, 40), wm.statistic_spec, stop_after=None,
                          top_k=wm.watermark_cfg.statistic_top_k, draws=wm._draws_fn())
        last = calibrated(batch, ref.select(39, 40), ref.select(0, 39), wm.statistic_spec, stop_after=None,
                          top_k=wm.watermark_cfg.statistic_top_k, draws=wm._draws_fn())
    p = leave_one_out_p_values(torch.from_numpy(stats)).numpy()
    assert stats.shape == (40, len(captures)) and np.isfinite(stats).all()
    np.testing.assert_array_equal(stats[0], first.statistic)
    np.testing.assert_array_equal(p[0], first.p_value)
    np.testing.assert_array_equal(p[39], last.p_value)
    assert len(np.unique(p)) > 5  # the texts are ranked, not all tied
