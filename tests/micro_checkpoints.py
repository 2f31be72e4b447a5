"""Micro checkpoints for the model / memory / quantization tests: saved with save_pretrained, loaded by load_model.

The "big" variants widen the experts so that, as in real MoE checkpoints, expert weights dominate
the parameter count (Qwen1.5-MoE: 87 % experts; here ~80 %), which is what quantization is about.
"""

from __future__ import annotations

from pathlib import Path

from moewm.models.micro import MICRO_ARCHITECTURES, MICRO_BIG_OVERRIDES, byte_tokenizer, micro_model

BIG_OVERRIDES = MICRO_BIG_OVERRIDES  # one home: moewm.models.micro (the benchmark builds them too)

# Families load_model must handle with random weights (granitemoe has no entry in moewm.models.micro).
EXTRA_ARCHITECTURES = {
    "granitemoe": dict(
        model_type="granitemoe", hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
        tie_word_embeddings=True, embedding_multiplier=12.0, logits_scaling=6.0, residual_multiplier=0.22,
        attention_multiplier=0.0625, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ),
}


def architecture(family: str, vocab_size: int = 259, **overrides) -> dict:
    """A micro architecture dict (model_type included), as a model YAML's ``architecture`` would hold it."""
    base = EXTRA_ARCHITECTURES.get(family) or MICRO_ARCHITECTURES[family]
    arch = dict(base, vocab_size=vocab_size, **overrides)
    if arch["model_type"] in ("olmoe",):  # keep special ids inside the byte vocabulary
        arch.update(bos_token_id=None, eos_token_id=257, pad_token_id=258)
    return arch


def save_micro(family: str, folder: Path, big: bool = True, seed: int = 0) -> Path:
    """save_pretrained of a micro model and the byte tokenizer into ``folder`` (a local checkpoint)."""
    model = micro_model(family, seed=seed, **(BIG_OVERRIDES.get(family, {}) if big else {}))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder
