"""Model configs of the real checkpoints (built on the meta device), loading paths, and pre-load checks."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from micro_checkpoints import architecture, save_micro
from moewm.config import ConfigError, ExtractorConfig, MemoryConfig, ModelConfig
from moewm.models.architecture import check_model_extractor, meta_model, model_layout
from moewm.models.loading import WeightsUnavailableError, load_model
from moewm.models.quantize import QuantizedExperts, QuantizedLinear
from moewm.engine.routing import NotAnMoEModelError
from moewm.models.micro import micro_model

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "conf" / "model"

# name -> (hub path, is_moe, router layers, experts per layer, decoder layers)
REAL = {
    "qwen_moe": ("Qwen/Qwen1.5-MoE-A2.7B-Chat", True, 24, 60, 24),
    "mixtral": ("mistralai/Mixtral-8x7B-Instruct-v0.1", True, 32, 8, 32),
    "olmoe": ("allenai/OLMoE-1B-7B-0924-Instruct", True, 16, 64, 16),
    "granite_moe": ("ibm-granite/granite-3.1-1b-a400m-instruct", True, 24, 32, 24),
    "qwen_dense": ("Qwen/Qwen2.5-1.5B-Instruct", False, 0, 0, 28),
}


def model_yaml(name: str) -> ModelConfig:
    """The YAML merged into the ModelConfig schema (unknown keys or wrong types fail here, as in the app)."""
    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(MODEL_DIR / f"{name}.yaml"))
    return OmegaConf.to_object(node)


@pytest.mark.parametrize("name", sorted(REAL))
def test_model_yaml_reproduces_the_checkpoint(name):
    path, is_moe, router_layers, experts, decoder_layers = REAL[name]
    cfg = model_yaml(name)
    assert cfg.name == name and cfg.path == path and cfg.is_moe is is_moe
    assert cfg.random_init is False and cfg.dtype == "bfloat16" and cfg.chat_template is True
    model, config = meta_model(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / cfg.total_params - 1) < 0.02, (name, params, cfg.total_params)
    hidden = model_layout(cfg, "hidden")
    assert hidden.num_layers == decoder_layers
    if is_moe:
        router = model_layout(cfg)
        assert (router.num_layers, router.width, router.kind) == (router_layers, experts, "router")
    else:
        assert model_layout(cfg).kind == "hidden"
        with pytest.raises(NotAnMoEModelError):
            model_layout(cfg, "router")


def test_hydra_model_group_has_the_real_models():
    names = {p.stem for p in MODEL_DIR.glob("*.yaml")}
    assert set(REAL) <= names


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "olmoe", "granitemoe", "qwen2"])
@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_random_init_builds_every_family_and_quantization_applies(family, quantization):
    arch = architecture(family)
    cfg = ModelConfig(name=f"micro_{family}", path=f"random:{family}", random_init=True, dtype="float32", device="cpu",
                      is_moe=family != "qwen2", architecture=arch)
    model, tokenizer = load_model(cfg, MemoryConfig(quantization=quantization, compute_dtype="float32"))
    assert model.config.model_type == arch["model_type"] and not model.training
    ids = tokenizer(["hello world"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 259) and torch.isfinite(logits).all()
    experts = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if quantization == "none":
        assert not experts and not linears
    else:
        assert len(experts) == (0 if family == "qwen2" else arch["num_hidden_layers"])
        assert linears and not [n for n, p in model.named_parameters() if p.dim() == 3]


def test_local_checkpoint_loads_through_from_pretrained(tmp_path):
    folder = save_micro("mixtral", tmp_path / "ckpt", big=False, seed=3)
    reference = micro_model("mixtral", seed=3)
    model, tokenizer = load_model(ModelConfig(name="local", path=str(folder), dtype="float32", device="cpu"))
    ids = tokenizer(["The quick brown fox"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    # config.json of a local folder also feeds the meta-device checks (no architecture in the config)
    assert model_layout(ModelConfig(name="local", path=str(folder))).num_layers == 3


def test_uncached_hub_model_fails_fast_offline(tmp_path):
    """A hub name that is not cached, with HF_HUB_OFFLINE=1: a WeightsUnavailableError within seconds, no hang."""
    code = (
        "import time, sys\n"
        "from moewm.config import ModelConfig\n"
        "from moewm.models.loading import load_model, WeightsUnavailableError\n"
        "t = time.time()\n"
        "try:\n"
        "    load_model(ModelConfig(name='qwen_moe', path='Qwen/Qwen1.5-MoE-A2.7B-Chat', dtype='bfloat16'))\n"
        "except WeightsUnavailableError as err:\n"
        "    print('ERR', round(time.time() - t, 2), err)\n"
        "    sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    message = proc.stdout
    assert "Qwen/Qwen1.5-MoE-A2.7B-Chat" in message and "HF_HUB_OFFLINE=1" in message and "random_init=true" in message
    assert float(message.split()[1]) < 10, message
    assert time.time() - start < 100


def test_missing_local_folder_and_builtin_are_clear_errors(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="not available"):
        load_model(ModelConfig(name="x", path=str(tmp_path / "nowhere"), dtype="float32", device="cpu"))
    with pytest.raises(WeightsUnavailableError, match="shipped model is missing.*build_tiny_moe.py --model no_such_model"):
        load_model(ModelConfig(name="x", path="builtin:no_such_model", device="cpu"))


def test_dense_model_with_router_extractor_is_refused_before_loading():
    dense = ModelConfig(name="micro_dense", path="random:qwen2", random_init=True, is_moe=False, architecture=architecture("qwen2"))
    with pytest.raises(NotAnMoEModelError) as err:
        check_model_extractor(dense, ExtractorConfig(kind="router"))
    assert "micro_dense" in str(err.value) and "extractor=hidden" in str(err.value)
    layout = check_model_extractor(dense, ExtractorConfig(kind="hidden", start_layer_idx=1, end_layer_idx=3))
    assert (layout.num_layers, layout.width, layout.kind) == (3, 64, "hidden")
    with pytest.raises(ConfigError, match=r"extractor.end_layer_idx=9: allowed range is \[1, 3\]"):
        check_model_extractor(dense, ExtractorConfig(kind="hidden", end_layer_idx=9))
    # a config that claims MoE but has no routers is caught on the meta model
    liar = ModelConfig(name="liar", path="random:qwen2", random_init=True, is_moe=True, architecture=architecture("qwen2"))
    with pytest.raises(NotAnMoEModelError, match="extractor=hidden"):
        check_model_extractor(liar, ExtractorConfig(kind="router"))


def test_real_model_extractor_ranges_are_checked_without_weights():
    qwen = model_yaml("qwen_moe")
    assert check_model_extractor(qwen, ExtractorConfig(start_layer_idx=6, end_layer_idx=8, use_top_k=True, k=2)).width == 60
    with pytest.raises(ConfigError, match=r"extractor.end_layer_idx=30: allowed range is \[1, 24\]"):
        check_model_extractor(qwen, ExtractorConfig(end_layer_idx=30))
    with pytest.raises(ConfigError, match=r"extractor.k=9: allowed range is \[1, 8\]"):
        check_model_extractor(model_yaml("mixtral"), ExtractorConfig(use_top_k=True, k=9))
    with pytest.raises(NotAnMoEModelError, match="qwen_dense"):
        check_model_extractor(model_yaml("qwen_dense"), ExtractorConfig(kind="router"))


@pytest.mark.parametrize(
    "memory, message",
    [
        (MemoryConfig(quantization="int4"), "memory.quantization='int4': allowed values"),
        (MemoryConfig(device_map="everywhere"), "memory.device_map='everywhere': allowed values"),
        (MemoryConfig(device_map="auto", max_memory={"gpu": "lots"}), "memory.max_memory.gpu='lots'"),
        (MemoryConfig(device_map="auto", max_memory={"tpu": "4GiB"}), "memory.max_memory.tpu: allowed keys"),
        (MemoryConfig(max_memory={"cpu": "4GiB"}), "memory.device_map is null"),
    ],
)
def test_bad_memory_settings_fail_before_any_weights_load(memory, message):
    # the hub path would fail with WeightsUnavailableError if loading got that far
    with pytest.raises(ConfigError) as err:
        load_model(ModelConfig(name="qwen_moe", path="Qwen/Qwen1.5-MoE-A2.7B-Chat"), memory)
    assert message in str(err.value)


def test_device_map_auto_places_a_quantized_random_model():
    cfg = ModelConfig(name="m", path="random:mixtral", random_init=True, dtype="float32", device="cpu", architecture=architecture("mixtral"))
    model, _ = load_model(cfg, MemoryConfig(quantization="int8", device_map="auto", max_memory={"cpu": "2GiB", "gpu": "1GiB"}))
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert any(isinstance(m, QuantizedExperts) for m in model.modules())
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
