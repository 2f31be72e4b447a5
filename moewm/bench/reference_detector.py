"""A deliberately plain reference detector: the original token-by-token procedure.

One incremental forward per token (KV cache), routing read from the model's own
``output_router_logits=True`` outputs (not from moewm's hooks), green lists as Python sets.
It exists to check the batched detector (tests) and to measure what batching buys (benchmarks);
never use it for real work.
"""

from __future__ import annotations

import inspect
import math
from typing import Sequence

import torch

from moewm.schemes.moe_lsh import MoELSHWatermark


@torch.no_grad()
def reference_detect(wm: MoELSHWatermark, text_ids: Sequence[int], prompt_ids: Sequence[int]) -> dict[str, float]:
    """Score one text token by token; returns z, counts and the per-position gammas."""
    if wm.extractor_cfg.kind != "router":
        raise ValueError("the reference detector reads output_router_logits: it needs extractor.kind=router")
    model, enc, cfg = wm.model, wm.encoder, wm.extractor_cfg
    pools = [set(row) for row in enc.pools.cpu().tolist()]
    projection = enc.projection.cpu().double()
    center = enc.center.cpu().double()
    ids = list(prompt_ids) + list(text_ids)
    back = -cfg.token_idx
    start, end = wm.capture_hooks.start, wm.capture_hooks.end
    device = wm.device
    # transformers 5 renames the KV-cache argument and output from past_key_values to cache.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    wm.capture_hooks.detach()  # the reference must not depend on moewm's hooks
    try:
        past = None
        history: list[torch.Tensor] = []
        prev_probs = torch.zeros(wm.vocab_size, dtype=torch.float64)
        green_count, mean, var, n = 0, 0.0, 0.0, 0
        for t, token in enumerate(ids):
            usable = bool(enc.usable[token])
            if t >= len(prompt_ids) and t - back >= 0 and usable:
                feature = history[t - back]
                bits = ((feature - center) @ projection > 0).tolist()
                green: set[int] = set()
                for bit, pool in zip(bits, pools):
                    if bit:
                        green |= pool
                if wm.watermark_cfg.null == "model":  # the model's own mass on the green list, among text tokens
                    gamma = sum(float(prev_probs[i]) for i in green) / float(prev_probs[enc.usable.cpu()].sum())
                else:
                    gamma = len(green) / enc.num_usable
                green_count += token in green
                mean += gamma
                var += gamma * (1 - gamma)
                n += 1
            out = model(
                input_ids=torch.tensor([[token]], device=device),
                use_cache=True,
                output_router_logits=True,
                **{cache_arg: past},
            )
            past = getattr(out, cache_arg)
            prev_probs = torch.softmax(out.logits[0, -1].double(), dim=-1).cpu()
            layers = []
            for logits in out.router_logits[start:end]:
                probs = torch.softmax(logits.reshape(-1, logits.shape[-1])[-1].double(), dim=-1)
                if cfg.use_top_k:
                    top = torch.topk(probs, cfg.k)
                    probs = torch.zeros_like(probs).scatter_(0, top.indices, top.values)
                layers.append(probs.cpu())
            history.append(torch.cat(layers))
    finally:
        wm.capture_hooks.attach()
    z = (green_count - mean) / math.sqrt(var) if var > 0 else float("nan")
    return {"num_tokens_scored": n, "num_green_tokens": green_count, "z_score": z, "gamma_sum": mean}
