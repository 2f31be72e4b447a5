"""evaluate_job on micro job contexts; null calibration and the length curve on constructed inputs."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import PROMPTS, TEST_SECRET
from moewm import stats
from moewm.baselines import build_watermarker
from moewm.calibration import calibrate
from moewm.config import AttackConfig, EncoderConfig, EvalConfig, ExtractorConfig, GenerationConfig, WatermarkConfig
from moewm.evaluation import evaluate_job, null_calibration, w1_contexts
from moewm.job import JobContext
from moewm.keys import WatermarkKey
from moewm.length_curve import PositionScores, length_curve, position_scores
from moewm.watermark import encode_prompt, generate_batched

GEN = GenerationConfig(max_new_tokens=36, min_new_tokens=36, batch_size=8)
NUM = 6  # prompts per job


@pytest.fixture(scope="module")
def plain(micro_qwen, tokenizer):
    prompt_ids = [encode_prompt(tokenizer, p) for p in PROMPTS[:NUM]]
    return prompt_ids, generate_batched(micro_qwen, tokenizer, prompt_ids, GEN, [])


def _context(model, tokenizer, plain, kind, attack, tmp_path, encoder=None, eval_cfg=None, calibration=True):
    prompt_ids, plain_ids = plain
    extractor = ExtractorConfig()
    encoder = encoder or EncoderConfig(kind="centered", num_bits=16, pool_size=8)
    wcfg = WatermarkConfig(delta=4.0)
    cal = None
    if calibration:
        cal = calibrate(model, tokenizer, extractor, encoder, [p + t for p, t in zip(prompt_ids, plain_ids)], tmp_path / "cal", "micro")
    wm = build_watermarker(kind, model, tokenizer, wcfg, WatermarkKey(TEST_SECRET, 0), extractor=extractor, encoder=encoder, calibration=cal)
    wm_ids = wm.generate_from_ids(prompt_ids, GEN)
    cfg = SimpleNamespace(watermark=wcfg, encoder=encoder, extractor=extractor, generation=GEN, attack=attack,
                          eval=eval_cfg or EvalConfig(lengths=[16, 32, 64], w1_contexts=8, kmeans_clusters=8, window=16), seed=0)
    return JobContext(cfg, model, tokenizer, wm, PROMPTS[:NUM], prompt_ids, wm_ids, plain_ids, wm.detect_ids(wm_ids, prompt_ids),
                      wm.detect_ids(plain_ids, prompt_ids), cal, tmp_path)


def _check_flat(metrics):
    json.dumps(metrics)  # JSON-serialisable
    for k, v in metrics.items():
        assert k == k.lower() and " " not in k, k
        assert isinstance(v, (bool, int, float, str)), (k, type(v))
        if isinstance(v, float):
            assert math.isfinite(v), (k, v)


def test_moe_lsh_job_gets_every_metric_group(micro_qwen, tokenizer, plain, tmp_path):
    ctx = _context(micro_qwen, tokenizer, plain, "moe_lsh", AttackConfig(name="substitution", strength=0.3), tmp_path)
    m = evaluate_job(ctx)
    ctx.watermarker.close()
    _check_flat(m)
    for key in ("null_z_mean", "null_z_std", "null_z_p99", "false_positive_rate_empirical", "null_ok",
                "attack_name", "attack_strength", "z_attacked_mean", "detection_rate_attacked", "auc_attacked",
                "tpr_at_1pct_fpr_attacked", "window_z_attacked_mean", "window_auc_attacked",
                "distinct_1_wm", "distinct_2_wm", "distinct_3_wm", "log_diversity_wm", "log_diversity_unwm", "length_mean_wm",
                "z_wm_at_16", "z_unwm_at_16", "tpr_at_16", "detection_rate_at_32",
                "geo_bit_entropy", "geo_dead_bits", "geo_joint_entropy", "geo_proj_var_ratio_mean", "geo_pca_alignment",
                "geo_pool_split_entropy", "geo_w1_mean", "geo_gamma_mean"):
        assert key in m, key
    assert "z_wm_at_64" not in m  # 36-token texts do not reach 64 scored tokens
    assert m["attack_name"] == "substitution" and m["attack_strength"] == 0.3
    assert m["z_wm_at_32"] > m["z_wm_at_16"] > 2  # evidence grows with length
    assert m["z_attacked_mean"] < stats.nan_safe_mean(ctx.wm_det.z_score)  # the attack costs detection
    assert m["tokens_attacked_mean"] == 36  # substitution works on the ids: same length
    assert m["null_ok"] is True
    assert m["geo_proj_offset_mean"] < 1e-3  # centred encoder: the calibration mean sits on every hyperplane


def test_baseline_job_without_geometry(micro_qwen, tokenizer, plain, tmp_path):
    ctx = _context(micro_qwen, tokenizer, plain, "kgw", AttackConfig(name="deletion", strength=0.5), tmp_path, calibration=False)
    m = evaluate_job(ctx)
    _check_flat(m)
    assert not any(k.startswith("geo_") for k in m)
    assert m["z_wm_at_32"] > 4 and "z_attacked_mean" in m and m["attack_name"] == "deletion"
    assert m["attacked_changed_fraction"] > 0


def test_no_attack_and_no_quality(micro_qwen, tokenizer, plain, tmp_path):
    ctx = _context(micro_qwen, tokenizer, plain, "synthid", AttackConfig(), tmp_path, calibration=False,
                   eval_cfg=EvalConfig(lengths=[8, 16], quality=False, geometry=False, window=8))
    m = evaluate_job(ctx)
    _check_flat(m)
    assert m["attack_name"] == "none" and "z_attacked_mean" not in m
    assert "distinct_1_wm" not in m and "z_wm_at_8" in m and "z_wm_at_16" in m


def test_zero_strength_attack_reproduces_the_unattacked_detection(micro_qwen, tokenizer, plain, tmp_path):
    ctx = _context(micro_qwen, tokenizer, plain, "kgw", AttackConfig(name="swap", strength=0.0), tmp_path, calibration=False)
    m = evaluate_job(ctx)
    assert m["z_attacked_mean"] == pytest.approx(stats.nan_safe_mean(ctx.wm_det.z_score))
    assert m["attacked_changed_fraction"] == 0.0


def test_null_calibration_flags():
    rng = np.random.default_rng(0)
    good = null_calibration(rng.normal(size=2000), 4.0)
    assert good["null_ok"] is True and abs(good["null_z_mean"]) < 0.1
    assert good["false_positive_rate_nominal"] == pytest.approx(3.167e-5, rel=1e-3)
    shifted = null_calibration(rng.normal(0.3, 1.0, size=2000), 4.0)
    assert shifted["null_ok"] is False
    wide = null_calibration(rng.normal(0.0, 1.6, size=2000), 4.0)
    assert wide["null_ok"] is False and wide["false_positive_rate_empirical"] > 1e-3
    z = rng.normal(size=200)
    z[:3] = 5.0  # 3 false positives in 200 at z > 4: far above 3e-5
    tail = null_calibration(z, 4.0)
    assert tail["null_ok"] is False and tail["null_fpr_pvalue"] < 1e-3
    tiny = null_calibration(np.array([np.nan, 0.5]), 4.0)
    assert tiny["null_n"] == 1 and tiny["null_ok"] is True


def test_w1_contexts_do_not_depend_on_the_key():
    prompts = [[1, 2], [3], []]
    plain = [[5, 6, 7], [8], [9, 9]]
    a = w1_contexts(prompts, plain, 5)
    assert a == w1_contexts(prompts, plain, 5) and len(a) == 5 and all(a)
    assert all(c[: len(prompts[i % 3])] == prompts[i % 3] for i, c in enumerate(a[:2]))


# -- length curve ---------------------------------------------------------------------------------
def test_prefix_z_equals_the_z_of_the_truncated_text():
    gen = torch.Generator().manual_seed(0)
    green = torch.rand(5, 50, generator=gen) < 0.4
    gamma = 0.1 + 0.4 * torch.rand(5, 50, generator=gen, dtype=torch.float64)
    scored = torch.rand(5, 50, generator=gen) < 0.8
    ps = PositionScores.from_positions(green, gamma, scored)
    lengths = [4, 16, 30]
    z = ps.z_at_lengths(lengths)
    for b in range(5):
        idx = torch.nonzero(scored[b]).flatten()
        for j, t in enumerate(lengths):
            if len(idx) < t:
                assert np.isnan(z[b, j])
                continue
            keep = torch.zeros(50, dtype=torch.bool)
            keep[idx[:t]] = True
            ref = stats.exact_gamma_z(green[b : b + 1], gamma[b : b + 1], keep.unsqueeze(0))["z_score"].item()
            assert z[b, j] == pytest.approx(ref, rel=1e-12)
    np.testing.assert_allclose(ps.z(), stats.exact_gamma_z(green, gamma, scored)["z_score"].numpy(), rtol=1e-12)


def test_length_curve_separation():
    gen = torch.Generator().manual_seed(1)
    n, length = 200, 64
    gamma = torch.full((n, length), 0.25, dtype=torch.float64)
    scored = torch.ones(n, length, dtype=torch.bool)
    wm = PositionScores.from_positions(torch.rand(n, length, generator=gen) < 0.5, gamma, scored)
    null = PositionScores.from_positions(torch.rand(n, length, generator=gen) < 0.25, gamma, scored)
    curve = length_curve(wm, null, [16, 64, 128], z_threshold=4.0)
    assert "z_wm_at_128" not in curve
    assert curve["z_wm_at_64"] == pytest.approx(2 * curve["z_wm_at_16"], rel=0.15)  # z grows like sqrt(T)
    assert curve["tpr_at_64"] > curve["tpr_at_16"]
    assert abs(curve["z_unwm_at_64"]) < 0.3 and curve["fpr_at_64"] == 0.0
    assert curve["n_wm_at_16"] == n


def test_moe_position_scores_match_the_detector(micro_qwen, tokenizer, plain, key):
    from moewm.watermark import MoELSHWatermark

    prompt_ids, plain_ids = plain
    for wcfg in (WatermarkConfig(), WatermarkConfig(ignore_repeated=True)):
        with MoELSHWatermark(micro_qwen, tokenizer, ExtractorConfig(token_idx=-2), EncoderConfig(num_bits=16, pool_size=8), wcfg, key) as wm:
            det = wm.detect_ids(plain_ids[:4], prompt_ids[:4])
            ps = position_scores(wm, plain_ids[:4], prompt_ids[:4], batch_size=3)
        assert (ps.tokens_scored() == det.num_tokens_scored).all()
        np.testing.assert_allclose(ps.z(), det.z_score, rtol=1e-6)  # float32 logits: batch padding moves the 9th digit
