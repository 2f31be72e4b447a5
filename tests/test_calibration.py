"""Calibration: features of real positions only, statistics, cache keyed by inputs, deterministic encoders."""

import numpy as np
import pytest
import torch

from conftest import PROMPTS, TEST_SECRET
from moewm.engine.calibration import cache_key, calibrate, calibration_rows
from moewm.config import ENCODER_KINDS, EncoderConfig, ExtractorConfig, WatermarkConfig
from moewm.engine.keys import WatermarkKey
from moewm.engine.keybank import build_encoder
from moewm.engine.routing import FeatureCapture
from moewm.schemes.moe_lsh import MoELSHWatermark


from moewm.engine.generation import usable_tokens


@pytest.fixture(scope="module")
def rows(tokenizer):
    texts = PROMPTS + [p + " and then something else happened, as it always does." for p in PROMPTS]
    return [list(tokenizer(t)["input_ids"]) for t in texts]


def test_features_are_the_real_positions_of_each_row(micro_qwen, tokenizer, rows, tmp_path):
    enc = EncoderConfig(calibration_texts=5, calibration_max_tokens=12)
    cal = calibrate(micro_qwen, tokenizer, ExtractorConfig(), enc, rows, tmp_path, "micro")
    used = calibration_rows(rows, enc)
    assert len(used) == 5 and all(len(r) <= 12 for r in used)
    assert cal.features.dtype == torch.float32 and cal.features.device.type == "cpu"
    assert cal.features.shape == (sum(len(r) for r in used), 4 * 8)  # 4 MoE layers x 8 experts
    # one unpadded forward per row gives the same vectors: padding never leaks in
    capture = FeatureCapture(micro_qwen, ExtractorConfig())
    single = []
    for r in used:
        micro_qwen(input_ids=torch.tensor([r]), use_cache=False)
        single.append(capture.features(1)[0])
    capture.detach()
    torch.testing.assert_close(cal.features, torch.cat(single), atol=1e-5, rtol=1e-4)
    # statistics
    x = cal.features.double().numpy()
    np.testing.assert_allclose(cal.stats.mean.numpy(), x.mean(0), atol=1e-10)
    np.testing.assert_allclose(cal.stats.cov.numpy(), np.cov(x, rowvar=False), atol=1e-10)
    assert cal.stats.count == len(x)


def test_second_call_hits_the_cache_and_inputs_change_the_key(micro_qwen, tokenizer, rows, tmp_path):
    enc = EncoderConfig(calibration_texts=6, calibration_max_tokens=16)
    first = calibrate(micro_qwen, tokenizer, ExtractorConfig(), enc, rows, tmp_path, "micro")
    assert not first.from_cache and first.cache_path.exists()
    second = calibrate(micro_qwen, tokenizer, ExtractorConfig(), enc, rows, tmp_path, "micro")
    assert second.from_cache and second.cache_path == first.cache_path
    assert torch.equal(second.features, first.features)
    assert torch.equal(second.stats.cov, first.stats.cov)
    # encoder kind / bits do not matter (one calibration per model and extractor) ...
    same = cache_key("micro", ExtractorConfig(), EncoderConfig(kind="pca", num_bits=8, calibration_texts=6, calibration_max_tokens=16),
                     calibration_rows(rows, enc))
    assert first.cache_path.name == f"calib-{same}.pt"
    # ... but model, extractor and data do
    other = calibrate(micro_qwen, tokenizer, ExtractorConfig(start_layer_idx=1), enc, rows, tmp_path, "micro")
    assert other.cache_path != first.cache_path and other.features.shape[1] == 3 * 8
    assert cache_key("other-model", ExtractorConfig(), enc, calibration_rows(rows, enc)) != same
    assert cache_key("micro", ExtractorConfig(), enc, calibration_rows(rows[1:], enc)) != same
    assert len(list(tmp_path.glob("calib-*.pt"))) == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_a_corrupt_cache_file_is_recomputed(micro_qwen, tokenizer, rows, tmp_path):
    enc = EncoderConfig(calibration_texts=4)
    first = calibrate(micro_qwen, tokenizer, ExtractorConfig(), enc, rows, tmp_path, "micro")
    first.cache_path.write_bytes(b"not a torch file")
    again = calibrate(micro_qwen, tokenizer, ExtractorConfig(), enc, rows, tmp_path, "micro")
    assert not again.from_cache and torch.equal(again.features, first.features)


def test_encoder_variants_are_deterministic_given_key_and_calibration(micro_qwen, tokenizer, rows, tmp_path):
    cal = calibrate(micro_qwen, tokenizer, ExtractorConfig(), EncoderConfig(), rows, tmp_path, "micro")
    emb = micro_qwen.get_input_embeddings().weight
    valid = usable_tokens(tokenizer, emb.shape[0])
    planes = {}
    for kind in ENCODER_KINDS:
        cfg = EncoderConfig(kind=kind, num_bits=16, pool_size=8)
        a = build_encoder(cfg, WatermarkKey(TEST_SECRET, 0), cal.features.shape[1], emb, valid, emb.shape[0], cal.stats)
        b = build_encoder(cfg, WatermarkKey(TEST_SECRET, 0), cal.features.shape[1], emb, valid, emb.shape[0], cal.stats)
        c = build_encoder(cfg, WatermarkKey(TEST_SECRET, 1), cal.features.shape[1], emb, valid, emb.shape[0], cal.stats)
        assert torch.equal(a.projection, b.projection) and torch.equal(a.center, b.center)
        assert not torch.equal(a.projection, c.projection)
        planes[kind] = a.projection
    kinds = list(planes)
    for i in range(len(kinds)):
        for j in range(i + 1, len(kinds)):
            if {kinds[i], kinds[j]} != {"simhash", "centered"}:  # those two share hyperplanes, not centres
                assert not torch.equal(planes[kinds[i]], planes[kinds[j]])
    # the centred variants split the calibration data evenly: the mean sits on every hyperplane
    centred = build_encoder(EncoderConfig(kind="centered", num_bits=16, pool_size=8), WatermarkKey(TEST_SECRET, 0),
                            cal.features.shape[1], emb, valid, emb.shape[0], cal.stats)
    balance = centred.signature(cal.features).float().mean(0)
    plain = build_encoder(EncoderConfig(kind="simhash", num_bits=16, pool_size=8), WatermarkKey(TEST_SECRET, 0),
                          cal.features.shape[1], emb, valid, emb.shape[0], cal.stats)
    plain_balance = plain.signature(cal.features).float().mean(0)
    assert (balance - 0.5).abs().mean() < (plain_balance - 0.5).abs().mean()


def test_calibrated_watermarker_detects(micro_qwen, tokenizer, rows, tmp_path, key):
    from moewm.config import GenerationConfig

    cal = calibrate(micro_qwen, tokenizer, ExtractorConfig(), EncoderConfig(), rows, tmp_path, "micro")
    with MoELSHWatermark(micro_qwen, tokenizer, ExtractorConfig(), EncoderConfig(kind="whitened", num_bits=16, pool_size=8),
                         WatermarkConfig(delta=4.0), key, calibration=cal.stats) as wm:
        prompt_ids, ids = wm.generate_ids(PROMPTS[:4], GenerationConfig(max_new_tokens=48, min_new_tokens=48))
        assert wm.detect_ids(ids, prompt_ids).z_score.min() > 4


def test_too_few_rows_is_refused(micro_qwen, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        calibrate(micro_qwen, tokenizer, ExtractorConfig(), EncoderConfig(), [[1, 2, 3], []], tmp_path, "micro")
