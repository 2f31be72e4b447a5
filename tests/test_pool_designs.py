"""Pool designs (anchors / partition / random) and green-list rules (bits / hashed, m bits): generation
and detection must agree on every green flag, and each design must be what its name promises."""

import pytest
import torch

from conftest import PROMPTS
from moewm.config import ConfigError, EncoderConfig, ExtractorConfig, GenerationConfig, WatermarkConfig, routing_free_twin
from moewm.engine.keybank import balanced_partition, build_bank, random_partition
from moewm.engine.keys import WatermarkKey
from moewm.engine.lsh import hashed_bits, pool_mask
from moewm.engine.scoring import BankTables, CaptureBatch, green_pools, key_draws, StatisticSpec
from moewm.schemes.moe_lsh import MoELSHWatermark

DESIGNS = [
    EncoderConfig(num_bits=16, pool_size=8),
    EncoderConfig(num_bits=16, pool_size=8, green_lists="hashed"),
    EncoderConfig(num_bits=16, pools="partition"),
    EncoderConfig(num_bits=16, pools="partition", green_lists="hashed"),
    EncoderConfig(num_bits=16, pools="partition", green_bits=2),
    EncoderConfig(num_bits=16, pools="random", pool_size=8, green_lists="hashed", green_bits=3),
    EncoderConfig(num_bits=16, pools="partition", green_lists="vote", vote_lists=5),
    EncoderConfig(num_bits=16, pools="partition", green_lists="hashed", context_tokens=1),
    EncoderConfig(num_bits=16, pools="anchors", pool_size=8, green_lists="vote", vote_lists=3, context_tokens=1),
    EncoderConfig(num_bits=16, pools="random_partition", green_lists="hashed"),
    EncoderConfig(num_bits=16, pools="partition", green_lists="hashed", context_tokens=1, routing_free=True),
    EncoderConfig(num_bits=16, pools="partition", green_lists="vote", vote_lists=5, context_tokens=1, routing_free=True),
]


def _ids(design: EncoderConfig) -> str:
    return f"{design.pools}-{design.green_lists}-m{design.green_bits}-L{design.vote_lists}-c{design.context_tokens}" + ("-twin" * design.routing_free)


def test_bits_mode_with_one_round_is_the_signature_itself():
    bits = torch.rand(3, 5, 7, 16) > 0.5
    mixing = torch.arange(16).view(1, 1, 16).expand(3, 1, 16)
    assert torch.equal(pool_mask(bits, "bits", mixing, torch.zeros(3, dtype=torch.long)), bits)


def test_m_rounds_and_the_bits_of_permuted_positions():
    gen = torch.Generator().manual_seed(0)
    bits = torch.rand(2, 40, 16, generator=gen) > 0.5
    perm = torch.randperm(16, generator=gen)
    mixing = torch.stack([torch.arange(16), perm]).view(1, 2, 16).expand(2, 2, 16)
    mask = pool_mask(bits, "bits", mixing, torch.zeros(2, dtype=torch.long))
    assert torch.equal(mask, bits & bits[..., perm])


def test_hashed_masks_are_keyed_deterministic_and_have_the_promised_share():
    gen = torch.Generator().manual_seed(1)
    bits = torch.rand(1, 4000, 32, generator=gen) > 0.5
    salt = torch.tensor([12345])
    one = hashed_bits(bits, salt, 1)[0]
    assert torch.equal(one, hashed_bits(bits.clone(), salt.clone(), 1)[0])
    assert (one != hashed_bits(bits, torch.tensor([12346]), 1)[0]).float().mean() > 0.4  # another key: unrelated bits
    assert abs(one.float().mean().item() - 0.5) < 0.01
    three = pool_mask(bits, "hashed", torch.zeros(1, 3, 32, dtype=torch.long), salt)
    assert abs(three.float().mean().item() - 1 / 8) < 0.01
    flipped = bits.clone()
    flipped[..., 0] = ~flipped[..., 0]  # one signature bit changes: a fresh green list, not a similar one
    assert abs((hashed_bits(flipped, salt, 1)[0] != one).float().mean().item() - 0.5) < 0.01
    # Bits of one output are not correlated with each other.
    corr = torch.corrcoef(one[0].float().T)
    assert corr[~torch.eye(32, dtype=torch.bool)].abs().max() < 0.08


def test_balanced_partition_covers_the_usable_tokens_once_in_coherent_groups():
    gen = torch.Generator().manual_seed(2)
    centres = torch.randn(8, 24, generator=gen)
    emb = centres[torch.arange(400) % 8] + 0.3 * torch.randn(400, 24, generator=gen)
    usable = torch.ones(400, dtype=torch.bool)
    usable[:7] = False
    groups = balanced_partition(emb, usable, 8)
    members = groups[groups >= 0]
    assert sorted(members.tolist()) == list(range(7, 400))
    sizes = (groups >= 0).sum(1)
    assert int(sizes.max() - sizes.min()) <= 1
    assert torch.equal(groups, balanced_partition(emb.clone(), usable, 8))
    # The planted clusters come back: most of each group shares one cluster.
    purity = [torch.bincount(g[g >= 0] % 8).max().item() / int((g >= 0).sum()) for g in groups]
    assert min(purity) > 0.9, purity


def test_a_random_partition_covers_the_usable_tokens_once_in_groups_unrelated_to_meaning():
    gen = torch.Generator().manual_seed(2)
    centres = torch.randn(8, 24, generator=gen)
    usable = torch.ones(400, dtype=torch.bool)
    usable[:7] = False
    groups = random_partition(usable, 8)
    assert sorted(groups[groups >= 0].tolist()) == list(range(7, 400))
    sizes = (groups >= 0).sum(1)
    assert int(sizes.max() - sizes.min()) <= 1
    assert torch.equal(groups, random_partition(usable.clone(), 8))  # public and fixed
    purity = [torch.bincount(g[g >= 0] % 8).max().item() / int((g >= 0).sum()) for g in groups]
    assert max(purity) < 0.4, purity  # the planted clusters (token % 8) are spread over every group
    with pytest.raises(ConfigError, match="encoder.num_bits=401"):
        random_partition(torch.ones(400, dtype=torch.bool), 401)


def test_a_partition_needs_a_usable_token_per_group():
    with pytest.raises(ConfigError, match="encoder.num_bits=9"):
        balanced_partition(torch.randn(8, 4), torch.ones(8, dtype=torch.bool), 9)


@pytest.mark.parametrize("cfg,message", [
    (EncoderConfig(pools="kmeans"), "encoder.pools='kmeans': allowed values"),
    (EncoderConfig(green_lists="xor"), "encoder.green_lists='xor': allowed values"),
    (EncoderConfig(num_bits=4, green_bits=5), r"encoder.green_bits=5: allowed range is \[1, 4\]"),
    (EncoderConfig(pools="partition", semantic_pools=False), "contradicts encoder.pools='partition'"),
])
def test_bad_pool_settings_name_the_key_and_range(cfg, message):
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


@pytest.mark.parametrize("design", DESIGNS, ids=_ids)
def test_generation_and_detection_agree_on_every_green_flag(design, micro_qwen, tokenizer, key):
    """The logits processor's green list (encoder) and the scorer's (bank tables) are the same sets."""
    with MoELSHWatermark(micro_qwen, tokenizer, ExtractorConfig(), design, WatermarkConfig(delta=4.0, capture_top_k=256), key, cache_dir=None) as wm:
        gen = GenerationConfig(max_new_tokens=40, min_new_tokens=40, batch_size=4)
        prompt_ids, ids = wm.generate_ids(PROMPTS[:4], gen)
        captures = wm.capture(ids, prompt_ids)
        batch = CaptureBatch.stack(captures)
        bank = build_bank(design, [key], wm.capture_hooks.dim, micro_qwen.get_input_embeddings().weight, wm.encoder.usable, wm.vocab_size)
        tables = BankTables.of(bank)
        masks = green_pools(batch.features, bank, batch.previous)  # (1, B, n, nb)
        vocab = torch.arange(wm.vocab_size)
        for b, capture in enumerate(captures):
            bits = wm.encoder.signature(capture.features)
            if capture.num_scored == capture.num_text_tokens:  # every token scored: the context is the token before
                assert torch.equal(capture.previous, torch.tensor([prompt_ids[b][-1], *ids[b][:-1]]))
            expected = wm.encoder.bias_logits(torch.zeros(len(bits), wm.vocab_size), bits, 1.0, capture.previous) > 0
            scored = tables.green(vocab.view(1, 1, -1).expand(1, len(bits), -1), masks[:, b : b + 1, : len(bits)])[0, ..., 0]
            assert torch.equal(scored, expected)
        draws = key_draws(batch, tables, StatisticSpec())
        assert draws.green[0][batch.valid].float().mean() > 0.5  # delta 4 on the micro model: mostly green


@pytest.mark.parametrize("design", [DESIGNS[2], DESIGNS[3], DESIGNS[6], DESIGNS[7], DESIGNS[9]], ids=_ids)
def test_a_partition_makes_every_usable_token_green_half_the_time(design, micro_qwen, tokenizer):
    """Over keys, each usable token is green with probability 2^-m whatever the text (the seed's anchors
    leave most tokens never green and a few often)."""
    keys = [WatermarkKey("partition-share", i) for i in range(64)]
    with MoELSHWatermark(micro_qwen, tokenizer, ExtractorConfig(), design, WatermarkConfig(), keys[0], cache_dir=None) as wm:
        usable = wm.encoder.usable
        bank = build_bank(design, keys, wm.capture_hooks.dim, micro_qwen.get_input_embeddings().weight, usable, wm.vocab_size)
    features = torch.rand(1, 6, bank.projection.shape[1])
    tables = BankTables.of(bank)
    vocab = torch.nonzero(usable, as_tuple=True)[0]
    green = tables.green(vocab.view(1, 1, -1).expand(1, 6, -1), green_pools(features, bank, torch.arange(6).view(1, 6))).float()  # (1, 6, U, R)
    share = green.mean(-1)  # over keys
    assert abs(share.mean().item() - 0.5) < 0.02
    assert share.std().item() < 0.12  # binomial spread over 64 keys is 0.0625


def test_a_flipped_bit_redraws_one_vote_list_so_most_green_pools_stay():
    """Sub-signature lists keep locality: one flipped bit moves the pools whose majority that one list
    decided (about 3/16 with 5 lists), where a hash of the whole signature re-draws half of them."""
    gen = torch.Generator().manual_seed(3)
    bits = torch.rand(1, 4000, 32, generator=gen) > 0.5
    salt, mixing = torch.tensor([777]), torch.zeros(1, 1, 32, dtype=torch.long)
    flipped = bits.clone()
    flipped[..., 5] = ~flipped[..., 5]
    vote = pool_mask(bits, "vote", mixing, salt, lists=5)
    assert abs(vote.float().mean().item() - 0.5) < 0.02  # still half the pools green
    moved_vote = (pool_mask(flipped, "vote", mixing, salt, lists=5) != vote).float().mean().item()
    moved_hash = (pool_mask(flipped, "hashed", mixing, salt) != pool_mask(bits, "hashed", mixing, salt)).float().mean().item()
    assert 0.12 < moved_vote < 0.26, moved_vote
    assert abs(moved_hash - 0.5) < 0.02
    # one list is the hashed design of its block; a keyed draw: another salt gives other lists
    assert (pool_mask(bits, "vote", mixing, torch.tensor([778]), lists=5) != vote).float().mean() > 0.4


def test_the_previous_token_rekeys_the_green_list():
    gen = torch.Generator().manual_seed(4)
    bits = torch.rand(1, 2000, 32, generator=gen) > 0.5
    salt, mixing = torch.tensor([99]), torch.zeros(1, 1, 32, dtype=torch.long)
    a = pool_mask(bits, "hashed", mixing, salt, context=torch.full((2000,), 17))
    b = pool_mask(bits, "hashed", mixing, salt, context=torch.full((2000,), 18))
    assert abs((a != b).float().mean().item() - 0.5) < 0.02
    assert torch.equal(a, pool_mask(bits, "hashed", mixing, salt, context=torch.full((2000,), 17)))
    with pytest.raises(ValueError, match="context token needs hashed or vote"):
        pool_mask(bits, "bits", mixing, salt, context=torch.full((2000,), 17))


@pytest.mark.parametrize("cfg,message", [
    (EncoderConfig(green_lists="vote", vote_lists=4), r"encoder.vote_lists=4: allowed values are odd numbers in \[1, 32\]"),
    (EncoderConfig(num_bits=4, green_lists="vote", vote_lists=5), r"encoder.vote_lists=5: allowed values are odd numbers in \[1, 4\]"),
    (EncoderConfig(context_tokens=2), "encoder.context_tokens=2: allowed values are 0, 1"),
    (EncoderConfig(green_lists="bits", context_tokens=1), "encoder.context_tokens=1 needs encoder.green_lists=hashed or vote"),
    (EncoderConfig(routing_free=True), r"encoder.routing_free=true needs encoder.context_tokens=1 \(allowed values: 1; encoder.context_tokens=0\)"),
])
def test_bad_design_family_settings_name_the_key_and_range(cfg, message):
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_margin_settings_are_checked():
    with pytest.raises(ConfigError, match=r"watermark.margin_bits=9: allowed range is \[0, 8\]"):
        WatermarkConfig(margin_bits=9).validate()
    with pytest.raises(ConfigError, match="watermark.margin_scale=0: must be > 0"):
        WatermarkConfig(margin_scale=0).validate()


def test_margin_aware_scoring_weighs_the_uncertain_bits_and_is_off_by_default(micro_qwen, tokenizer, key):
    """Margin-aware draws: soft green flags in [0, 1] that move towards the flipped signatures' flags; a
    bit on its hyperplane gets weight 1/2; with margin_bits=0 the statistic is the hard one."""
    from moewm.engine.scoring import margin_alternatives, projections

    design = EncoderConfig(num_bits=16, pools="partition")
    with MoELSHWatermark(micro_qwen, tokenizer, ExtractorConfig(), design, WatermarkConfig(delta=4.0), key, cache_dir=None) as wm:
        prompt_ids, ids = wm.generate_ids(PROMPTS[:2], GenerationConfig(max_new_tokens=24, min_new_tokens=24, batch_size=2))
        batch = CaptureBatch.stack(wm.capture(ids, prompt_ids))
        bank = build_bank(design, [key], wm.capture_hooks.dim, micro_qwen.get_input_embeddings().weight, wm.encoder.usable, wm.vocab_size)
    tables = BankTables.of(bank)
    hard = key_draws(batch, tables, StatisticSpec())
    assert hard.soft_green is None
    soft = key_draws(batch, tables, StatisticSpec(margin_bits=2, margin_scale=0.5))
    assert torch.equal(soft.green, hard.green)  # the observed signature's flags stay
    v = batch.valid.unsqueeze(0)
    assert (soft.soft_green[v] >= 0).all() and (soft.soft_green[v] <= 1).all()
    assert 0 < (soft.soft_green[v] != hard.green[v].double()).float().mean() < 1
    bits, which, weight = margin_alternatives(batch.features, bank, 2, 0.5)
    magnitude = projections(batch.features, bank).abs()
    assert torch.equal(torch.gather(magnitude, -1, which), magnitude.topk(2, -1, largest=False).values)  # the least certain bits
    assert (weight <= 0.5).all() and (weight[..., 0] >= weight[..., 1]).all()
    on_plane = margin_alternatives(torch.zeros_like(batch.features[:, :1]), bank, 2, 0.5)[2]
    assert torch.allclose(on_plane, torch.full_like(on_plane, 0.5))


def test_the_green_list_twin_is_blind_to_the_routing_and_keyed_by_the_token_before(micro_qwen, tokenizer):
    """encoder.routing_free: the deployed and every reference key see the same (all-zero) signature whatever the
    features, so the green list depends on the key and the token before alone; the routing design it ablates does not."""
    keys = [WatermarkKey("twin", i) for i in range(8)]
    design = EncoderConfig(num_bits=16, pools="partition", green_lists="vote", vote_lists=5, context_tokens=1)
    twin_design = routing_free_twin(WatermarkConfig(kind="moe_lsh"), design)[1]
    assert twin_design.routing_free and twin_design.context_tokens == 1
    emb = micro_qwen.get_input_embeddings().weight
    usable = torch.ones(emb.shape[0], dtype=torch.bool)
    features = torch.rand(2, 1, 64, 24, generator=torch.Generator().manual_seed(6))  # two routings of the same 64 positions
    before = torch.randint(0, emb.shape[0], (1, 64), generator=torch.Generator().manual_seed(7))
    routed, twin = (build_bank(d, keys, 24, emb, usable, emb.shape[0]) for d in (design, twin_design))
    assert not torch.equal(green_pools(features[0], routed, before), green_pools(features[1], routed, before))
    assert torch.equal(green_pools(features[0], twin, before), green_pools(features[1], twin, before))
    moved = green_pools(features[0], twin, (before + 1) % emb.shape[0])
    assert (moved != green_pools(features[0], twin, before)).float().mean() > 0.3  # another token before: another list
    masks = green_pools(features[0], twin, before)
    assert (masks[0] != masks[1]).float().mean() > 0.3  # another key: another list
    enc = twin.encoder(0)
    assert not enc.signature(torch.randn(5, 24)).any()  # the processor sees the same zero signature


def test_the_routing_free_twin_exists_for_the_routing_designs_with_a_token_context():
    wm, enc = routing_free_twin(WatermarkConfig(kind="moe_lsh", margin_bits=2), EncoderConfig(green_lists="hashed", context_tokens=1))
    assert enc.routing_free and wm.margin_bits == 0  # margins are the routing's
    wm, enc = routing_free_twin(WatermarkConfig())
    assert wm.tournament.routed_layers == 0 and not enc.routing_free
    with pytest.raises(ConfigError, match="encoder.context_tokens=0: MoE-LSH keyed by routing alone has no token context"):
        routing_free_twin(WatermarkConfig(kind="moe_lsh"), EncoderConfig())
    with pytest.raises(ConfigError, match="watermark.kind='kgw': a routing-free twin exists for the routing designs"):
        routing_free_twin(WatermarkConfig(kind="kgw"))
