"""Micro models and tokenizers for tests and smoke runs: built in seconds, no download."""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

MICRO_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "qwen2_moe": dict(
        model_type="qwen2_moe", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8,
        num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False,
    ),
    "mixtral": dict(
        model_type="mixtral", hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=512,
    ),
    "olmoe": dict(
        model_type="olmoe", hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
    ),
    "qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    ),
}


# The "big" micro variants of the quantization tests and benchmark: experts widened so that, as in real MoE
# checkpoints, expert weights dominate the parameter count (Qwen1.5-MoE: 87 % experts; here ~80 %).
MICRO_BIG_OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen2_moe": dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, shared_expert_intermediate_size=128,
                      num_experts=16, num_experts_per_tok=4),
    "mixtral": dict(hidden_size=128, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 259-token byte-level tokenizer (256 bytes + bos/eos/pad): real enough for decode round trips."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return tok


def micro_model(family: str = "qwen2_moe", vocab_size: int = 259, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random-initialised micro model of a transformers family (float32, eval mode)."""
    arch = dict(MICRO_ARCHITECTURES[family], vocab_size=vocab_size, **overrides)
    model_type = arch.pop("model_type")
    config = AutoConfig.for_model(model_type, **arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
