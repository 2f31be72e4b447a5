"""The shipped tiny_moe model (moewm/assets/tiny_moe) and the script that builds it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "moewm" / "assets" / "tiny_moe"
SCRIPT = REPO / "scripts" / "build_tiny_moe.py"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _moe_layers(config) -> int:
    step = getattr(config, "decoder_sparse_step", 1)  # olmoe: every layer is MoE
    skip = set(getattr(config, "mlp_only_layers", None) or [])
    return sum(1 for i in range(config.num_hidden_layers) if i not in skip and config.num_experts > 0 and (i + 1) % step == 0)


def _printable(text: str) -> bool:
    return all(ch.isprintable() or ch.isspace() for ch in text)


def _check_router_logits(model, tok, prompt: str) -> None:
    cfg = model.config
    enc = tok([prompt, prompt + " and more"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc, output_router_logits=True)
    n_tokens = enc.input_ids.numel()
    assert out.router_logits is not None
    assert len(out.router_logits) == _moe_layers(cfg)
    for rl in out.router_logits:
        assert tuple(rl.shape) == (n_tokens, cfg.num_experts)
        assert torch.isfinite(rl).all()
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)


def load_build_script():
    spec = importlib.util.spec_from_file_location("build_tiny_moe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_tiny_moe_loads_generates_and_routes(offline):
    assert (TINY / "config.json").exists(), f"shipped model missing at {TINY}: run scripts/build_tiny_moe.py"
    tok = AutoTokenizer.from_pretrained(TINY)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    cfg = model.config
    assert cfg.model_type == "qwen2_moe" and type(model).__name__ == "Qwen2MoeForCausalLM"
    assert model.dtype == torch.float32
    assert _moe_layers(cfg) >= 8 and cfg.num_experts >= 16 and cfg.num_experts_per_tok >= 2
    assert cfg.shared_expert_intermediate_size > 0 and cfg.tie_word_embeddings
    assert tok.eos_token_id == cfg.eos_token_id and tok.pad_token_id is not None
    assert (TINY / "model.safetensors").stat().st_size <= 20 * 2**20

    prompt = "Return the number of"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, temperature=None, top_k=None,
                             top_p=None, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 32
    text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    assert text.strip(), "empty continuation"
    assert _printable(text), repr(text)

    _check_router_logits(model, tok, prompt)

    log = json.loads((TINY / "build_log.json").read_text())
    assert log["quality_floor"]["checked"] and log["quality_floor"]["passed"]
    assert log["results"]["heldout_ppl"] < 0.5 * log["results"]["unigram_ppl"]
    assert (TINY / "README.md").exists() and (TINY / "generation_config.json").exists()


def test_build_script_quick_run(tmp_path, offline):
    build = load_build_script()
    out = tmp_path / "tiny"
    rc = build.main([
        "--quick", "--no-progress", "--out", str(out), "--seed", "1", "--steps", "3", "--max-docs", "200",
        "--vocab-size", "400", "--hidden-size", "16", "--layers", "2", "--heads", "2", "--kv-heads", "1",
        "--experts", "4", "--top-k", "2", "--moe-intermediate", "8", "--shared-intermediate", "16",
        "--seq-len", "32", "--batch-size", "2",
    ])
    assert rc == 0
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "build_log.json", "README.md"):
        assert (out / name).exists(), name
    log = json.loads((out / "build_log.json").read_text())
    assert log["quick"] and log["train"]["steps"] == 3
    for key in ("heldout_ppl", "unigram_ppl", "expert_utilisation", "context_dependence", "checkpoint_mb"):
        assert key in log["results"]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.num_experts == 4 and model.config.num_hidden_layers == 2 and len(tok) == 400
    _check_router_logits(model, tok, "Return the")
    # no staging / backup folders left next to the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
