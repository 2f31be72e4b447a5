"""The capture's next-token distribution, from the split decoder + head or from full logits, equals the
model's own softmax at every scored position."""

import pytest
import torch
from torch import nn

from moewm.config import EncoderConfig, WatermarkConfig
from moewm.engine.lm_head import split_lm_head
from moewm.engine.padding import pad_rows
from moewm.models.micro import micro_model
from moewm.schemes.moe_lsh import MoELSHWatermark


def _granite_moe():
    from transformers import GraniteMoeConfig, GraniteMoeForCausalLM

    cfg = GraniteMoeConfig(
        vocab_size=300, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, logits_scaling=8.0,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return GraniteMoeForCausalLM(cfg).eval()


class ScaledLogits(nn.Module):
    """A causal LM whose logits get a post-processing moewm does not know: the split must be refused."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out

    def get_decoder(self):
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()


def test_split_head_reproduces_each_family_and_refuses_an_unknown_post_processing():
    probe = torch.arange(3, 11).unsqueeze(0)
    for family in ("qwen2_moe", "mixtral", "olmoe"):
        split = split_lm_head(micro_model(family), probe)
        assert split is not None and split.description == "none", family
    split = split_lm_head(_granite_moe(), probe)
    assert split is not None and split.description == "/ logits_scaling=8.0"
    assert split_lm_head(ScaledLogits(micro_model("qwen2_moe")), probe) is None


def _direct_logits(model, rows):
    ids, attention = pad_rows(rows, 0)
    length = ids.shape[1]
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention, position_ids=torch.arange(length).expand(len(rows), -1), use_cache=False).logits


def _check_capture(wm, model, rows, prompt_lengths, k):
    caps = wm.capture([r[p:] for r, p in zip(rows, prompt_lengths)], [r[:p] for r, p in zip(rows, prompt_lengths)])
    logits = _direct_logits(model, rows)
    usable = wm.encoder.usable.double()
    for i, (r, p) in enumerate(zip(rows, prompt_lengths)):
        c = caps[i]
        assert c.num_scored == len(r) - p and c.tokens.tolist() == r[p:]
        logp = torch.log_softmax(logits[i, p - 1 : len(r) - 1].double(), dim=-1)
        probs = logp.exp() * usable
        probs = probs / probs.sum(-1, keepdim=True)
        top = torch.topk(probs, k, dim=-1)
        torch.testing.assert_close(c.top_probs.double(), top.values, rtol=1e-4, atol=1e-7)
        assert (c.top_ids.long() == top.indices).float().mean() > 0.99  # ties may swap
        torch.testing.assert_close(c.tail.double(), (1 - top.values.sum(-1)).clamp(min=0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(c.logprob.double(), logp.gather(1, torch.tensor(r[p:]).unsqueeze(1)).squeeze(1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["split", "full_logits"])
def test_capture_keeps_the_models_next_token_distribution(tokenizer, key, path, monkeypatch):
    """Blocks of the output head (large vocabulary) spanning rows, padding and prompts skipped, on both paths."""
    model = micro_model("qwen2_moe", vocab_size=40000)
    wm = MoELSHWatermark(model, tokenizer, encoder=EncoderConfig(num_bits=16, pool_size=32), watermark=WatermarkConfig(capture_top_k=64),
                         key=key, cache_dir=None)
    if path == "full_logits":
        monkeypatch.setattr("moewm.engine.capture.split_lm_head", lambda *a: None)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (70, 12, 41)]
    _check_capture(wm, model, rows, [3, 9, 5], 64)
    assert (wm.split_head() is not None) == (path == "split")
    wm.close()


def test_diagnostic_gamma_is_the_exact_green_mass_when_the_capture_holds_the_whole_distribution(tokenizer, key, micro_qwen):
    wm = MoELSHWatermark(micro_qwen, tokenizer, encoder=EncoderConfig(num_bits=16, pool_size=8),
                         watermark=WatermarkConfig(capture_top_k=256, statistic_top_k=64, reference_keys=19, alpha=0.05, ignore_repeated=False),
                         key=key, cache_dir=None)
    rows = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 25)]
    out = wm.detect_ids([r[2:] for r in rows], [r[:2] for r in rows])
    caps = wm.capture([r[2:] for r in rows], [r[:2] for r in rows])
    logits = _direct_logits(micro_qwen, rows)
    enc = wm.encoder
    for i, r in enumerate(rows):
        probs = torch.softmax(logits[i, 1 : len(r) - 1].double(), dim=-1)
        bits = enc.signature(caps[i].features)
        green = enc.green_columns(bits).double()
        mass = (probs[:, enc.pool_tokens] * green).sum(-1) / (probs * enc.usable.double()).sum(-1)
        assert out.gamma_mean[i] == pytest.approx(float(mass.mean()), rel=1e-5)
    wm.close()


def test_granite_capture_uses_the_scaled_logits(tokenizer, key):
    """Granite's logits are head(h) / logits_scaling: the split path must divide, or the distribution is wrong."""
    model = _granite_moe()
    wm = MoELSHWatermark(model, tokenizer, encoder=EncoderConfig(num_bits=8, pool_size=8), watermark=WatermarkConfig(capture_top_k=64), key=key, cache_dir=None)
    rows = [torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(1)).tolist()]
    _check_capture(wm, model, rows, [4], 64)
    assert wm.split_head() is not None
    wm.close()
