"""Geometry metrics on constructed cases with known answers, and on a micro model."""

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from moewm.config import EncoderConfig, ExtractorConfig, WatermarkConfig
from moewm.evaluation.geometry import (
    bit_statistics,
    geometry_metrics,
    capture_distributions,
    next_token_distributions,
    pca_alignment,
    pool_split_entropy,
    projection_statistics,
    topk_w1,
    w1_metrics,
    wasserstein_1,
)
from moewm.engine.lsh import LSHEncoder
from moewm.schemes.moe_lsh import MoELSHWatermark


def _encoder(projection, center=None, pools=None, vocab=16):
    projection = torch.as_tensor(projection, dtype=torch.float64)
    center = torch.zeros(projection.shape[0], dtype=torch.float64) if center is None else torch.as_tensor(center, dtype=torch.float64)
    pools = torch.arange(projection.shape[1] * 2).reshape(projection.shape[1], 2) % vocab if pools is None else torch.as_tensor(pools)
    return LSHEncoder(projection, center, pools, vocab, "test")


def test_balanced_independent_bits_have_entropy_one():
    bits = np.array(list(itertools.product([0, 1], repeat=4)), dtype=bool).repeat(3, axis=0)  # every pattern 3 times
    s = bit_statistics(bits)
    assert s["geo_bit_entropy"] == pytest.approx(1.0)
    assert s["geo_bit_balance_mean"] == pytest.approx(0.5)
    assert s["geo_bit_imbalance"] == pytest.approx(0.0)
    assert s["geo_dead_bits"] == 0.0
    assert s["geo_joint_entropy"] == pytest.approx(4.0)  # 16 equally likely signatures
    assert s["geo_joint_entropy_norm"] == pytest.approx(1.0)  # ceiling min(4 bits, log2 48)
    assert s["geo_unique_signatures"] == pytest.approx(16 / 48)


def test_constant_and_copied_bits():
    rng = np.random.default_rng(0)
    a = rng.random(1000) < 0.5
    bits = np.stack([a, a, np.zeros(1000, bool), np.r_[np.ones(995, bool), np.zeros(5, bool)]], 1)
    s = bit_statistics(bits)
    assert s["geo_dead_bits"] == pytest.approx(0.5)  # the constant bit and the 99.5% bit
    assert s["geo_joint_entropy"] < 1.1  # two copies of one fair bit carry one bit
    assert s["geo_bit_entropy_min"] == 0.0


def test_hyperplane_orthogonal_to_the_data_is_a_dead_bit():
    rng = np.random.default_rng(1)
    x = np.zeros((500, 3))
    x[:, :2] = rng.normal(size=(500, 2))  # data in the e1-e2 plane
    enc = _encoder(np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))  # bit 0 along e1, bit 1 along e3
    m = geometry_metrics(torch.tensor(x, dtype=torch.float32), enc, torch.randn(16, 4), kmeans_clusters=2)
    assert m["geo_dead_bits"] == pytest.approx(0.5)
    p = projection_statistics(x, enc.projection.numpy(), np.zeros(3))
    # e1 sees the average per-direction variance x 3/2 (two of three axes carry variance 1), e3 sees none
    assert p["geo_proj_var_ratio_min"] == pytest.approx(0.0, abs=1e-12)
    assert p["geo_proj_var_ratio_mean"] == pytest.approx(0.5 * (x[:, 0].var(ddof=1) / (x.var(0, ddof=1).sum() / 3)), rel=1e-9)


def test_offset_hyperplane_is_unbalanced():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2000, 2)) + np.array([5.0, 0.0])  # data far from the origin along e1
    through_origin = projection_statistics(x, np.array([[1.0], [0.0]]), np.zeros(2))
    centred = projection_statistics(x, np.array([[1.0], [0.0]]), x.mean(0))
    assert through_origin["geo_proj_offset_mean"] == pytest.approx(5.0, rel=0.1)
    assert centred["geo_proj_offset_mean"] == pytest.approx(0.0, abs=1e-9)
    assert bit_statistics((x @ np.array([[1.0], [0.0]])) > 0)["geo_dead_bits"] == 1.0


def test_pca_alignment():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4000, 4)) * np.array([10.0, 1.0, 1.0, 1.0])
    on = pca_alignment(x, np.array([[1.0], [0.0], [0.0], [0.0]]))
    off = pca_alignment(x, np.array([[0.0], [1.0], [0.0], [0.0]]))
    diag = pca_alignment(x, np.array([[1.0], [1.0], [0.0], [0.0]]))
    assert on["geo_pca_alignment"] == pytest.approx(1.0, abs=1e-3)
    assert on["geo_pca_max_cos"] == pytest.approx(1.0, abs=1e-3)
    assert on["geo_pca_alignment_ratio"] == pytest.approx(4.0, abs=1e-2)  # k / D = 1 / 4
    assert off["geo_pca_alignment"] == pytest.approx(0.0, abs=1e-3)
    assert diag["geo_pca_alignment"] == pytest.approx(0.5, abs=1e-2)


def _clustered_embeddings():
    centres = np.eye(8)[:4] * 10
    rng = np.random.default_rng(4)
    emb = np.repeat(centres, 8, axis=0) + 0.01 * rng.normal(size=(32, 8))  # tokens 8c .. 8c+7 in cluster c
    return emb


def test_pools_inside_one_cluster_have_split_entropy_zero():
    emb = _clustered_embeddings()
    pools = np.arange(32).reshape(4, 8)  # pool c = cluster c
    s = pool_split_entropy(pools, emb, n_clusters=4)
    assert s["geo_pool_split_entropy"] == pytest.approx(0.0, abs=1e-12)


def test_pools_spread_over_all_clusters_have_maximal_split_entropy():
    emb = _clustered_embeddings()
    pools = np.arange(32).reshape(4, 8).T  # pool j takes token j of every cluster: 4 tokens in 4 clusters
    s = pool_split_entropy(pools, emb, n_clusters=4)
    assert s["geo_pool_split_entropy"] == pytest.approx(2.0)
    assert s["geo_pool_split_entropy_norm"] == pytest.approx(1.0)


def test_w1_identical_is_zero_and_point_masses_cost_their_distance():
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(30, 6))
    p = rng.dirichlet(np.ones(30))
    assert topk_w1(p, p, emb, k=10)[0] == 0.0
    a, b = np.zeros(30), np.zeros(30)
    a[3], b[17] = 1.0, 1.0
    w, kept = topk_w1(a, b, emb, k=5)
    assert w == pytest.approx(np.linalg.norm(emb[3] - emb[17]))
    assert kept == pytest.approx(1.0)


def test_w1_matches_the_one_dimensional_closed_form():
    rng = np.random.default_rng(6)
    x = rng.normal(size=25)
    p, q = rng.random(25), rng.random(25)
    cost = np.abs(x[:, None] - x[None, :])
    assert wasserstein_1(p, q, cost) == pytest.approx(wasserstein_distance(x, x, p, q), rel=1e-7)


def test_green_size_mean_is_the_union_of_active_pools():
    enc = _encoder(np.eye(3), pools=np.array([[0, 1], [1, 2], [5, 6]]), vocab=10)
    x = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0]])  # bits 111 -> {0,1,2,5,6}; 100 -> {0,1}
    m = geometry_metrics(x, enc, torch.randn(10, 4), kmeans_clusters=2)
    assert m["geo_green_size_mean"] == pytest.approx(3.5)
    assert m["geo_gamma_mean"] == pytest.approx(0.35)


def test_w1_on_a_micro_model(micro_qwen, tokenizer, key):
    contexts = [list(tokenizer(p)["input_ids"]) for p in ["Once upon a time", "The results show", "def f(x):"]]
    with MoELSHWatermark(micro_qwen, tokenizer, ExtractorConfig(), EncoderConfig(num_bits=16, pool_size=8), WatermarkConfig(delta=0.0), key) as wm0:
        p, q, green = next_token_distributions(wm0, contexts)
        np.testing.assert_allclose(p, q, atol=1e-12)  # delta 0: nothing moves
        emb = micro_qwen.get_input_embeddings().weight.detach().float().numpy()
        assert w1_metrics(p, q, green, emb)["geo_w1_mean"] == pytest.approx(0.0, abs=1e-9)
    with MoELSHWatermark(micro_qwen, tokenizer, ExtractorConfig(), EncoderConfig(num_bits=16, pool_size=8), WatermarkConfig(delta=4.0), key) as wm:
        # the green mask is exactly the green list the processor biases for the next token
        ids = torch.tensor([contexts[0]])
        micro_qwen(input_ids=ids, use_cache=False)
        bits = wm.encoder.signature(wm.capture_hooks.features(1)[:, -1])
        expected = wm.encoder.bias_logits(torch.zeros(1, wm.vocab_size), bits, 1.0)[0] > 0
        p, q, green = next_token_distributions(wm, contexts)
        assert torch.equal(torch.from_numpy(green[0]), expected)
        m = w1_metrics(p, q, green, emb, top_k=20)
        x = torch.randn(200, wm.capture_hooks.dim).softmax(-1)
        g = geometry_metrics(x, wm.encoder, micro_qwen.get_input_embeddings().weight, distributions=(p, q, green), w1_top_k=20, kmeans_clusters=8)
    assert m["geo_w1_mean"] > 0
    assert m["geo_green_mass_wm"] > m["geo_green_mass_unwm"]
    assert 0 < m["geo_w1_support_mass"] <= 1
    assert all(k.startswith("geo_") for k in g) and all(np.isfinite(v) for v in g.values())
    assert g["geo_w1_mean"] == pytest.approx(m["geo_w1_mean"])


def test_capture_distributions_are_the_forward_distributions_read_from_captures(micro_qwen, tokenizer, key):
    """At a captured position, p is the model's next-token distribution there (top-K exactly; the usable rest
    spread evenly), the green mask is the processor's, and the positions do not depend on the key."""
    prompt = list(tokenizer("Once upon a time")["input_ids"])
    text = list(tokenizer(" there was a small dog that ran far away")["input_ids"])
    wcfg = WatermarkConfig(delta=3.0, capture_top_k=64)
    with MoELSHWatermark(micro_qwen, tokenizer, ExtractorConfig(), EncoderConfig(num_bits=16, pool_size=8), wcfg, key) as wm:
        [cap] = wm.capture([text], [prompt])
        p, q, green = capture_distributions(wm.encoder, 3.0, wm.vocab_size, [cap], count=6, seed=0)
        p2, _, _ = capture_distributions(wm.encoder, 3.0, wm.vocab_size, [cap], count=6, seed=0)
        np.testing.assert_array_equal(p, p2)
        rng = np.random.default_rng(0)
        where = [int(rng.integers(0, cap.num_scored)) for _ in range(6)]
        # the context before the j-th scored token is prompt + text[:j] (every text token here is usable and scored)
        assert cap.num_scored == len(text)
        contexts = [prompt + text[:j] for j in where]
        fp, fq, fgreen = next_token_distributions(wm, contexts)
    np.testing.assert_array_equal(green, fgreen)
    usable = wm.encoder.usable.numpy()
    fp_usable = np.where(usable, fp, 0.0)
    fp_usable /= fp_usable.sum(1, keepdims=True)
    for i in range(6):  # the captured top-K probabilities are the forward's, renormalised over usable tokens
        top = cap.top_ids[where[i]].long().numpy()
        np.testing.assert_allclose(p[i, top], fp_usable[i, top], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-9)
    assert ((q * green).sum(1) > (p * green).sum(1)).all()  # the bias moves mass onto the green list
