"""Text generation and the vocabulary facts every scheme shares: prompts to ids, batched ``generate``, usable tokens.

Plain and watermarked generation go through :func:`generate_batched`; a scheme only adds its logits
processors or ``generate`` keyword arguments, so every scheme (and the unwatermarked null) samples with the
same noise.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from moewm.config import ConfigError, GenerationConfig
from moewm.engine.padding import pad_id, pad_rows


class TokenizerVocabularyMask(LogitsProcessor):
    """Never sample ids the tokenizer does not have (padded embedding rows, or a random-init model's spare rows)."""

    def __init__(self, tokenizer_size: int) -> None:
        self.tokenizer_size = tokenizer_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.tokenizer_size :] = float("-inf")
        return scores


def encode_prompt(tokenizer: Any, prompt: Optional[str]) -> list[int]:
    """Context tokens for a prompt; no prompt means just BOS (if the tokenizer has one)."""
    if prompt:
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None else []


def model_vocab_size(model: nn.Module) -> int:
    """Size of the distribution the model samples from (rows of the output head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def check_tokenizer(tokenizer: Any, vocab_size: int) -> None:
    """Refuse a tokenizer that can emit ids the model does not have."""
    if len(tokenizer) > vocab_size:
        raise ConfigError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary (model.config.vocab_size / output head) "
            f"has {vocab_size}: token ids must lie in [0, {vocab_size - 1}]; the tokenizer and model do not belong together"
        )


def check_text_ids(text_ids: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Refuse texts a detector cannot score: an empty one, or ids outside the model's vocabulary."""
    for i, t in enumerate(text_ids):
        if len(t) == 0:
            raise ValueError(f"text_ids[{i}] is empty: detection needs at least one token of text")
        if max(t) >= vocab_size or min(t) < 0:
            raise ValueError(f"text_ids[{i}]: token ids must lie in [0, {vocab_size - 1}]")


def usable_tokens(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """Tokens that may join a pool: real tokenizer entries that are not special tokens."""
    valid = torch.zeros(vocab_size, dtype=torch.bool)
    valid[: min(len(tokenizer), vocab_size)] = True
    special = [i for i in getattr(tokenizer, "all_special_ids", []) if 0 <= i < vocab_size]
    if special:
        valid[torch.tensor(special)] = False
    return valid


def generate_batched(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    generation: GenerationConfig,
    processors: list[LogitsProcessor],
    on_batch: Any = None,
    progress: Optional[str] = None,
    extra_generate_kwargs: Optional[dict[str, Any]] = None,
) -> list[list[int]]:
    """Left-padded batched ``model.generate``; returns the new tokens of each prompt, stopped at eos.

    ``extra_generate_kwargs`` go to ``model.generate`` as well (e.g. ``watermarking_config=`` for the
    transformers KGW / SynthID baselines).

    The global RNG is seeded per batch from ``generation.sampling_seed``, so watermarked and plain runs
    (and runs with different watermark keys) draw the same sampling noise.
    """
    device = model.get_input_embeddings().weight.device
    pad = pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    if len(tokenizer) < model_vocab_size(model):
        processors = [*processors, TokenizerVocabularyMask(len(tokenizer))]
    outputs: list[list[int]] = []
    starts = range(0, len(prompt_ids), generation.batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress, unit="batch", leave=False)
    for start in starts:
        chunk = prompt_ids[start : start + generation.batch_size]
        input_ids, attention = pad_rows(chunk, pad, side="left")
        width = input_ids.shape[1]
        if width == 0:
            raise ValueError("prompts: a prompt encodes to no tokens (give a non-empty prompt or a tokenizer with a BOS token)")
        if on_batch is not None:
            on_batch()
        torch.manual_seed(generation.sampling_seed + start)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                logits_processor=LogitsProcessorList(processors),
                pad_token_id=pad,
                eos_token_id=eos,
                **generation.generate_kwargs(),
                **(extra_generate_kwargs or {}),
            )
        for row in out[:, width:].tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            outputs.append(row)
    return outputs
