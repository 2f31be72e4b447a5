"""The memory estimator (moewm.models.memory) against measured footprints, and the shipped memory profiles."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from micro_checkpoints import save_micro
from moewm.config import ConfigError, EncoderConfig, ExtractorConfig, MemoryConfig, ModelConfig
from moewm.engine.keys import WatermarkKey
from moewm.models.memory import (
    GB,
    GIB,
    PROFILES,
    breakdown,
    estimate,
    estimate_from_app_config,
)
from moewm.models.footprint import model_nbytes
from moewm.models.loading import load_model
from moewm.models.placement import max_memory_for_accelerate, parse_size
from moewm.models.micro import byte_tokenizer
from test_models import model_yaml

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ["qwen2_moe", "mixtral"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {f: save_micro(f, root / f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("quantization, dtype", [("none", "float32"), ("none", "bfloat16"), ("int8", "bfloat16"), ("nf4", "bfloat16"), ("nf4", "float32")])
def test_estimate_matches_the_measured_footprint(family, quantization, dtype, checkpoints):
    cfg = ModelConfig(name=family, path=str(checkpoints[family]), dtype=dtype, device="cpu")
    memory = MemoryConfig(quantization=quantization, double_quant=quantization == "nf4")
    est = estimate(cfg, memory, batch_size=2, prompt_tokens=8, new_tokens=8)  # from config.json, no weights
    model, _ = load_model(cfg, memory)
    measured = model_nbytes(model)
    assert abs(est.weight_bytes / measured - 1) < 0.10, (est.weight_bytes, measured)
    # and part by part (same categories on the meta model and on the loaded, quantized one)
    got = breakdown(model)
    for part in est.weights:
        if got[part.name]["bytes"] or part.nbytes:
            assert part.nbytes == pytest.approx(got[part.name]["bytes"], rel=0.10), part.name
    if quantization != "none":
        experts = next(p for p in est.weights if p.name == "experts")
        assert experts.stored_as == quantization
        assert next(p for p in est.weights if p.name == "router gates").stored_as == dtype


def test_kv_cache_and_watermark_estimates_match_what_is_allocated(checkpoints):
    cfg = ModelConfig(name="q", path=str(checkpoints["qwen2_moe"]), dtype="float32", device="cpu")
    model, tokenizer = load_model(cfg)
    batch, tokens = 3, 20
    with torch.no_grad():
        out = model(torch.randint(3, 259, (batch, tokens)), use_cache=True)
    cache = out.cache if "cache" in out else out.past_key_values  # renamed in transformers 5
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    est = estimate(cfg, MemoryConfig(), batch_size=batch, prompt_tokens=tokens - 5, new_tokens=5, num_bits=16, pool_size=8)
    assert est.kv_cache_bytes == kv
    from moewm.schemes.moe_lsh import MoELSHWatermark

    with MoELSHWatermark(model, tokenizer, ExtractorConfig(), EncoderConfig(num_bits=16, pool_size=8), key=WatermarkKey("s", 0)) as wm:
        actual = wm.encoder.nbytes()
        assert est.feature_dim == wm.capture_hooks.dim
    assert actual <= est.watermark_bytes <= 2 * actual  # an upper bound (pools may overlap), and a tight one


def test_real_model_figures():
    """The numbers docs/memory.md quotes: weights of the real checkpoints under each precision."""
    qwen, mixtral = model_yaml("qwen_moe"), model_yaml("mixtral")
    weights = {
        (name, q): estimate(cfg, MemoryConfig(quantization=q), suggest=False).weight_bytes / GB
        for name, cfg in (("qwen_moe", qwen), ("mixtral", mixtral))
        for q in ("none", "int8", "nf4")
    }
    assert 28.0 < weights["qwen_moe", "none"] < 29.2  # 14.3 B params x 2 bytes
    assert 7.5 < weights["qwen_moe", "nf4"] < 9.0  # ~8 GB in 4-bit (embeddings and LM head stay bf16)
    assert 14.0 < weights["qwen_moe", "int8"] < 16.0
    assert 92.0 < weights["mixtral", "none"] < 95.0
    assert 23.0 < weights["mixtral", "nf4"] < 26.0  # ~24 GB in 4-bit
    est = estimate(qwen, MemoryConfig(quantization="nf4"))
    assert est.total_params == pytest.approx(14.3e9, rel=0.01)


def test_suggests_a_profile_or_offload_when_it_does_not_fit():
    mixtral = model_yaml("mixtral")
    est = estimate(mixtral, MemoryConfig(budget_gib=80))
    assert not est.fits and est.suggestion["profile"] == "low" and "memory=low" in est.recommendation
    est = estimate(mixtral, MemoryConfig(budget_gib=30))
    assert est.suggestion["profile"] == "ultra_low" and "extractor.start_layer_idx=6" in est.recommendation
    est = estimate(mixtral, MemoryConfig(budget_gib=12))
    assert est.suggestion["device_map"] == "auto" and "memory.max_memory={gpu:" in est.recommendation
    assert "++memory.max_memory={gpu:" in est.recommendation  # '++': the profiles set max_memory: {}
    gpu = parse_size(est.suggestion["max_memory"]["gpu"], "gpu")
    cpu = parse_size(est.suggestion["max_memory"]["cpu"], "cpu")
    nf4 = estimate(mixtral, MemoryConfig(quantization="nf4"), suggest=False).weight_bytes
    assert gpu < 12 * GIB and gpu + cpu > nf4  # together they hold the NF4 weights
    # applying the suggestion makes it fit: the offloaded weights leave the GPU's share
    applied = estimate(mixtral, MemoryConfig(name="ultra_low", quantization="nf4", budget_gib=12, device_map="auto",
                                             max_memory=est.suggestion["max_memory"]))
    assert applied.fits and applied.offloaded_bytes > 0 and applied.device_bytes <= 12 * GIB
    assert "offloaded to CPU RAM" in applied.table() and "**on the GPU**" in applied.table()
    too_little_cpu = estimate(mixtral, MemoryConfig(quantization="nf4", budget_gib=12, device_map="auto",
                                                    max_memory={"gpu": "10GiB", "cpu": "1GiB"}), suggest=False)
    assert not too_little_cpu.fits
    fits = estimate(model_yaml("olmoe"), MemoryConfig(quantization="nf4", budget_gib=12))
    assert fits.fits and not fits.recommendation
    tiny_budget = estimate(model_yaml("qwen_moe"), MemoryConfig(quantization="nf4", budget_gib=0.5))
    assert "generation.batch_size" in tiny_budget.recommendation


def test_table_and_dict_are_complete():
    est = estimate(model_yaml("qwen_moe"), MemoryConfig(name="ultra_low", quantization="nf4"))
    table = est.table()
    for row in ("embeddings", "attention", "experts", "shared experts", "router gates", "norms", "LM head", "KV cache",
                "watermark encoder", "**total**", "Budget 80 GiB"):
        assert row in table, row
    assert "Router gates are never quantized" in table
    data = json.loads(json.dumps(est.to_dict()))
    assert data["weights"]["experts"]["stored_as"] == "nf4" and data["fits"] == est.fits
    assert data["total_bytes"] == est.total_bytes == data["device_bytes"] > data["weight_bytes"]
    dense = estimate(model_yaml("qwen_dense"), MemoryConfig(quantization="int8")).table()
    assert "dense MLP" in dense and "tied to the embeddings" in dense and "| experts |" not in dense


def test_estimate_from_app_config_reads_plain_attributes():
    app = OmegaConf.create(
        {
            "model": OmegaConf.to_container(OmegaConf.structured(model_yaml("granite_moe"))),
            "memory": PROFILES["ultra_low"]["memory"],
            "generation": {"max_new_tokens": 32, "batch_size": 4},
            "data": {"max_prompt_tokens": 16},
            "encoder": {"num_bits": 64, "pool_size": 4},
            "extractor": {"kind": "router", "start_layer_idx": 6, "end_layer_idx": 8, "use_top_k": True, "k": 2},
        }
    )
    est = estimate_from_app_config(app)
    assert (est.batch_size, est.prompt_tokens, est.new_tokens, est.num_bits, est.pool_size) == (4, 16, 32, 64, 4)
    assert est.feature_dim == 2 * 32 and est.quantization == "nf4" and est.fits
    dataclass_app = SimpleNamespace(model=model_yaml("granite_moe"), memory=MemoryConfig(), generation=SimpleNamespace(max_new_tokens=8, batch_size=1),
                                    data=SimpleNamespace(max_prompt_tokens=8), encoder=EncoderConfig(), extractor=ExtractorConfig(end_layer_idx=30))
    with pytest.raises(ConfigError, match=r"extractor.end_layer_idx=30: allowed range is \[1, 24\]"):
        estimate_from_app_config(dataclass_app)
    dense_app = SimpleNamespace(**{**vars(dataclass_app), "model": model_yaml("qwen_dense"), "extractor": ExtractorConfig()})
    with pytest.raises(ConfigError, match="'qwen_dense'.*extractor=hidden"):
        estimate_from_app_config(dense_app)


def test_memory_profiles_match_the_estimator_and_the_schema():
    for name, expected in PROFILES.items():
        path = ROOT / "conf" / "memory" / f"{name}.yaml"
        text = path.read_text()
        assert text.startswith("# @package _global_\n# "), path
        memory = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MemoryConfig), expected["memory"]))
        memory.validate()
        assert memory.name == name
    assert PROFILES["ultra_low"]["memory"]["quantization"] == "nf4" and PROFILES["low"]["memory"]["quantization"] == "int8"
    assert PROFILES["ultra_low"]["memory"]["budget_gib"] <= 8  # meant for a 6-8 GB consumer GPU
    assert PROFILES["ultra_low"]["extractor"] == {"start_layer_idx": 6, "end_layer_idx": 8, "use_top_k": True, "k": 2}


def test_sizes_and_max_memory_keys():
    assert parse_size("20GiB", "k") == 20 * GIB and parse_size("500MB", "k") == 500 * 10**6 and parse_size(1234, "k") == 1234
    with pytest.raises(ConfigError, match="memory.max_memory.cpu='-3GiB'"):
        parse_size("-3GiB", "memory.max_memory.cpu")
    limits = max_memory_for_accelerate(MemoryConfig(device_map="auto", max_memory={"0": "1GiB", "gpu1": "2GiB", "cpu": "3GiB"}))
    assert limits == {0: GIB, 1: 2 * GIB, "cpu": 3 * GIB}
    with pytest.raises(ConfigError, match=r"batch_size=0"):
        estimate(model_yaml("olmoe"), MemoryConfig(), batch_size=0)


def test_micro_config_dir_estimate_needs_no_weights(tmp_path):
    """Only config.json in the folder: the estimator never touches weight files."""
    folder = save_micro("qwen2_moe", tmp_path / "m", big=False)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    est = estimate(ModelConfig(name="m", path=str(folder), dtype="float32"), MemoryConfig())
    assert est.weight_bytes > 0 and est.fits
    assert byte_tokenizer() is not None
