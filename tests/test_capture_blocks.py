"""The capture's output-head blocks run in place on one reused buffer: the results are bit for bit those of
the plain out-of-place formula, and so is detection (the capture's speed change changes no output)."""

import dataclasses

import numpy as np
import pytest
import torch

from moewm.config import EncoderConfig, ExtractorConfig, GenerationConfig, WatermarkConfig
from moewm.engine import capture as capture_module
from moewm.schemes.moe_lsh import MoELSHWatermark


def _out_of_place(logits: torch.Tensor, tokens: torch.Tensor, usable: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The block formula as it was before the buffer (log-softmax, renormalise over usable tokens, top-K)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    logprob = torch.gather(logp, 1, tokens.unsqueeze(1)).squeeze(1)
    probs = logp.exp() * usable
    probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-30)
    top = torch.topk(probs, k, dim=-1)
    return {"top_ids": top.indices.int(), "top_probs": top.values, "tail": (1.0 - top.values.sum(-1)).clamp(min=0.0), "logprob": logprob}


@pytest.mark.parametrize("block", [7, 4096])  # several blocks with a short last one; one block
def test_in_place_head_blocks_give_bit_identical_captures_and_detection(block, micro_qwen, tokenizer, key, monkeypatch):
    monkeypatch.setattr(capture_module, "_MEMORY", {})  # capture for real, not from an earlier test's cache
    monkeypatch.setattr(capture_module, "head_block", lambda vocab, device: block)
    cfg = WatermarkConfig(delta=4.0, reference_keys=99, alpha=0.01)
    with MoELSHWatermark(micro_qwen, tokenizer, ExtractorConfig(), EncoderConfig(), cfg, key, cache_dir=None) as wm:
        gen = GenerationConfig(max_new_tokens=24, min_new_tokens=24, batch_size=4)
        # prompts of one length: every row is as long, so the capture keeps the texts' order in its one batch
        prompt_ids, marked = wm.generate_ids(["The quick brown fox", "The quick brown cat"], gen)
        plain_prompts, plain = wm.generate_ids(["Once upon a time, a", "Once upon a time, b"], gen, watermark=False)
        texts, prompts = list(marked) + list(plain), list(prompt_ids) + list(plain_prompts)
        assert len({len(p) + len(t) for p, t in zip(prompts, texts)}) == 1
        blocks: list[torch.Tensor] = []

        def record(module, inputs, output):
            if inputs[0].dim() == 2:  # the capture's head blocks (positions, hidden); not the 3-D probe forward
                blocks.append(output.detach().clone())

        handle = micro_qwen.get_output_embeddings().register_forward_hook(record)
        try:
            captures = wm.capture(texts, prompts)
        finally:
            handle.remove()
        assert len(blocks) >= (2 if block == 7 else 1)
        tokens = torch.cat([c.tokens for c in captures])
        logits = torch.cat(blocks)
        assert logits.shape[0] == tokens.numel()  # one batch, rows in text order: the blocks cover every scored token
        k = captures[0].top_ids.shape[1]
        want = _out_of_place(logits, tokens, wm.encoder.usable.to(logits.device), k)
        got = {name: torch.cat([getattr(c, name) for c in captures]) for name in want}
        for name in want:
            assert torch.equal(got[name], want[name]), name
        # detection from these captures and from captures rebuilt with the old formula's values: identical
        old, start = [], 0
        for c in captures:
            n = c.num_scored
            old.append(dataclasses.replace(c, **{name: want[name][start : start + n] for name in want}))
            start += n
        new_out, old_out = wm.score(captures), wm.score(old)
        for field in dataclasses.fields(new_out):
            a, b = getattr(new_out, field.name), getattr(old_out, field.name)
            if isinstance(a, (np.ndarray, torch.Tensor)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=field.name)
            else:
                assert a == b, field.name
        assert new_out.prediction[:2].all() and not new_out.prediction[2:].any()
