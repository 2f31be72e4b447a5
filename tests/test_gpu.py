"""CUDA checks (pytest -m gpu, run by scripts/gpu_check.sh) and the CPU smoke run of scripts/gpu_check.py."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import PROMPTS
from micro_checkpoints import BIG_OVERRIDES, architecture
from moewm.config import EncoderConfig, ExtractorConfig, GenerationConfig, MemoryConfig, ModelConfig, WatermarkConfig
from moewm.models.footprint import model_nbytes
from moewm.models.memory import estimate
from moewm.models.loading import load_model
from moewm.models.quantize import QuantizedExperts, quantize_model
from moewm.models.micro import micro_model
from moewm.schemes.moe_lsh import MoELSHWatermark

ROOT = Path(__file__).resolve().parent.parent
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "smoke.json"
    result = _gpu_check_module().main(["--smoke", "--out", str(out)])
    assert not result["errors"], result["errors"]
    data = json.loads(out.read_text())
    runs = {r["profile"]: r for r in data["runs"]}
    assert set(runs) == {"default", "ultra_low"} and runs["ultra_low"]["quantization"] == "nf4"
    for r in runs.values():
        assert r["plain_tokens_per_s"] > 0 and r["watermarked_tokens_per_s"] > 0 and r["detect_tokens_per_s"] > 0
        assert abs(r["estimate_error"]) < 0.1
        # Detection is calibrated: p-values ranked among the reference keys, built (and timed) before it.
        assert r["reference_keys"] >= 1 and r["reference_bank_s"] >= 0
        assert 1 <= r["reference_keys_scored_watermarked_mean"] <= r["reference_keys"]
        assert 1 <= r["reference_keys_scored_plain_mean"] <= r["reference_keys"]
        for name in ("p_watermarked_max", "p_plain_min"):
            assert r[name] is None or 1 / (r["reference_keys"] + 1) - 1e-9 <= r[name] <= 1, name
        assert 0 <= r["detected_watermarked"] <= r["generated_tokens"] and r["detected_plain"] >= 0
    assert runs["ultra_low"]["weight_bytes"] < 0.35 * runs["default"]["weight_bytes"]
    assert 0 <= data["signature_flip_rate"]["micro_moe"]["bit_flip_rate"] < 0.5


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_quantized_model_on_cuda_matches_the_cpu(scheme):
    cpu = micro_model("qwen2_moe", **BIG_OVERRIDES["qwen2_moe"])
    gpu = micro_model("qwen2_moe", **BIG_OVERRIDES["qwen2_moe"]).cuda()
    memory = MemoryConfig(quantization=scheme, compute_dtype="float32")
    quantize_model(cpu, memory)
    quantize_model(gpu, memory)
    x = torch.randint(3, 259, (3, 17))
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.cuda()).logits.cpu(), cpu(x).logits, rtol=2e-3, atol=2e-3)
    experts = next(m for m in gpu.modules() if isinstance(m, QuantizedExperts))
    assert experts.gate_up_proj.qweight.is_cuda


@pytest.mark.gpu
@cuda
def test_nf4_watermark_generates_and_detects_on_cuda(tokenizer, key):
    cfg = ModelConfig(name="micro", path="random:qwen2_moe", random_init=True, dtype="bfloat16", device="cuda",
                      architecture=architecture("qwen2_moe", **BIG_OVERRIDES["qwen2_moe"]))
    model, tok = load_model(cfg, MemoryConfig(quantization="nf4"))
    assert next(model.parameters()).is_cuda
    gen = GenerationConfig(max_new_tokens=48, min_new_tokens=48, batch_size=4)
    with MoELSHWatermark(model, tok, ExtractorConfig(), EncoderConfig(num_bits=16, pool_size=8), WatermarkConfig(delta=4.0), key) as wm:
        prompt_ids, ids = wm.generate_ids(PROMPTS[:4], gen)
        _, plain = wm.generate_ids(PROMPTS[:4], gen, watermark=False)
        assert wm.detect_ids(ids, prompt_ids).z_score.min() > 4
        assert abs(wm.detect_ids(plain, prompt_ids).z_score.mean()) < 2


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_estimator_matches_cuda_allocation_of_a_real_size_model(quantization):
    """granite-3.1-1b-a400m at full size, random weights: the estimate vs torch.cuda.memory_allocated."""
    from test_models import model_yaml

    cfg = model_yaml("granite_moe")
    cfg.random_init, cfg.device = True, "cuda"
    memory = MemoryConfig(quantization=quantization)
    est = estimate(cfg, memory, suggest=False)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model, _ = load_model(cfg, memory)
    allocated = torch.cuda.memory_allocated() - before
    assert abs(est.weight_bytes / model_nbytes(model) - 1) < 0.01
    assert abs(est.weight_bytes / allocated - 1) < 0.05, (est.weight_bytes, allocated)
    del model
    torch.cuda.empty_cache()


@pytest.mark.gpu
@cuda
def test_cpu_offload_with_max_memory():
    """device_map=auto with a GPU limit smaller than the model: part of the (quantized) layers on the CPU."""
    cfg = ModelConfig(name="micro", path="random:mixtral", random_init=True, dtype="bfloat16", device="cuda",
                      architecture=architecture("mixtral", **BIG_OVERRIDES["mixtral"], num_hidden_layers=6))
    memory = MemoryConfig(quantization="int8", device_map="auto", max_memory={"gpu": "3MiB", "cpu": "4GiB"})
    model, tok = load_model(cfg, memory)
    devices = set(model.hf_device_map.values())
    assert "cpu" in devices and len(devices) >= 2, model.hf_device_map
    with torch.no_grad():
        ids = tok(["hello there"], return_tensors="pt")["input_ids"].cuda()
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_check_sh_says_plainly_when_there_is_no_gpu(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "PYTHON": sys.executable})
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr, proc.stdout + proc.stderr
