"""KGW and SynthID through transformers, MoE-LSH, and the null control: each detects its own watermark only."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from conftest import PROMPTS, TEST_SECRET
from moewm.schemes.kgw import KGWWatermark
from moewm.schemes.none import NoWatermark
from moewm.schemes.synthid import SynthIDWatermark
from moewm.schemes.registry import build_watermarker
from moewm.schemes.ngram_base import key_int
from moewm.config import ConfigError, EncoderConfig, ExtractorConfig, GenerationConfig, KGWConfig, WatermarkConfig
from moewm.engine.keys import WatermarkKey
from moewm.schemes.moe_lsh import MoELSHWatermark

GEN = GenerationConfig(max_new_tokens=72, min_new_tokens=72, batch_size=8)
ENC = EncoderConfig(num_bits=16, pool_size=8)
KINDS = ("moe_lsh", "kgw", "synthid")


@pytest.fixture(scope="module")
def schemes(micro_qwen, tokenizer):
    key = WatermarkKey(TEST_SECRET, 0)
    cfg = WatermarkConfig(delta=4.0)
    wms = {k: build_watermarker(k, micro_qwen, tokenizer, cfg, key, extractor=ExtractorConfig(), encoder=ENC) for k in KINDS}
    texts = {}
    for k, wm in wms.items():
        prompt_ids, texts[k] = wm.generate_ids(PROMPTS, GEN)
    _, texts["plain"] = wms["kgw"].generate_ids(PROMPTS, GEN, watermark=False)
    yield wms, prompt_ids, texts
    for wm in wms.values():
        wm.close()


def test_each_scheme_detects_its_own_watermark_and_not_the_others(schemes):
    wms, prompt_ids, texts = schemes
    z = {(t, d): wms[d].detect_ids(texts[t], prompt_ids).z_score for t in (*KINDS, "plain") for d in KINDS}
    for t in KINDS:
        for d in KINDS:
            assert np.isfinite(z[t, d]).all()
            if t == d:
                assert z[t, d].min() > 4.0, (t, d, z[t, d])
            else:
                assert z[t, d].max() < 4.0, (t, d, z[t, d])
                assert abs(z[t, d].mean()) < 2.0, (t, d, z[t, d])
    for d in KINDS:
        assert z["plain", d].max() < 4.0 and abs(z["plain", d].mean()) < 1.5, (d, z["plain", d])


def test_outputs_fill_the_moe_detector_fields(schemes):
    wms, prompt_ids, texts = schemes
    kgw = wms["kgw"].detect_ids(texts["kgw"], prompt_ids)
    assert (kgw.num_tokens_scored <= 72).all() and (kgw.num_tokens_scored > 50).all()  # the continuation's distinct n-grams
    assert kgw.prediction.all() and (kgw.p_value < 1e-4).all()
    assert np.allclose(kgw.gamma_mean, int(259 * 0.25) / 259)
    assert np.allclose(kgw.green_fraction, kgw.num_green_tokens / kgw.num_tokens_scored)
    syn = wms["synthid"].detect_ids(texts["synthid"], prompt_ids)
    depth = wms["synthid"].depth
    assert depth == 20
    assert (syn.num_tokens_scored <= 72).all() and (syn.num_tokens_scored > 60).all()
    assert np.allclose(syn.green_fraction, syn.num_green_tokens / (syn.num_tokens_scored * depth))
    assert abs(syn.gamma_mean[0] - 0.5) < 0.01  # p0: the sampling table's mean
    assert syn.results()[0].prediction  # the output converts to per-text results


def test_kgw_scores_only_the_continuation_with_the_transformers_detector(schemes, tokenizer):
    wms, prompt_ids, texts = schemes
    kgw: KGWWatermark = wms["kgw"]
    # per-position green flags of the continuation: the same counts as transformers' WatermarkDetector on
    # the full row minus the prompt's own n-grams
    ps = kgw.position_scores(texts["kgw"], prompt_ids, distinct=False)
    full = kgw.detector(torch.tensor([[kgw._sentinel] + prompt_ids[0] + texts["kgw"][0]]), return_dict=True)
    prompt_only = kgw.detector(torch.tensor([[kgw._sentinel] + prompt_ids[0]]), return_dict=True)
    assert ps.tokens_scored()[0] == full.num_tokens_scored[0] - prompt_only.num_tokens_scored[0]
    assert int(ps.green[0].sum()) == full.num_green_tokens[0] - prompt_only.num_green_tokens[0]
    # detection scores each distinct n-gram once (its exact binomial test needs distinct draws)
    out = kgw.detect_ids(texts["kgw"], prompt_ids)
    distinct = kgw.position_scores(texts["kgw"], prompt_ids, distinct=True)
    assert (distinct.tokens_scored() == out.num_tokens_scored).all()
    assert (distinct.green.sum(-1).numpy() == out.num_green_tokens).all()
    np.testing.assert_allclose(distinct.z(), out.z_score, rtol=1e-10)


def test_kgw_ignore_repeated_matches_the_detector(micro_qwen, tokenizer):
    key = WatermarkKey(TEST_SECRET, 1)
    kgw = build_watermarker("kgw", micro_qwen, tokenizer, WatermarkConfig(ignore_repeated=True, min_tokens=1), key)
    text = [[40, 41, 40, 41, 40, 41, 42, 43] * 4]
    out = kgw.detect_ids(text, [[30]])
    row = [30] + text[0]
    assert out.num_tokens_scored[0] == len(set(zip(row[:-1], row[1:]))) == 6  # each distinct bigram once
    ps = kgw.position_scores(text, [[30]])
    assert ps.tokens_scored()[0] == out.num_tokens_scored[0]
    assert ps.green.sum().item() == out.num_green_tokens[0]


def test_synthid_mean_g_null_is_standard_normal_on_unwatermarked_tokens(micro_qwen, tokenizer):
    """Under H0 g-values are Bernoulli(p0): z of the mean g over n x m draws is ~ N(0, 1)."""
    syn = build_watermarker("synthid", micro_qwen, tokenizer, WatermarkConfig(min_tokens=1), WatermarkKey(TEST_SECRET, 2))
    kgw = build_watermarker("kgw", micro_qwen, tokenizer, WatermarkConfig(min_tokens=1), WatermarkKey(TEST_SECRET, 2))
    gen = torch.Generator().manual_seed(0)
    texts = torch.randint(3, 256, (400, 64), generator=gen).tolist()  # unwatermarked token streams
    for wm in (syn, kgw):
        z = wm.detect_ids(texts, [[1]] * len(texts)).z_score
        assert abs(z.mean()) < 4 / np.sqrt(len(z)) * 1.2, (type(wm).__name__, z.mean())
        assert 0.85 < z.std() < 1.15, (type(wm).__name__, z.std())
        # tail: the share above 1.645 is near 5%
        assert abs(np.mean(z > 1.645) - 0.05) < 0.035
    p0 = syn.p0
    assert abs(p0 - 0.5) < 4 * np.sqrt(0.25 / 2**16)


def test_synthid_scores_what_generation_keyed(schemes):
    """The first ngram_len - 1 tokens use the processor's all-zero context; every token is watermarked."""
    wms, prompt_ids, texts = schemes
    syn: SynthIDWatermark = wms["synthid"]
    ps = syn.position_scores(texts["synthid"][:4], prompt_ids[:4])
    draws = ps.green.reshape(4, -1, syn.depth) if ps.green.shape[1] % syn.depth == 0 else None
    assert draws is not None
    # the early tokens (zero context) carry the watermark as strongly as later ones
    early = draws[:, :4].double().mean().item()
    assert early > syn.p0 + 0.05


def test_keys_derive_from_the_watermark_key(micro_qwen, tokenizer):
    cfg = WatermarkConfig()
    a = build_watermarker("kgw", micro_qwen, tokenizer, cfg, WatermarkKey(TEST_SECRET, 0))
    b = build_watermarker("kgw", micro_qwen, tokenizer, cfg, WatermarkKey(TEST_SECRET, 0))
    c = build_watermarker("kgw", micro_qwen, tokenizer, cfg, WatermarkKey(TEST_SECRET, 1))
    d = build_watermarker("kgw", micro_qwen, tokenizer, cfg, WatermarkKey("other-secret", 0))
    assert a.watermarking_config.hashing_key == b.watermarking_config.hashing_key
    assert len({a.watermarking_config.hashing_key, c.watermarking_config.hashing_key, d.watermarking_config.hashing_key}) == 3
    s0 = build_watermarker("synthid", micro_qwen, tokenizer, cfg, WatermarkKey(TEST_SECRET, 0))
    s1 = build_watermarker("synthid", micro_qwen, tokenizer, cfg, WatermarkKey(TEST_SECRET, 1))
    assert s0.watermarking_config.keys != s1.watermarking_config.keys
    assert len(set(s0.watermarking_config.keys)) == cfg.synthid.num_keys
    assert key_int(WatermarkKey(TEST_SECRET, 0), "kgw") == a.watermarking_config.hashing_key
    assert TEST_SECRET not in repr(a.watermarking_config.to_dict())


def test_other_seed_does_not_detect(schemes, micro_qwen, tokenizer):
    wms, prompt_ids, texts = schemes
    for kind in ("kgw", "synthid"):
        other = build_watermarker(kind, micro_qwen, tokenizer, WatermarkConfig(delta=4.0), WatermarkKey(TEST_SECRET, 9))
        assert other.detect_ids(texts[kind], prompt_ids).z_score.max() < 4.0


def test_none_is_plain_generation_scored_by_moe_lsh(micro_qwen, tokenizer):
    key = WatermarkKey(TEST_SECRET, 0)
    none = build_watermarker("none", micro_qwen, tokenizer, WatermarkConfig(delta=4.0), key, extractor=ExtractorConfig(), encoder=ENC)
    assert isinstance(none, NoWatermark) and none.key is key
    gen = GenerationConfig(max_new_tokens=40, min_new_tokens=40)
    prompt_ids, ids = none.generate_ids(PROMPTS[:4], gen)  # watermark=True is ignored
    _, plain = none.generate_ids(PROMPTS[:4], gen, watermark=False)
    assert ids == plain
    det = none.detect_ids(ids, prompt_ids)
    assert det.z_score.max() < 4.0
    with MoELSHWatermark(micro_qwen, tokenizer, ExtractorConfig(), ENC, WatermarkConfig(delta=4.0), key) as moe:
        np.testing.assert_allclose(moe.detect_ids(ids, prompt_ids).z_score, det.z_score)
    none.close()


def test_window_and_min_tokens(schemes, micro_qwen, tokenizer):
    wms, prompt_ids, texts = schemes
    key = WatermarkKey(TEST_SECRET, 0)
    for kind in ("kgw", "synthid"):
        wm = build_watermarker(kind, micro_qwen, tokenizer, WatermarkConfig(delta=4.0, window=16, min_tokens=16), key)
        out = wm.detect_ids(texts[kind][:2] + [texts[kind][0][:5]], prompt_ids[:3])
        assert np.isfinite(out.window_statistic[:2]).all() and (out.window_statistic[:2] > 4).all()
        assert (out.window_p_value[:2] < norm.sf(4.0)).all()
        assert np.isnan(out.z_score[2]) and not out.prediction[2] and "min_tokens=16" in out.notes[2]


def test_build_watermarker_refuses_unknown_kinds_and_arguments(micro_qwen, tokenizer):
    key = WatermarkKey(TEST_SECRET, 0)
    with pytest.raises(ConfigError, match="watermark.kind='dipper'"):
        build_watermarker("dipper", micro_qwen, tokenizer, WatermarkConfig(), key)
    with pytest.raises(TypeError, match="unexpected"):
        build_watermarker("kgw", micro_qwen, tokenizer, WatermarkConfig(), key, temperature=2)
    with pytest.raises(ValueError, match="empty"):
        build_watermarker("kgw", micro_qwen, tokenizer, WatermarkConfig(), key).detect_ids([[]], [[1]])


@pytest.mark.parametrize("scheme, width", [("lefthash", 1), ("lefthash", 3), ("selfhash", 1), ("selfhash", 2)])
def test_kgw_position_scores_match_the_detector_for_every_seeding_scheme(micro_qwen, tokenizer, scheme, width):
    cfg = WatermarkConfig(kgw=KGWConfig(seeding_scheme=scheme, context_width=width), min_tokens=1, ignore_repeated=False)
    kgw = build_watermarker("kgw", micro_qwen, tokenizer, cfg, WatermarkKey(TEST_SECRET, 3))
    gen = torch.Generator().manual_seed(4)
    texts = torch.randint(3, 256, (6, 30), generator=gen).tolist()
    prompts = [[65, 66, 67, 68], [70], [], [71, 72], [73, 74, 75], [76]]
    ps = kgw.position_scores(texts, prompts)
    need = width - (scheme == "selfhash")
    expected = [30 - max(0, need - len(p)) for p in prompts]  # tokens without a full context are not scored
    assert ps.tokens_scored().tolist() == expected
    # detection counts each distinct n-gram once, as transformers' detector does with ignore_repeated_ngrams
    out = kgw.detect_ids(texts, prompts)
    dedup = build_watermarker("kgw", micro_qwen, tokenizer, WatermarkConfig(kgw=KGWConfig(seeding_scheme=scheme, context_width=width),
                                                                            ignore_repeated=True, min_tokens=1), WatermarkKey(TEST_SECRET, 3))
    for i, (text, prompt) in enumerate(zip(texts, prompts)):
        if len(prompt) < need:
            continue  # the detector would score the sentinel's n-grams too
        row, _ = dedup._rows([text], [prompt])[0]
        ref = dedup.detector(torch.tensor([[dedup._sentinel] + row]), return_dict=True)
        assert out.num_tokens_scored[i] == ref.num_tokens_scored[0] and out.num_green_tokens[i] == ref.num_green_tokens[0]
