"""The model null's next-token distribution, from the split decoder + head or from full logits, equals
the model's own softmax at every scored position."""

import pytest
import torch
from torch import nn

from moewm.config import EncoderConfig, WatermarkConfig
from moewm.lm_head import split_lm_head
from moewm.testing import micro_model
from moewm.watermark import MoELSHWatermark


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


@pytest.mark.parametrize("path", ["split", "full_logits"])
def test_model_null_gamma_matches_the_direct_computation(tokenizer, key, path, monkeypatch):
    """Blocks of 16 positions (large vocabulary) spanning rows, padding and prompts skipped, on both paths."""
    model = micro_model("qwen2_moe", vocab_size=40000)
    wm = MoELSHWatermark(model, tokenizer, encoder=EncoderConfig(num_bits=16, pool_size=32), watermark=WatermarkConfig(null="model"), key=key)
    if path == "full_logits":
        monkeypatch.setattr("moewm.watermark.split_lm_head", lambda *a: None)
    gen = torch.Generator().manual_seed(0)
    prompt_lengths = [3, 9, 5]
    rows = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (70, 12, 41)]
    s = wm.token_scores(rows, prompt_lengths)
    assert (wm.split_head() is not None) == (path == "split")
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        attention[i, : len(r)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, position_ids=torch.arange(length).expand(len(rows), -1), use_cache=False).logits
    wm.close()
    enc = wm.encoder
    expected = torch.zeros(len(rows), length, dtype=torch.float64)
    for i in range(len(rows)):
        probs = torch.softmax(logits[i, :-1].double(), dim=-1)
        green = enc.green_columns(s["bits"][i, 1:]).double()
        expected[i, 1:] = (probs[:, enc.pool_tokens] * green).sum(-1) / (probs * enc.usable.double()).sum(-1)
    scored = s["scored"]
    assert int(scored.sum()) == sum(len(r) - p for r, p in zip(rows, prompt_lengths))
    torch.testing.assert_close(s["gamma"][scored], expected[scored], rtol=1e-5, atol=1e-7)
    assert torch.all(s["gamma"][~scored] == 0)


def test_granite_detection_uses_the_scaled_logits(tokenizer, key):
    """Granite's logits are head(h) / logits_scaling: the split path must divide, or gamma is wrong."""
    model = _granite_moe()
    wm = MoELSHWatermark(model, tokenizer, encoder=EncoderConfig(num_bits=8, pool_size=8), watermark=WatermarkConfig(null="model"), key=key)
    rows = [torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(1)).tolist()]
    s = wm.token_scores(rows, [4])
    assert wm.split_head() is not None
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(rows), use_cache=False).logits[0, :-1].double()
    wm.close()
    probs = torch.softmax(logits, dim=-1)
    enc = wm.encoder
    expected = (probs[:, enc.pool_tokens] * enc.green_columns(s["bits"][0, 1:]).double()).sum(-1) / (probs * enc.usable.double()).sum(-1)
    scored = s["scored"][0, 1:]
    torch.testing.assert_close(s["gamma"][0, 1:][scored], expected[scored], rtol=1e-5, atol=1e-7)
