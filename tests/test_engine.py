"""The watermark engine on random-initialised micro MoE models."""

import math

import numpy as np
import pytest
import torch

from conftest import PROMPTS, TEST_SECRET
from moewm.config import ConfigError, EncoderConfig, ExtractorConfig, GenerationConfig, WatermarkConfig
from moewm.engine.keys import WatermarkKey
from moewm.bench.reference_detector import reference_detect
from moewm.engine.routing import NotAnMoEModelError
from moewm.models.micro import micro_model
from moewm.schemes.moe_lsh import MoELSHWatermark

GEN = GenerationConfig(max_new_tokens=72, min_new_tokens=72, batch_size=8)
# These tests check the mechanics of the seed's design (overlapping anchor pools switched by signature bits),
# which the token-by-token oracle (moewm.bench.reference_detector) implements; tests/test_pool_designs.py checks that every
# design's generation and detection agree.
SEED_DESIGN = EncoderConfig(num_bits=16, pool_size=8, pools="anchors", green_lists="bits")


def _wm(model, tokenizer, key, extractor=None, encoder=None, watermark=None):
    return MoELSHWatermark(
        model,
        tokenizer,
        extractor or ExtractorConfig(),
        encoder or SEED_DESIGN,
        watermark or WatermarkConfig(delta=4.0, capture_top_k=256, ignore_repeated=False),  # the whole usable vocabulary: diagnostics exact
        key,
        cache_dir=None,
    )


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "olmoe"])
def test_watermarked_text_detects_and_plain_text_does_not(family, tokenizer, key):
    model = micro_model(family)
    with _wm(model, tokenizer, key) as wm:
        prompt_ids, wm_ids = wm.generate_ids(PROMPTS, GEN)
        _, plain_ids = wm.generate_ids(PROMPTS, GEN, watermark=False)
        marked = wm.detect_ids(wm_ids, prompt_ids)
        plain = wm.detect_ids(plain_ids, prompt_ids)
    assert (marked.num_tokens_scored >= 64).all()
    assert marked.z_score.min() > 4.0, marked.z_score
    assert marked.prediction.all()
    assert abs(plain.z_score.mean()) < 1.5, plain.z_score
    assert not plain.prediction.any()


def test_text_api_round_trip(micro_qwen, tokenizer, key):
    with _wm(micro_qwen, tokenizer, key) as wm:
        texts = wm.generate(PROMPTS[:4], GEN)
        results = wm.detect(texts, PROMPTS[:4])
    assert all(isinstance(t, str) and t for t in texts)
    # The micro model writes arbitrary bytes: decoding and encoding again changes many tokens (invalid UTF-8
    # comes back as replacement characters), so the text API scores edited text; detect_ids scores the ids.
    assert all(r.z_score > 4 and r.p_value < 0.2 for r in results)
    assert set(results[0].to_dict()) >= {"num_tokens_scored", "num_green_tokens", "green_fraction", "z_score", "p_value", "prediction"}


@pytest.mark.parametrize("extractor", [ExtractorConfig(), ExtractorConfig(start_layer_idx=1, end_layer_idx=3, use_top_k=True, k=2), ExtractorConfig(token_idx=-2)])
def test_batched_detection_matches_token_by_token_reference(micro_qwen, tokenizer, key, extractor):
    with _wm(micro_qwen, tokenizer, key, extractor=extractor) as wm:
        prompt_ids, wm_ids = wm.generate_ids(PROMPTS[:3], GenerationConfig(max_new_tokens=24, min_new_tokens=24))
        batched = wm.detect_ids(wm_ids, prompt_ids)
        for i in range(3):
            ref = reference_detect(wm, wm_ids[i], prompt_ids[i])
            assert batched.num_tokens_scored[i] == ref["num_tokens_scored"]
            assert batched.num_green_tokens[i] == ref["num_green_tokens"]
            assert batched.z_score[i] == pytest.approx(ref["z_score"], abs=1e-5)
            assert batched.gamma_mean[i] * batched.num_tokens_scored[i] == pytest.approx(ref["gamma_sum"], abs=1e-5)


def test_routing_inside_generate_equals_full_forward(micro_qwen, tokenizer, key):
    with _wm(micro_qwen, tokenizer, key) as wm:
        seen = []
        original = wm.logits_processor.__call__

        class Recorder:
            def __call__(self, input_ids, scores):
                seen.append(wm.capture_hooks.features(input_ids.shape[0], positions=slice(-1, None))[:, -1].clone())
                return original(input_ids, scores)

        prompts = PROMPTS[:4]  # different lengths: exercises left padding
        prompt_ids = [wm.encode_prompt(p) for p in prompts]
        from moewm.engine.generation import generate_batched

        new_ids = generate_batched(micro_qwen, tokenizer, prompt_ids, GenerationConfig(max_new_tokens=12, min_new_tokens=12), [Recorder()])
        during = torch.stack(seen, dim=1)  # (B, steps, D)
        for i in range(len(prompts)):
            row = prompt_ids[i] + new_ids[i]
            micro_qwen(input_ids=torch.tensor([row]), use_cache=False)
            full = wm.capture_hooks.features(1)[0]
            positions = range(len(prompt_ids[i]) - 1, len(row) - 1)
            expected = full[list(positions)]
            torch.testing.assert_close(during[i], expected, atol=1e-5, rtol=1e-4)
            assert torch.equal(wm.encoder.signature(during[i]), wm.encoder.signature(expected))


def test_same_key_same_watermark_other_seed_differs(micro_qwen, tokenizer):
    a = _wm(micro_qwen, tokenizer, WatermarkKey(TEST_SECRET, 3))
    b = _wm(micro_qwen, tokenizer, WatermarkKey(TEST_SECRET, 3))
    c = _wm(micro_qwen, tokenizer, WatermarkKey(TEST_SECRET, 4))
    d = _wm(micro_qwen, tokenizer, WatermarkKey("another-secret", 3))
    for x in (a, b, c, d):
        x.close()
    assert torch.equal(a.encoder.projection, b.encoder.projection)
    assert torch.equal(a.encoder.pools, b.encoder.pools)
    assert not torch.equal(a.encoder.projection, c.encoder.projection)
    assert not torch.equal(a.encoder.pools, c.encoder.pools)
    assert not torch.equal(a.encoder.projection, d.encoder.projection)


def test_exact_gamma_z_by_hand(micro_qwen, tokenizer, key):
    wm = _wm(micro_qwen, tokenizer, key)
    wm.close()
    # Three positions, gammas 0.1, 0.2, 0.5, green pattern 1, 0, 1:
    from moewm.engine.stats import exact_gamma_z

    green = torch.tensor([[True, False, True]])
    gamma = torch.tensor([[0.1, 0.2, 0.5]], dtype=torch.float64)
    out = exact_gamma_z(green, gamma, torch.ones_like(green))
    mean, var = 0.1 + 0.2 + 0.5, 0.1 * 0.9 + 0.2 * 0.8 + 0.5 * 0.5
    assert out["z_score"].item() == pytest.approx((2 - mean) / math.sqrt(var))
    # and the detector uses the exact union size of overlapping pools, not num_bits * pool_size / 2:
    bits = torch.ones(1, wm.encoder.num_bits, dtype=torch.bool)
    union = len(set(wm.encoder.pools.flatten().tolist()))
    assert wm.encoder.green_size(bits).item() == union
    assert union < wm.encoder.num_bits * wm.encoder.pools.shape[1]  # semantic pools overlap here


def test_green_list_is_union_of_active_pools(micro_qwen, tokenizer, key):
    wm = _wm(micro_qwen, tokenizer, key)
    wm.close()
    gen = torch.Generator().manual_seed(1)
    bits = torch.rand(5, wm.encoder.num_bits, generator=gen) > 0.5
    scores = torch.zeros(5, wm.vocab_size)
    biased = wm.encoder.bias_logits(scores, bits, 2.0)
    for row in range(5):
        expected = set()
        for b, pool in zip(bits[row].tolist(), wm.encoder.pools.tolist()):
            if b:
                expected |= set(pool)
        assert set(torch.nonzero(biased[row]).flatten().tolist()) == expected
        tokens = torch.arange(wm.vocab_size)
        assert set(torch.nonzero(wm.encoder.is_green(bits[row].expand(wm.vocab_size, -1), tokens)).flatten().tolist()) == expected


def test_ignore_repeated_and_window(micro_qwen, tokenizer, key):
    with _wm(micro_qwen, tokenizer, key, watermark=WatermarkConfig(delta=4.0, ignore_repeated=True, window=16, capture_top_k=256)) as wm:
        prompt_ids, wm_ids = wm.generate_ids(PROMPTS[:2], GEN)
        repeated = [[tokenizer.convert_tokens_to_ids("a")] * 40]
        out = wm.detect_ids(wm_ids + repeated, prompt_ids + [prompt_ids[0]])
        wm.watermark_cfg.ignore_repeated = False
        full = wm.detect_ids(repeated, [prompt_ids[0]])
    assert out.window_statistic is not None and np.isfinite(out.window_statistic[:2]).all()
    assert (out.window_p_value[:2] <= 0.01).all()  # the window maximum is calibrated by the reference keys too
    # a run of one token repeats (signature, token) pairs: deduplication scores far fewer of them
    assert out.num_tokens_scored[2] < full.num_tokens_scored[0]


def test_short_text_reports_nan_instead_of_raising(micro_qwen, tokenizer, key):
    with _wm(micro_qwen, tokenizer, key, watermark=WatermarkConfig(min_tokens=16)) as wm:
        [result] = wm.detect(["short"], ["A prompt"])
    assert math.isnan(result.z_score) and result.prediction is False
    assert "min_tokens=16" in result.note


@pytest.mark.parametrize(
    "extractor, encoder, message",
    [
        (ExtractorConfig(start_layer_idx=2, end_layer_idx=2), None, "extractor.end_layer_idx=2"),
        (ExtractorConfig(end_layer_idx=9), None, "allowed range is [1, 4]"),
        (ExtractorConfig(start_layer_idx=7), None, "extractor.start_layer_idx=7: allowed range is [0, 3]"),
        (ExtractorConfig(use_top_k=True, k=0), None, "extractor.k=0"),
        (ExtractorConfig(use_top_k=True, k=9), None, "extractor.k=9: allowed range is [1, 8]"),
        (None, EncoderConfig(num_bits=0), "encoder.num_bits=0"),
        (None, EncoderConfig(pool_size=0), "encoder.pool_size=0"),
        (None, EncoderConfig(pool_size=100000), "encoder.pool_size=100000: allowed range is [1, 259]"),
    ],
)
def test_bad_configuration_is_refused_with_the_key_and_range(micro_qwen, tokenizer, key, extractor, encoder, message):
    with pytest.raises(ConfigError) as err:
        _wm(micro_qwen, tokenizer, key, extractor=extractor, encoder=encoder)
    assert message in str(err.value)


def test_bad_texts_are_refused(micro_qwen, tokenizer, key):
    with _wm(micro_qwen, tokenizer, key) as wm:
        with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
            wm.detect(["fine text here", "   "])
        with pytest.raises(ValueError, match="prompts"):
            wm.detect(["a", "b"], ["only one prompt"])


def test_tokenizer_vocabulary_must_fit_the_model(tokenizer, key):
    small = micro_model("qwen2_moe", vocab_size=200)
    with pytest.raises(ConfigError, match="tokenizer has 259 tokens"):
        _wm(small, tokenizer, key)


def test_dense_model_needs_the_hidden_extractor(tokenizer, key):
    dense = micro_model("qwen2")
    with pytest.raises(NotAnMoEModelError, match="extractor=hidden"):
        _wm(dense, tokenizer, key)
    with _wm(dense, tokenizer, key, extractor=ExtractorConfig(kind="hidden", start_layer_idx=1, end_layer_idx=3)) as wm:
        prompt_ids, wm_ids = wm.generate_ids(PROMPTS[:4], GEN)
        assert wm.detect_ids(wm_ids, prompt_ids).z_score.min() > 4


def test_key_never_appears_in_repr_or_errors(micro_qwen, tokenizer):
    key = WatermarkKey(TEST_SECRET, 1)
    assert TEST_SECRET not in repr(key) and TEST_SECRET not in str(key)
    assert len(key.secret_fingerprint) == 8
    with pytest.raises(ConfigError) as err:
        _wm(micro_qwen, tokenizer, key, encoder=EncoderConfig(num_bits=-1))
    assert TEST_SECRET not in str(err.value)


def test_processor_works_inside_plain_model_generate(micro_qwen, tokenizer, key):
    with _wm(micro_qwen, tokenizer, key) as wm:
        enc = tokenizer(["Once upon a time"], return_tensors="pt")
        torch.manual_seed(0)
        out = micro_qwen.generate(**enc, logits_processor=[wm.logits_processor], max_new_tokens=70, min_new_tokens=70,
                                  do_sample=True, pad_token_id=tokenizer.pad_token_id)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        [res] = wm.detect_ids([new], [enc["input_ids"][0].tolist()]).results()
    assert res.z_score > 4


def test_null_is_standard_normal_on_random_tokens_even_when_gamma_is_large(micro_qwen, tokenizer, key):
    # 16 bits x 48-token pools cover much of a 259-token vocabulary: gamma must count only the tokens
    # that can occur in text (not the special ones), or the null z drifts upwards.
    wm = _wm(micro_qwen, tokenizer, key, encoder=EncoderConfig(num_bits=16, pool_size=48), watermark=WatermarkConfig(min_tokens=1, null="uniform"))
    wm.close()
    usable = torch.nonzero(wm.encoder.usable).flatten()
    gen = torch.Generator().manual_seed(7)
    texts = usable[torch.randint(len(usable), (96, 96), generator=gen)].tolist()
    prompts = [[usable[0].item()]] * len(texts)
    z = wm.detect_ids(texts, prompts).z_score
    assert wm.encoder.gamma(torch.ones(1, 16, dtype=torch.bool)).item() > 0.5
    assert abs(z.mean()) < 3 / math.sqrt(len(z)) * 1.0 + 0.05, z.mean()
    assert 0.75 < z.std() < 1.25, z.std()


def test_generation_never_samples_ids_the_tokenizer_lacks(tokenizer, key):
    model = micro_model("qwen2_moe", vocab_size=400)  # spare embedding rows, as in padded real vocabularies
    with _wm(model, tokenizer, key) as wm:
        _, ids = wm.generate_ids(PROMPTS[:4], GenerationConfig(max_new_tokens=48, min_new_tokens=48))
        out = wm.detect_ids(ids, [wm.encode_prompt(p) for p in PROMPTS[:4]])
    assert max(max(row) for row in ids) < len(tokenizer)
    assert (out.num_tokens_scored == 48).all() and out.z_score.min() > 4


def test_detection_batches_respect_both_limits():
    from moewm.engine.capture import detection_batches

    lengths = [1000, 600, 500, 90, 80, 80, 70, 10]  # sorted longest first, as detect_ids sorts them
    assert detection_batches(lengths, 16, None) == [(0, 8)]
    assert detection_batches(lengths, 3, None) == [(0, 3), (3, 6), (6, 8)]
    # 800 tokens: the 1000-token row alone (over the limit, never dropped), then 1 x 600, 1 x 500, 8 x 90 > 5 rows.
    assert detection_batches(lengths, 16, 800) == [(0, 1), (1, 2), (2, 3), (3, 8)]
    assert detection_batches([], 16, 800) == []


@pytest.mark.parametrize("null", ["model", "uniform"])
def test_batching_never_changes_a_score(micro_qwen, tokenizer, key, null):
    gen = torch.Generator().manual_seed(3)
    texts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (90, 17, 64, 40, 33, 120)]
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (4, 9, 2, 6, 3, 5)]
    results = []
    for batch, budget in ((1, None), (16, None), (16, 150), (4, 300)):
        cfg = WatermarkConfig(null=null, detect_batch_size=batch, detect_max_tokens=budget)
        wm = MoELSHWatermark(micro_qwen, tokenizer, encoder=EncoderConfig(num_bits=16, pool_size=8), watermark=cfg, key=key)
        results.append(wm.detect_ids(texts, prompts))
        wm.close()
    for other in results[1:]:
        np.testing.assert_array_equal(other.num_green_tokens, results[0].num_green_tokens)
        np.testing.assert_allclose(other.z_score, results[0].z_score, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (WatermarkConfig(detect_batch_size=0), "watermark.detect_batch_size=0: must be >= 1"),
        (WatermarkConfig(detect_max_tokens=0), "watermark.detect_max_tokens=0: must be >= 1 (or null for no limit)"),
        (WatermarkConfig(null="flat"), "watermark.null='flat': allowed values are model, uniform"),
    ],
)
def test_bad_watermark_settings_name_the_key(cfg, message):
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert message in str(err.value)
