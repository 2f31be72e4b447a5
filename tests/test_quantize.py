"""int8 / NF4 quantization that reaches the fused experts (moewm.models.quantize), on micro checkpoints."""

import json

import pytest
import torch
from torch import nn
from transformers import AutoConfig

from conftest import PROMPTS
from micro_checkpoints import save_micro
from moewm.config import ConfigError, EncoderConfig, ExtractorConfig, GenerationConfig, MemoryConfig, ModelConfig, WatermarkConfig
from moewm.models.footprint import model_nbytes
from moewm.models.loading import load_model
from moewm.models.quantize import (
    NF4_CODE,
    QuantizedExperts,
    QuantizedLinear,
    QuantizedTensor,
    plan_quantization,
    quantize_model,
    quantized_nbytes,
)
from moewm.engine.routing import find_router_modules
from moewm.evaluation.signature_agreement import signature_flip_rate
from moewm.models.micro import micro_model
from moewm.schemes.moe_lsh import MoELSHWatermark

FAMILIES = ["qwen2_moe", "mixtral"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {f: save_micro(f, root / f) for f in FAMILIES}


def _load(path, quantization="none", dtype="float32", compute=None, **memory):
    mem = MemoryConfig(quantization=quantization, compute_dtype=compute or ("float32" if dtype == "float32" else "bfloat16"), **memory)
    return load_model(ModelConfig(name="micro", path=str(path), dtype=dtype, device="cpu"), mem)


def test_nf4_code_is_the_normal_float_code():
    assert NF4_CODE.shape == (16,)
    assert torch.all(NF4_CODE[1:] > NF4_CODE[:-1])
    assert NF4_CODE[0] == -1 and NF4_CODE[-1] == 1 and (NF4_CODE == 0).sum() == 1
    assert (NF4_CODE > 0).sum() == 8 and (NF4_CODE < 0).sum() == 7  # asymmetric: 8 positive, 7 negative
    # quantiles of N(0,1): the code's values are denser near 0
    gaps = NF4_CODE[1:] - NF4_CODE[:-1]
    assert gaps[7] < gaps[-1] and gaps[7] < gaps[0]
    assert NF4_CODE[8].item() == pytest.approx(0.0796, abs=1e-3)


@pytest.mark.parametrize("shape", [(130, 64), (3, 50, 70), (2, 17, 1000)])
@pytest.mark.parametrize("scheme, double_quant, max_err", [("int8", False, 0.01), ("nf4", True, 0.12), ("nf4", False, 0.12)])
def test_quantized_tensor_round_trip_and_exact_size(shape, scheme, double_quant, max_err):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.02
    q = QuantizedTensor.from_weight(w, scheme, double_quant)
    assert q.nbytes() == quantized_nbytes(shape, scheme, double_quant)
    back = q.full()
    assert back.shape == w.shape
    assert ((back - w).norm() / w.norm()).item() < max_err
    assert (back - w).abs().max() <= w.abs().max() * (0.01 if scheme == "int8" else 0.3)
    # bf16 dequantization gives the same values up to bf16 rounding
    torch.testing.assert_close(q.full(torch.bfloat16).float(), back, rtol=1e-2, atol=1e-4)


def test_quantized_tensor_edge_cases():
    zero = QuantizedTensor.from_weight(torch.zeros(4, 64), "nf4")
    assert torch.equal(zero.full(), torch.zeros(4, 64))
    # one huge block next to tiny ones: double quantization must not zero the tiny blocks
    w = torch.full((2, 64), 1e-3)
    w[0, 0] = 10.0
    q = QuantizedTensor.from_weight(w, "nf4", double_quant=True)
    assert (q.full()[1] != 0).all()
    with pytest.raises(ValueError, match="meta"):
        QuantizedTensor.from_weight(torch.empty(4, 4, device="meta"), "nf4")
    with pytest.raises(ConfigError, match="memory.quantization='fp8'"):
        QuantizedTensor.from_weight(torch.zeros(4, 4), "fp8")


def _experts_module(model_type: str, **arch):
    config = AutoConfig.for_model(model_type, **arch)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, module in model.named_modules():
        if name.endswith("experts") and hasattr(module, "down_proj"):
            for pname, p in module.named_parameters():
                if pname.endswith("bias"):
                    nn.init.normal_(p, std=0.02)
            return module
    raise AssertionError("no experts module")


@pytest.mark.parametrize(
    "model_type, arch",
    [
        ("qwen2_moe", dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_experts=6, num_experts_per_tok=2)),
        ("mixtral", dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, num_local_experts=5, num_experts_per_tok=2)),
        # transposed weights, biases and a custom gate (gpt-oss layout)
        ("gpt_oss", dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"])),
    ],
)
def test_quantized_experts_forward_equals_the_original_on_dequantized_weights(model_type, arch):
    """Isolates the forward from the rounding: load the dequantized weights into the original module."""
    experts = _experts_module(model_type, **arch)
    q = QuantizedExperts(experts, "nf4", True, torch.float32)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            getattr(experts, name).copy_(getattr(q, name).full())
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, arch["hidden_size"], generator=gen)
    n_exp = q.num_experts
    index = torch.stack([torch.randperm(n_exp, generator=gen)[:2] for _ in range(11)])
    weights = torch.rand(11, 2, generator=gen)
    torch.testing.assert_close(q(hidden, index, weights), experts(hidden, index, weights), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_nf4_footprint_is_a_quarter_of_bf16(family, checkpoints):
    """Baseline: the same checkpoint loaded in bfloat16 without quantization (the real goal: 4-bit vs bf16)."""
    bf16, _ = _load(checkpoints[family], dtype="bfloat16")
    nf4, _ = _load(checkpoints[family], "nf4", dtype="bfloat16")
    int8, _ = _load(checkpoints[family], "int8", dtype="bfloat16")
    base = model_nbytes(bf16)
    ratios = {"nf4": model_nbytes(nf4) / base, "int8": model_nbytes(int8) / base}
    print(f"{family}: bf16 {base} B, int8 {ratios['int8']:.3f}, nf4 {ratios['nf4']:.3f} of bf16")
    assert ratios["nf4"] <= 0.35, ratios
    assert ratios["int8"] <= 0.6, ratios
    # the experts really are stored in 8 / 4 bits: no float 3-D parameter is left
    for model in (nf4, int8):
        assert not [n for n, p in model.named_parameters() if p.dim() == 3]
        assert any(isinstance(m, QuantizedExperts) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_outputs_stay_close(family, checkpoints):
    ref_model, _ = _load(checkpoints[family])
    x = torch.randint(3, 259, (4, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ref_model(x).logits
        for scheme, max_err, min_top1 in (("int8", 0.06, 0.9), ("nf4", 0.35, 0.5)):
            model, _ = _load(checkpoints[family], scheme)
            out = model(x).logits
            err = ((out - ref).norm() / ref.norm()).item()
            top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
            assert err < max_err and top1 > min_top1, (scheme, err, top1)


@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_router_gates_are_never_quantized(quantization, checkpoints):
    original = micro_model("qwen2_moe", seed=0, **__import__("micro_checkpoints").BIG_OVERRIDES["qwen2_moe"])
    model, _ = _load(checkpoints["qwen2_moe"], quantization)
    routers, _ = find_router_modules(model)
    ref_routers, _ = find_router_modules(original)
    assert len(routers) == len(ref_routers) == 4
    for got, ref in zip(routers, ref_routers):
        assert type(got) is type(ref)
        assert isinstance(got.weight, nn.Parameter) and got.weight.dtype == torch.float32
        assert torch.equal(got.weight, ref.weight)
    for layer in model.model.layers:
        assert type(layer.mlp.shared_expert_gate) is nn.Linear
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    if quantization != "none":
        plan = plan_quantization(micro_model("qwen2_moe"), MemoryConfig(quantization=quantization))
        skipped = dict(plan.skipped)
        assert "router gate" in skipped["model.layers.0.mlp.gate"]
        assert all(".gate" not in item.name.replace(".gate_", "") for item in plan.items)
        assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)


def test_quantize_experts_false_keeps_experts_in_full_precision(checkpoints):
    model, _ = _load(checkpoints["mixtral"], "nf4", quantize_experts=False)
    assert not any(isinstance(m, QuantizedExperts) for m in model.modules())
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)
    assert [n for n, p in model.named_parameters() if p.dim() == 3]


def test_quantize_model_reports_what_it_did():
    model = micro_model("mixtral")
    report = quantize_model(model, MemoryConfig(quantization="int8"))
    assert report.quantized == {"experts": 3, "linear": 12}
    assert report.bytes_after < report.bytes_before / 2
    assert "int8" in report.summary() and model.moewm_quantization is report
    with pytest.raises(ValueError, match="'none'"):
        quantize_model(micro_model("mixtral"), MemoryConfig(quantization="none"))


# qwen2_moe in the default run; the other families repeat it (slow)
@pytest.mark.parametrize("family", [f if f == "qwen2_moe" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_watermark_detects_on_the_nf4_model(family, checkpoints, key):
    model, tokenizer = _load(checkpoints[family], "nf4", dtype="bfloat16")
    gen = GenerationConfig(max_new_tokens=48, min_new_tokens=48, batch_size=4)
    with MoELSHWatermark(model, tokenizer, ExtractorConfig(), EncoderConfig(num_bits=16, pool_size=8), WatermarkConfig(delta=4.0), key) as wm:
        prompt_ids, wm_ids = wm.generate_ids(PROMPTS[:4], gen)
        _, plain_ids = wm.generate_ids(PROMPTS[:4], gen, watermark=False)
        marked = wm.detect_ids(wm_ids, prompt_ids)
        plain = wm.detect_ids(plain_ids, prompt_ids)
    assert marked.z_score.min() > 4, marked.z_score
    assert abs(plain.z_score.mean()) < 2.0 and not plain.prediction.any(), plain.z_score


def test_text_watermarked_in_float32_is_detected_by_the_nf4_model(checkpoints, key):
    """A verifier with a 4-bit copy of the model: the few flipped signature bits cost little z."""
    full, tokenizer = _load(checkpoints["qwen2_moe"])
    nf4, _ = _load(checkpoints["qwen2_moe"], "nf4", dtype="bfloat16")
    # The seed's design (bit i switches pool i): a flipped bit changes one pool. With hashed green lists a
    # flipped bit changes the whole list, and NF4 keeps about 75 % of the float32 z here instead of 80 %.
    args = (ExtractorConfig(), EncoderConfig(num_bits=16, pool_size=8, pools="anchors", green_lists="bits"), WatermarkConfig(delta=4.0), key)
    gen = GenerationConfig(max_new_tokens=48, min_new_tokens=48, batch_size=4)
    with MoELSHWatermark(full, tokenizer, *args) as wm:
        prompt_ids, ids = wm.generate_ids(PROMPTS[:4], gen)
        same = wm.detect_ids(ids, prompt_ids).z_score
    with MoELSHWatermark(nf4, tokenizer, *args) as wq:
        cross = wq.detect_ids(ids, prompt_ids).z_score
    assert cross.min() > 4 and cross.mean() > 0.8 * same.mean(), (same, cross)


def test_signature_flip_rate_between_full_and_quantized_models(checkpoints, tokenizer, key, tmp_path):
    """How often the LSH bits differ between the float32 and the int8 / NF4 model on the same texts."""
    ext, enc = ExtractorConfig(), EncoderConfig(num_bits=16, pool_size=8)
    texts = [p + " and then the story went on for a while, as stories do, until it ended." for p in PROMPTS]
    rates = {}
    for family in FAMILIES:
        full, tok = _load(checkpoints[family])
        for scheme in ("int8", "nf4"):
            quant, _ = _load(checkpoints[family], scheme, dtype="bfloat16")
            agreement = signature_flip_rate(full, quant, tok, texts, ext, enc, key)
            rates[f"{family}/{scheme}"] = agreement.to_dict()
        same = signature_flip_rate(full, full, tok, texts, ext, enc, key)
        assert same.bit_flip_rate == 0 and same.signature_change_rate == 0
    (tmp_path / "signature_flip_rate.json").write_text(json.dumps(rates, indent=2))
    print(json.dumps(rates, indent=2))
    for name, r in rates.items():
        assert r["positions"] > 400
        assert r["bit_flip_rate"] < 0.1, (name, r)  # far below 0.5 (independent bits)
        assert r["signature_change_rate"] < 0.5, (name, r)
    assert rates["qwen2_moe/int8"]["bit_flip_rate"] <= rates["qwen2_moe/nf4"]["bit_flip_rate"]
