"""Pool designs (anchors / partition / random) and green-list rules (bits / hashed, m bits): generation
and detection must agree on every green flag, and each design must be what its name promises."""

import pytest
import torch

from conftest import PROMPTS
from moewm.config import ConfigError, EncoderConfig, ExtractorConfig, GenerationConfig, WatermarkConfig
from moewm.engine.keybank import balanced_partition, build_bank
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
]


def _ids(design: EncoderConfig) -> str:
    return f"{design.pools}-{design.green_lists}-m{design.green_bits}"


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
        masks = green_pools(batch.features, bank)  # (1, B, n, nb)
        vocab = torch.arange(wm.vocab_size)
        for b, capture in enumerate(captures):
            bits = wm.encoder.signature(capture.features)
            expected = wm.encoder.bias_logits(torch.zeros(len(bits), wm.vocab_size), bits, 1.0) > 0
            scored = tables.green(vocab.view(1, 1, -1).expand(1, len(bits), -1), masks[:, b : b + 1, : len(bits)])[0, ..., 0]
            assert torch.equal(scored, expected)
        draws = key_draws(batch, tables, StatisticSpec())
        assert draws.green[0][batch.valid].float().mean() > 0.5  # delta 4 on the micro model: mostly green


@pytest.mark.parametrize("design", DESIGNS[2:4], ids=_ids)
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
    green = tables.green(vocab.view(1, 1, -1).expand(1, 6, -1), green_pools(features, bank)).float()  # (1, 6, U, R)
    share = green.mean(-1)  # over keys
    assert abs(share.mean().item() - 0.5) < 0.02
    assert share.std().item() < 0.12  # binomial spread over 64 keys is 0.0625
