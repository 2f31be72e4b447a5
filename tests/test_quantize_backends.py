"""memory.backend: bitsandbytes' storage and kernels vs moewm's own module, on the micro checkpoints.

The bitsandbytes cases skip when bitsandbytes is not installed (``pip install moewm[bnb]``; ``.[dev]``
pulls it, so CI runs both backends).
"""

import pytest
import torch

from micro_checkpoints import save_micro
from moewm.config import ConfigError, MemoryConfig, ModelConfig
from moewm.models import quantize_bnb
from moewm.models.footprint import model_nbytes
from moewm.models.loading import load_model
from moewm.models.memory import breakdown, estimate
from moewm.models.quantize import QuantizedExperts, QuantizedTensor, quantized_nbytes, resolve_backend
from moewm.models.quantize_bnb import BnbTensor, availability, int8_kernel
from test_quantize import _experts_module

FAMILIES = ["qwen2_moe", "mixtral"]
HAVE_BNB = availability("cpu") is None
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason=f"bitsandbytes not usable: {availability('cpu')}")
BACKENDS = ["moewm", pytest.param("bitsandbytes", marks=needs_bnb)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {f: save_micro(f, root / f) for f in FAMILIES}


def _load(path, quantization="none", dtype="bfloat16", backend="auto", **memory):
    mem = MemoryConfig(quantization=quantization, compute_dtype="float32" if dtype == "float32" else "bfloat16", backend=backend, **memory)
    return load_model(ModelConfig(name="micro", path=str(path), dtype=dtype, device="cpu"), mem)


def _expert_bytes(model):
    return sum(model_nbytes(m) for m in model.modules() if isinstance(m, QuantizedExperts))


def test_backend_is_validated_with_the_key_and_allowed_values():
    with pytest.raises(ConfigError, match=r"memory.backend='bnb'.*auto.*bitsandbytes.*moewm"):
        MemoryConfig(backend="bnb").validate()
    assert resolve_backend(MemoryConfig(quantization="nf4", backend="moewm")) == "moewm"


def test_explicit_bitsandbytes_that_cannot_run_fails_before_weights_load_and_auto_falls_back(monkeypatch, tmp_path):
    monkeypatch.setitem(quantize_bnb._AVAILABILITY, "cpu", "bitsandbytes cannot be imported (ImportError: test)")
    # a path with no weights: the backend error must come first
    cfg = ModelConfig(name="x", path=str(tmp_path / "no-such-checkpoint"), device="cpu")
    with pytest.raises(ConfigError, match=r"memory.backend=bitsandbytes: bitsandbytes cannot be imported.*memory.backend=moewm"):
        load_model(cfg, MemoryConfig(quantization="nf4", backend="bitsandbytes"))
    assert resolve_backend(MemoryConfig(quantization="nf4", backend="auto")) == "moewm"


@needs_bnb
def test_auto_picks_bitsandbytes_where_it_works(checkpoints):
    model, _ = _load(checkpoints["mixtral"], "nf4")
    experts = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    assert experts and all(m.backend == "bitsandbytes" and isinstance(m.down_proj, BnbTensor) for m in experts)
    assert model.moewm_quantization.backend == "bitsandbytes"
    # int8: bitsandbytes only where it has an int8 kernel (CUDA, AVX-512 CPUs), else the own module
    want = "bitsandbytes" if int8_kernel("cpu") else "moewm"
    assert resolve_backend(MemoryConfig(quantization="int8", backend="auto"), "cpu") == want
    assert resolve_backend(MemoryConfig(quantization="int8", backend="bitsandbytes"), "cpu") == "bitsandbytes"


@needs_bnb
@pytest.mark.parametrize("shape", [(130, 64), (3, 50, 70), (2, 17, 1000)])
@pytest.mark.parametrize("scheme, double_quant, max_err", [("int8", False, 0.01), ("nf4", True, 0.12), ("nf4", False, 0.12)])
@pytest.mark.parametrize("transposed", [False, True])
def test_bnb_tensor_round_trip_exact_size_and_matmul(shape, scheme, double_quant, max_err, transposed):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.02
    q = BnbTensor.from_weight(w, scheme, double_quant, transposed=transposed)
    assert q.nbytes() == quantized_nbytes(shape, scheme, double_quant, backend="bitsandbytes", transposed=transposed)
    back = q.full()
    assert back.shape == w.shape
    assert ((back - w).norm() / w.norm()).item() < max_err
    g = q.groups - 1
    wg = back.reshape(q.groups, *shape[-2:])[g]
    x = torch.randn(5, wg.shape[0] if transposed else wg.shape[1], generator=torch.Generator().manual_seed(2))
    want = x @ wg if transposed else x @ wg.t()
    got = q.linear(x, g, torch.float32, transposed)
    # nf4: bitsandbytes multiplies by exactly these dequantized weights; int8 also rounds the activations per row
    tol = 1e-5 if scheme == "nf4" else 0.02
    assert ((got - want).norm() / want.norm()).item() < tol


@needs_bnb
def test_bnb_nf4_codes_match_the_own_module_which_stays_the_reference():
    """Same format (NF4, blocks of 64, float32 absmax): both dequantize to the same weights except at rounding ties."""
    w = torch.randn(4, 96, 128, generator=torch.Generator().manual_seed(3))
    own = QuantizedTensor.from_weight(w, "nf4", double_quant=False).full()
    bnb = BnbTensor.from_weight(w, "nf4", double_quant=False).full()
    same = torch.isclose(own, bnb, rtol=1e-5, atol=1e-7).float().mean().item()
    assert same > 0.999, same


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "model_type, arch",
    [
        ("qwen2_moe", dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_experts=6, num_experts_per_tok=2)),
        ("gpt_oss", dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"])),
    ],
)
def test_quantized_experts_forward_equals_the_original_on_dequantized_weights(backend, model_type, arch):
    experts = _experts_module(model_type, **arch)
    q = QuantizedExperts(experts, "nf4", True, torch.float32, backend=backend)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            getattr(experts, name).copy_(getattr(q, name).full())
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, arch["hidden_size"], generator=gen)
    index = torch.stack([torch.randperm(q.num_experts, generator=gen)[:2] for _ in range(11)])
    weights = torch.rand(11, 2, generator=gen)
    torch.testing.assert_close(q(hidden, index, weights), experts(hidden, index, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_experts_at_most_30_percent_of_bf16_and_the_estimate_is_exact(backend, family, checkpoints):
    bf16, _ = _load(checkpoints[family])
    bf16_experts = sum(p.numel() * p.element_size() for n, p in bf16.named_parameters() if p.dim() == 3)
    cfg = ModelConfig(name=family, path=str(checkpoints[family]), dtype="bfloat16", device="cpu")
    memory = MemoryConfig(quantization="nf4", double_quant=True, backend=backend)
    model, _ = load_model(cfg, memory)
    assert model.moewm_quantization.backend == backend
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]
    ratio = _expert_bytes(model) / bf16_experts
    assert ratio <= 0.30, ratio
    est = estimate(cfg, memory, batch_size=1, prompt_tokens=4, new_tokens=4, suggest=False)
    assert est.backend == backend
    got = breakdown(model)
    for part in ("experts", "attention", "router gates"):
        assert next(p.nbytes for p in est.weights if p.name == part) == got[part]["bytes"], part


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_outputs_stay_close_with_either_backend(backend, family, checkpoints):
    ref_model, _ = _load(checkpoints[family], dtype="float32")
    x = torch.randint(3, 259, (4, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ref_model(x).logits
        for scheme, max_err, min_top1 in (("int8", 0.06, 0.9), ("nf4", 0.35, 0.5)):
            model, _ = _load(checkpoints[family], scheme, dtype="float32", backend=backend)
            out = model(x).logits
            err = ((out - ref).norm() / ref.norm()).item()
            top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
            assert err < max_err and top1 > min_top1, (scheme, err, top1)
