"""The model's last step (final hidden state -> next-token logits), split off so it can run in blocks.

The model null of detection needs the next-token distribution at every scored position. A forward with
full logits materialises a (batch, length, vocab) tensor: 5 GB in bf16 for 16 texts of 1k tokens with
Qwen's 152k vocabulary, more than a small GPU has to spare. Running the decoder alone and the output head
over a few positions at a time bounds that to one block.

A causal LM's logits are its output head applied to the decoder's last hidden state, then, for some
families, a fixed post-processing (Granite divides by ``logits_scaling``, Cohere multiplies by
``logit_scale``, Gemma 2/3 soft-cap). :func:`split_lm_head` builds that function from the config and
checks it once against the model's own forward on a few tokens; a model whose logits it cannot reproduce
gets ``None``, and detection then falls back to the full-logits forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

# Relative tolerance of the one-time check: a missed post-processing step is off by a factor, not a rounding.
CHECK_RTOL = 1e-3


@dataclass
class SplitLMHead:
    """``decoder(...)`` gives the last hidden states, ``logits(hidden)`` the model's logits for them."""

    decoder: nn.Module
    head: nn.Module
    post: Callable[[torch.Tensor], torch.Tensor]
    description: str

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.post(self.head(hidden))


def _post_processing(config: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scaling = getattr(text, "logits_scaling", None)
    scale = getattr(text, "logit_scale", None)
    cap = getattr(text, "final_logit_softcapping", None)
    steps: list[tuple[Callable[[torch.Tensor], torch.Tensor], str]] = []
    if isinstance(scaling, (int, float)) and scaling != 1:
        steps.append((lambda x, s=float(scaling): x / s, f"/ logits_scaling={scaling}"))
    if isinstance(scale, (int, float)) and scale != 1:
        steps.append((lambda x, s=float(scale): x * s, f"* logit_scale={scale}"))
    if isinstance(cap, (int, float)) and cap > 0:
        steps.append((lambda x, c=float(cap): torch.tanh(x / c) * c, f"softcap {cap}"))

    def post(x: torch.Tensor) -> torch.Tensor:
        for fn, _ in steps:
            x = fn(x)
        return x

    return post, " ".join(d for _, d in steps) or "none"


@torch.no_grad()
def split_lm_head(model: nn.Module, probe_ids: torch.Tensor) -> Optional[SplitLMHead]:
    """The decoder and output head of ``model``, checked on ``probe_ids`` (1, n); ``None`` when they do
    not reproduce the model's logits (then use the full forward)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or head is None or decoder is model:
        return None
    post, description = _post_processing(model.config)
    split = SplitLMHead(decoder, head, post, description)
    try:
        expected = model(input_ids=probe_ids, use_cache=False, logits_to_keep=0).logits.float()
        hidden = decoder(input_ids=probe_ids, use_cache=False).last_hidden_state
        got = split.logits(hidden).float()
    except Exception as err:  # an architecture whose decoder cannot be called on its own
        log.info("model null: decoder and head cannot run apart (%s); using the full-logits forward", type(err).__name__)
        return None
    if got.shape != expected.shape:
        return None
    error = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    if not error <= CHECK_RTOL * scale + 1e-5:
        log.info("model null: head(post=%s) is off the model's logits by %.3g (max |logit| %.3g); using the full-logits forward", description, error, scale)
        return None
    return split
