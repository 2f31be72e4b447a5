"""evaluate_job and detection_metrics on micro job contexts; null-set checks, tokens to detect and length curves on constructed inputs."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import PROMPTS, TEST_SECRET
from moewm.schemes.registry import build_watermarker
from moewm.engine.calibration import calibrate
from moewm.config import AttackConfig, EncoderConfig, EvalConfig, ExtractorConfig, GenerationConfig, WatermarkConfig
from moewm.engine.detection import DetectorOutput
from moewm.evaluation.job_metrics import detection_metrics, evaluate_job
from moewm.evaluation.job_metrics import JobContext
from moewm.engine.keys import WatermarkKey
from moewm.engine.positions import PositionScores
from moewm.evaluation.length_curve import length_metrics, tokens_to_detect, tokens_to_detect_metrics
from moewm.evaluation.nulls import binomial_bound, null_set_metrics
from moewm.engine.generation import encode_prompt, generate_batched

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
    wcfg = WatermarkConfig(delta=4.0, reference_keys=199, alpha=0.01)
    ev = eval_cfg or EvalConfig(lengths=[16, 32, 64], geometry=True, w1_contexts=8, kmeans_clusters=8, window=16)
    cal = None
    if calibration:
        cal = calibrate(model, tokenizer, extractor, encoder, [p + t for p, t in zip(prompt_ids, plain_ids)], tmp_path / "cal", "micro")
    wm = build_watermarker(kind, model, tokenizer, wcfg, WatermarkKey(TEST_SECRET, 0), extractor=extractor, encoder=encoder,
                           calibration=cal, cache_dir=None)
    wm_ids = wm.generate_from_ids(prompt_ids, GEN)
    cfg = SimpleNamespace(watermark=wcfg, encoder=encoder, extractor=extractor, generation=GEN, attack=attack, eval=ev, seed=0)
    wm_caps, plain_caps = wm.capture(wm_ids, prompt_ids), wm.capture(plain_ids, prompt_ids)
    wm_det = wm.score(wm_caps, prefixes=True, window=ev.window)
    plain_det = wm.score(plain_caps, prefixes=True, window=ev.window)
    return JobContext(cfg, model, tokenizer, wm, PROMPTS[:NUM], prompt_ids, wm_ids, plain_ids, wm_det, plain_det, cal, tmp_path, {},
                      wm_caps, plain_caps)


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
    d = detection_metrics(ctx.wm_det, ctx.plain_det, {}, ctx.cfg.watermark.alpha, ctx.cfg.eval.lengths)
    ctx.watermarker.close()
    _check_flat(m)
    for key in ("attack_name", "attack_strength", "detection_rate_attacked", "auc_attacked", "p_attacked_median",
                "tpr_at_1pct_fpr_attacked", "window_detection_rate_attacked", "window_detection_rate", "window_fpr",
                "distinct_1_wm", "distinct_2_wm", "distinct_3_wm", "log_diversity_wm", "log_diversity_unwm", "length_mean_wm",
                "geo_bit_entropy", "geo_dead_bits", "geo_joint_entropy", "geo_proj_var_ratio_mean", "geo_pca_alignment",
                "geo_pool_split_entropy", "geo_w1_mean", "geo_gamma_mean"):
        assert key in m, key
    for key in ("detection_rate", "false_positive_rate", "fpr_plain", "n_plain", "null_ok", "auc", "tpr_at_1pct_fpr",
                "tpr_at_0p1pct_fpr", "tokens_to_detect_0p02", "never_detected_alpha", "detection_rate_at_16", "fpr_at_32"):
        assert key in d, key
    assert "detection_rate_at_64" not in d  # 36-token texts do not reach 64 scored tokens
    assert m["attack_name"] == "substitution" and m["attack_strength"] == 0.3
    assert d["detection_rate_at_32"] >= d["detection_rate_at_16"]  # evidence grows with length
    assert d["detection_rate"] == 1.0 and d["false_positive_rate"] == 0.0 and d["null_ok"] is True
    assert m["detection_rate_attacked"] <= d["detection_rate"]
    assert m["tokens_attacked_mean"] == 36  # substitution works on the ids: same length
    assert m["geo_proj_offset_mean"] < 1e-3  # centred encoder: the calibration mean sits on every hyperplane


def test_baseline_job_without_geometry(micro_qwen, tokenizer, plain, tmp_path):
    ctx = _context(micro_qwen, tokenizer, plain, "kgw", AttackConfig(name="deletion", strength=0.5), tmp_path, calibration=False)
    m = evaluate_job(ctx)
    d = detection_metrics(ctx.wm_det, ctx.plain_det, {}, 1e-3, [16, 32])
    _check_flat(m)
    assert not any(k.startswith("geo_") for k in m)
    assert d["detection_rate_at_32"] > 0.5 and "detection_rate_attacked" in m and m["attack_name"] == "deletion"
    assert m["attacked_changed_fraction"] > 0


def test_no_attack_and_no_quality(micro_qwen, tokenizer, plain, tmp_path):
    ctx = _context(micro_qwen, tokenizer, plain, "synthid", AttackConfig(), tmp_path, calibration=False,
                   eval_cfg=EvalConfig(lengths=[8, 16], quality=False, geometry=False, window=8))
    m = evaluate_job(ctx)
    _check_flat(m)
    assert m["attack_name"] == "none" and "detection_rate_attacked" not in m
    assert "distinct_1_wm" not in m


def test_zero_strength_attack_reproduces_the_unattacked_detection(micro_qwen, tokenizer, plain, tmp_path):
    ctx = _context(micro_qwen, tokenizer, plain, "kgw", AttackConfig(name="swap", strength=0.0), tmp_path, calibration=False)
    m = evaluate_job(ctx)
    assert m["p_attacked_median"] == pytest.approx(float(np.nanmedian(ctx.wm_det.p_value)))
    assert m["attacked_changed_fraction"] == 0.0


def test_null_set_metrics_flag_a_set_over_its_binomial_bound():
    n = 400
    good = DetectorOutput.empty(n)
    good.p_value = np.linspace(0.001, 1.0, n)  # one at alpha in 400: inside the bound
    bad = DetectorOutput.empty(n)
    bad.p_value = np.where(np.arange(n) < 6, 1e-3, 0.5)  # six in 400 at alpha = 1e-3
    for det in (good, bad):
        det.p_value_model_null = det.p_value
    m = null_set_metrics({"human_a": good, "greedy": bad}, 1e-3)
    assert m["fp_human_a"] == 1 and m["n_human_a"] == n and m["fpr_greedy"] == 6 / n
    assert m["null_ok"] is False and m["null_failures"] == "greedy"
    assert null_set_metrics({"human_a": good}, 1e-3)["null_ok"] is True
    assert binomial_bound(400, 1e-3) == 3  # P(X > 3) < 0.005 for Binomial(400, 1e-3)


def test_tokens_to_detect_is_where_p_stays_under_the_threshold():
    prefix = [np.array([0.5, 0.01, 0.3, 0.01, 0.001, 0.001]), np.array([0.5, 0.4]), np.array([0.001, 0.001]), np.zeros(0)]
    t = tokens_to_detect(prefix, 0.02)
    assert t[0] == 4 and np.isnan(t[1]) and t[2] == 1 and np.isnan(t[3])
    m = tokens_to_detect_metrics(prefix, {"0p02": 0.02})
    assert m["tokens_to_detect_0p02"] == 2.5 and m["never_detected_0p02"] == 0.5
    curve = length_metrics([np.array([0.5, 0.001]), np.array([0.001, 0.001])], [np.array([0.2, 0.3])], [1, 2, 3], 1e-3)
    assert curve["detection_rate_at_1"] == 0.5 and curve["detection_rate_at_2"] == 1.0 and curve["fpr_at_2"] == 0.0
    assert "detection_rate_at_3" not in curve


def test_baseline_prefix_p_values_are_the_exact_tails_of_each_prefix():
    gen = torch.Generator().manual_seed(0)
    green = torch.rand(3, 40, generator=gen) < 0.4
    scored = torch.rand(3, 40, generator=gen) < 0.8
    ps = PositionScores.from_positions(green, torch.full((3, 40), 0.25, dtype=torch.float64), scored)
    from scipy.stats import binom

    for row, prefix in enumerate(ps.prefix_p_values()):
        g = ps.green[row][ps.scored[row]].long().cumsum(0).numpy()
        n = np.arange(1, len(g) + 1)
        np.testing.assert_allclose(prefix, binom.sf(g - 1, n, 0.25), rtol=1e-12)
