"""The fast routing tournament changes nothing that matters: the sampled distribution stays within its stated
bound of the whole-vocabulary, layer-by-layer tournament, and calibrated p-values are bit for bit those of the
straightforward scorer. The straightforward versions live here, as the references."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pytest
import torch

from moewm.config import ConfigError, EncoderConfig, ExtractorConfig, ModelConfig, TournamentConfig, WatermarkConfig
from moewm.engine.keys import WatermarkKey
from moewm.engine.scoring import CaptureBatch, KeyDraws, calibrated, first_occurrences, signatures
from moewm.engine.tournament import (
    TournamentKey,
    TournamentScorer,
    block_codes,
    context_codes,
    context_hash,
    first_slots,
    g_values,
    layer_blocks,
    layer_salts,
    repeat_slot,
    routed_positions,
    token_hash,
    tokens_hash,
)
from moewm.engine.tournament_sampling import as_int32, candidates, layer_codes, tournament_ratios
from moewm.null_corpora import human_texts


# -- references ---------------------------------------------------------------------------------------
def reference_distribution(key: TournamentKey, probs: torch.Tensor, bits: torch.Tensor, active: Optional[torch.Tensor] = None,
                           before: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The tournament over the whole vocabulary, one float64 pass per layer (the implementation before the fast one)."""
    ctx = key.contexts(bits, before)
    usable = key.usable[: probs.shape[-1]].to(probs.dtype)
    q = probs * usable
    mass = q.sum(-1, keepdim=True).clamp(min=1e-30)
    ids = token_hash(torch.arange(probs.shape[-1]))
    for layer in range(key.layers):
        g = g_values(ctx[:, layer : layer + 1], ids).to(probs.dtype)
        played = (q * g).sum(-1, keepdim=True) / mass
        step = 1 + g - played
        q = q * (step if active is None else torch.where(active[:, layer : layer + 1], step, torch.ones_like(step)))
    return q + probs * (1 - usable)


def reference_units(scorer: TournamentScorer, batch: CaptureBatch, tables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Context codes, keyed contexts and scored units as the scorer computed them before the fast one: bits
    gathered per layer, generic first occurrences."""
    bank = tables.bank
    bits = signatures(batch.features, bank)
    picked = bits[..., scorer.blocks].long()
    codes = (picked << torch.arange(scorer.blocks.shape[1])).sum(-1)
    codes = codes * (torch.arange(scorer.layers) < scorer.routing_layers)  # layers keyed by tokens alone: block 0
    before = batch.tokens_before(scorer.context_tokens) if scorer.context_tokens else None
    if scorer.routed_contexts is not None:  # routing read only after the listed token contexts: block 0 elsewhere
        listed = set(scorer.routed_contexts.tolist())
        hashed = tokens_hash(before)
        routed = torch.tensor([h in listed for h in hashed.view(-1).tolist()]).view(hashed.shape)
        codes = codes * routed.view(1, *routed.shape, 1)
    codes = context_codes(codes, before)
    ctx = context_hash(layer_salts(bank.salt, scorer.layers), codes)
    r, b, n, m = codes.shape
    scored = batch.valid.view(1, b, n, 1).expand(r, b, n, m)
    unit = None
    if scorer.skip_repeated:
        unit = repeat_slot(codes, scorer.code_bits)
    elif scorer.ignore_repeated:
        unit = codes * scorer.vocab_size + batch.tokens.view(1, b, n, 1)
    if unit is not None:
        rows = first_occurrences(unit.permute(0, 1, 3, 2).reshape(-1, n), scored.permute(0, 1, 3, 2).reshape(-1, n))
        scored = rows.view(r, b, m, n).permute(0, 1, 3, 2)
    return codes, ctx, scored


def reference_draws(scorer: TournamentScorer, batch: CaptureBatch, tables) -> KeyDraws:
    """The ``green`` statistic's draws before the fast scorer: float g-values summed as float64."""
    _, ctx, scored = reference_units(scorer, batch, tables)
    g = g_values(ctx, token_hash(batch.tokens).unsqueeze(0).unsqueeze(-1)).float()
    evidence = torch.where(scored, g.double(), torch.zeros((), dtype=torch.float64)).sum(-1)
    return KeyDraws(evidence, torch.zeros_like(evidence), scored.any(-1))


def _key(vocab: int, layers: int = 20, tolerance: float = 1e-6, special: tuple[int, ...] = (), context_tokens: int = 2,
         salt: int = 0x1234567) -> TournamentKey:
    usable = torch.ones(vocab, dtype=torch.bool)
    usable[list(special)] = False
    return TournamentKey(torch.tensor(salt), 32, layers, 8, usable, context_tokens, tolerance=tolerance)


def _tv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a / a.sum(-1, keepdim=True) - b / b.sum(-1, keepdim=True)).abs().sum(-1) / 2


# -- sampling -------------------------------------------------------------------------------------------
def test_layer_codes_are_the_g_values_of_each_layer():
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, 2**31, (5, 13), generator=gen) | 1
    ids = torch.randint(0, 2**20, (5, 300), generator=gen)
    codes = layer_codes(as_int32(ctx), as_int32(token_hash(ids)), 3, 13)
    expected = sum(g_values(ctx[:, l : l + 1], token_hash(ids)) << (l - 3) for l in range(3, 13))
    assert torch.equal(codes, expected)


@pytest.mark.parametrize("scale,vocab,special", [(1.0, 3000, ()), (4.0, 3000, (0, 7)), (30.0, 5000, (3,))])
def test_the_whole_vocabulary_tournament_is_the_layer_by_layer_one_up_to_rounding(scale, vocab, special):
    """Flat and peaked rows, special tokens, layers skipped at random, 20 keys: float64 rounding apart, the same."""
    gen = torch.Generator().manual_seed(int(scale))
    worst = 0.0
    for salt in range(20):
        key = _key(vocab, special=special, salt=salt * 7919 + 1)
        probs = torch.softmax(torch.randn(8, vocab, generator=gen, dtype=torch.float64) * scale, -1)
        bits = torch.rand(8, 32, generator=gen) > 0.5
        before = torch.randint(0, vocab, (8, 2), generator=gen)
        active = torch.rand(8, 20, generator=gen) > 0.2
        new = key.sample_distribution(probs, bits, active, before)
        ref = reference_distribution(key, probs, bits, active, before)
        worst = max(worst, float(_tv(new, ref).max()))
        assert torch.equal(new[:, list(special)], probs[:, list(special)])
    assert worst < 1e-12, worst


def test_a_sparse_distribution_plays_only_its_tokens_and_samples_what_the_whole_vocabulary_would():
    """Tokens of probability exactly zero (a tokenizer's spare ids) are never candidates: nothing is approximated."""
    gen = torch.Generator().manual_seed(5)
    vocab = 20_000
    key = _key(vocab, special=(1, 2))
    scores = torch.full((6, vocab), float("-inf"), dtype=torch.float64)
    scores[:, :256] = torch.randn(6, 256, generator=gen, dtype=torch.float64) * 2
    probs = torch.softmax(scores, -1)
    cand = candidates(torch.log(probs), key.usable, key.layers, key.tolerance)
    assert cand.gathered and cand.index is not None and cand.index.shape[1] == 254 and float(cand.tail.max()) == 0.0
    bits = torch.rand(6, 32, generator=gen) > 0.5
    before = torch.randint(0, 256, (6, 2), generator=gen)
    assert float(_tv(key.sample_distribution(probs, bits, None, before), reference_distribution(key, probs, bits, None, before)).max()) < 1e-12


@pytest.mark.parametrize("layers,tolerance", [(4, 1e-2), (8, 1e-3), (20, 1e-6)])
def test_with_a_tail_the_distribution_stays_within_its_run_time_bound_and_the_stated_tolerance(layers, tolerance):
    """Peaked rows whose tail (tokens below tolerance * 2^-m / V of the top) plays at g = 1/2, as the detector reads it:
    over many keys and steps, the total variation from the whole-vocabulary tournament never exceeds the bound
    computed from the candidates alone, nor the stated tolerance."""
    gen = torch.Generator().manual_seed(layers)
    vocab = 4000
    seen_tail = 0
    for salt in range(25):
        key = _key(vocab, layers=layers, tolerance=tolerance, salt=salt * 104729 + 3)
        logits = torch.randn(8, vocab, generator=gen, dtype=torch.float64) * 25
        probs = torch.softmax(logits, -1)
        bits = torch.rand(8, 32, generator=gen) > 0.5
        before = torch.randint(0, vocab, (8, 2), generator=gen)
        active = torch.rand(8, layers, generator=gen) > 0.1
        cand = candidates(torch.log(probs), key.usable, layers, tolerance)
        assert cand.gathered and cand.index is not None and cand.valid is not None
        tail = cand.tail * torch.exp(cand.top.view(-1))
        seen_tail += int((tail > 0).sum())
        picked = probs.gather(1, cand.index) * cand.valid
        bound = tournament_ratios(picked, as_int32(token_hash(cand.index)), as_int32(key.contexts(bits, before)), tail, active).bound
        tv = _tv(key.sample_distribution(probs, bits, active, before), reference_distribution(key, probs, bits, active, before))
        assert (tv <= bound + 1e-12).all(), (tv, bound)
        assert (bound <= tolerance).all(), bound
    assert seen_tail > 100  # the tail was there to be bounded


def test_process_scores_gives_the_reference_tournament_of_the_tempered_distribution():
    """What transformers samples from (softmax of the returned logits over the temperature) is the reference
    tournament, flat or peaked, with a forbidden token; in place or not, the same logits."""
    gen = torch.Generator().manual_seed(8)
    for scale, vocab, t in ((1.0, 3000, 1.0), (3.0, 3000, 0.7), (40.0, 8000, 1.3)):
        key = _key(vocab, special=(0, 9))
        scores = (torch.randn(6, vocab, generator=gen) * scale).float()
        scores[0, 5] = float("-inf")
        bits = torch.rand(6, 32, generator=gen) > 0.5
        before = torch.randint(0, vocab, (6, 2), generator=gen)
        out = key.process_scores(scores, bits, t, None, before)
        sampled = torch.softmax(out.double() / t, -1)
        expected = reference_distribution(key, torch.softmax(scores.double() / t, -1), bits, None, before)
        assert float(_tv(sampled, expected).max()) < 1e-5
        assert sampled[0, 5] == 0
        assert torch.equal(key.process_scores(scores.clone(), bits, t, None, before, inplace=True), out)


def test_flat_rows_reuse_the_keys_buffers_without_changing_or_aliasing_what_is_returned():
    """Flat float64 rows (every token plays, in the key's reused buffers): the logits are the reference tournament
    within float64 rounding, a later call (another batch size, another temperature) leaves an earlier result as it
    was, and in place the same values land in ``scores``."""
    gen = torch.Generator().manual_seed(11)
    key = _key(3000, special=(2,))
    results = []
    for rows, t in ((6, 1.0), (4, 0.8), (6, 1.0)):
        scores = torch.randn(rows, 3000, generator=gen, dtype=torch.float64)
        bits = torch.rand(rows, 32, generator=gen) > 0.5
        before = torch.randint(0, 3000, (rows, 2), generator=gen)
        active = torch.rand(rows, 20, generator=gen) > 0.2
        assert not candidates(scores / t, key.usable, key.layers, key.tolerance).gathered
        out = key.process_scores(scores, bits, t, active, before)
        expected = reference_distribution(key, torch.softmax(scores / t, -1), bits, active, before)
        assert float(_tv(torch.softmax(out / t, -1), expected).max()) < 1e-12
        assert torch.equal(out[:, 2], scores[:, 2])  # a special token keeps its logit
        results.append((out, out.clone()))
        assert torch.equal(key.process_scores(scores.clone(), bits, t, active, before, inplace=True), out)
    for out, copy in results:
        assert torch.equal(out, copy)


def test_the_sample_tolerance_is_a_checked_setting():
    assert TournamentConfig().sample_tolerance == 1e-6
    with pytest.raises(ConfigError, match=r"watermark.tournament.sample_tolerance=0.5: allowed range is \[0, 0.01\]"):
        WatermarkConfig(tournament=TournamentConfig(sample_tolerance=0.5)).validate()


# -- scoring --------------------------------------------------------------------------------------------
def test_packed_block_codes_are_the_gathered_bits():
    gen = torch.Generator().manual_seed(2)
    for nb, m, b in ((32, 20, 8), (32, 20, 4), (32, 7, 32), (16, 5, 7), (8, 3, 8), (24, 20, 5), (20, 6, 3)):
        bits = torch.rand(4, 3, 5, nb, generator=gen) > 0.5
        blocks = layer_blocks(nb, m, b)
        assert torch.equal(block_codes(bits, blocks), (bits[..., blocks].long() << torch.arange(b)).sum(-1)), (nb, m, b)


def test_the_int32_mixer_gives_the_int64_mixers_bits():
    from moewm.engine import lsh

    x = torch.cat([torch.randint(0, 2**32, (1 << 17,), generator=torch.Generator().manual_seed(4)),
                   torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1])])
    small = torch.cat([lsh._mix32(part) for part in x.split(1000)])  # below the int32 threshold: the int64 formula
    assert torch.equal(lsh._mix32(x), small)


def test_first_slots_are_first_occurrences():
    gen = torch.Generator().manual_seed(3)
    for n, bits in ((1, 16), (9, 3), (130, 16), (700, 4)):
        slots = torch.randint(0, 1 << bits, (40, n), generator=gen)
        scored = torch.rand(40, n, generator=gen) > 0.2
        assert torch.equal(first_slots(slots, scored, bits), first_occurrences(slots, scored)), n


@pytest.fixture(scope="module")
def tiny():
    from moewm.models.loading import load_model

    return load_model(ModelConfig())


@pytest.mark.parametrize("statistic,tournament", [
    ("green", TournamentConfig()),  # the shipped design
    ("green", TournamentConfig(routing_layers=10)),  # half the layers keyed by tokens alone
    ("green", TournamentConfig(routing_layers=0)),  # the routing-free twin
    ("green", TournamentConfig(block_bits=4, skip_repeated=False)),  # 8 distinct blocks; every repeat counted once per token
    ("green", TournamentConfig(context_tokens=0, block_bits=16)),  # routing alone: the block code is the repeat slot
    ("green", TournamentConfig(routed_contexts=2048)),  # routing only after the 2,048 most common token pairs
    ("llr", TournamentConfig(context_tokens=0, block_bits=4, skip_repeated=False)),
    ("z", TournamentConfig(context_tokens=1, skip_repeated=False)),
])
def test_calibrated_p_values_are_bit_for_bit_those_of_the_reference_scorer(tiny, statistic, tournament):
    """Fixed texts (random tokens and repeats, so that contexts recur), a fixed key, 99 reference keys, every key
    scored: contexts and scored units equal the reference scorer's for every statistic, and for the shipped
    ``green`` the per-position evidence, the statistics and the p-values too, exactly."""
    from moewm.schemes.moe_tournament import MoETournamentWatermark

    model, tok = tiny
    cfg = WatermarkConfig(kind="moe_tournament", statistic=statistic, reference_keys=99, alpha=0.01, tournament=tournament)
    gen = torch.Generator().manual_seed(11)
    texts = torch.randint(300, 4000, (6, 40), generator=gen).tolist()
    texts += [t[:10] * 4 for t in texts[:2]]  # repeated runs: repeated contexts
    texts += [tok(t, add_special_tokens=False)["input_ids"][:40] for t in human_texts("kjv_narrative", 2)]  # common pairs
    with MoETournamentWatermark(model, tok, ExtractorConfig(), EncoderConfig(), cfg, WatermarkKey("speed-test", 4), cache_dir=None) as wm:
        captures = wm.capture(texts, [[] for _ in texts])
        batch = CaptureBatch.stack(captures).with_top_k(cfg.statistic_top_k)
        ref = wm.reference_tables()
        codes, ctx = wm.scorer.contexts(batch, ref)
        ref_codes, ref_ctx, ref_scored = reference_units(wm.scorer, batch, ref)
        assert torch.equal(codes, ref_codes) and torch.equal(ctx, ref_ctx)
        if tournament.routed_contexts is not None:  # both kinds of position are there to be compared
            routed = routed_positions(batch.tokens_before(2), wm.scorer.routed_contexts) & batch.valid
            assert 0 < int(routed.sum()) < int(batch.valid.sum())
        assert torch.equal(wm.scorer.scored_units(batch, codes), ref_scored)
        if statistic != "green":
            return  # the llr / z terms are computed as before from these very units
        fast = wm.scorer.draws(batch, ref)
        slow = reference_draws(wm.scorer, batch, ref)
        assert torch.equal(fast.scored, slow.scored) and torch.equal(fast.green, slow.green)
        args = (batch, wm._true_tables, ref, wm.statistic_spec)
        new = calibrated(*args, stop_after=None, draws=wm.scorer.draws)
        old = calibrated(*args, stop_after=None, draws=lambda b, t, s: reference_draws(wm.scorer, b, t))
    assert np.array_equal(new.statistic, old.statistic) and np.array_equal(new.p_value, old.p_value)
