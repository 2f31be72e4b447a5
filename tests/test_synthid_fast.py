"""moewm's SynthID processor (moewm/schemes/synthid_fast.py) against transformers': the same g-values, bit-identical
scores step by step, and the same generated ids through ``generate`` on tiny_moe (sampling, top-p, greedy, left padding)."""

import pytest
import torch
from transformers import SynthIDTextWatermarkingConfig
from transformers.generation.logits_process import SynthIDTextWatermarkLogitsProcessor

from moewm.config import GenerationConfig, ModelConfig, SynthIDConfig, WatermarkConfig
from moewm.engine.generation import generate_batched
from moewm.engine.keys import WatermarkKey
from moewm.schemes.synthid import SynthIDWatermark
from moewm.schemes.synthid_fast import FastSynthIDTextWatermarkingConfig, FastSynthIDTextWatermarkLogitsProcessor
from conftest import TEST_SECRET

KEYS = [1234567891, 7, 2**31 - 1, 98765, 424242, 13, 2**30 + 5, 55555]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors and a tiny model's decode steps: a second thread only waits (on a busy 2-core machine, 10x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pair(ngram_len: int, table_size: int = 2**16, **kwargs):
    settings = dict(ngram_len=ngram_len, keys=KEYS, sampling_table_seed=99, sampling_table_size=table_size, **kwargs)
    ref = SynthIDTextWatermarkingConfig(**settings).construct_processor(0, torch.device("cpu"))
    fast = FastSynthIDTextWatermarkingConfig(**settings).construct_processor(0, torch.device("cpu"))
    return ref, fast


@pytest.mark.parametrize("ngram_len", [2, 3, 4, 5])
@pytest.mark.parametrize("table_size,vocab", [(2**16, 1000), (2**10, 3000), (2**4, 50)])
def test_g_values_of_a_context_are_a_slice_of_one_table_per_key_set(ngram_len, table_size, vocab):
    ref, fast = _pair(ngram_len, table_size)
    gen = torch.Generator().manual_seed(ngram_len)
    context = torch.randint(0, 2**40, (16, ngram_len - 1), generator=gen)  # large ids: hashes of every sign
    context[0] = 0
    keys, context_hash = ref._compute_keys(context, torch.arange(vocab).expand(16, -1))
    assert (context_hash < 0).any() and (context_hash > 0).any()
    assert torch.equal(fast.context_g_values(context_hash, vocab), ref.sample_g_values(keys))


def _steps(ref, fast, batch: int, vocab: int, steps: int, dtype=torch.float32, seed: int = 0) -> None:
    """Feed both processors the same growing ids and scores (few distinct ids, so contexts repeat; some -inf
    as after top-k / top-p) and require bit-identical outputs at every step."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, 3), generator=gen)
    for step in range(steps):
        scores = (torch.randn(batch, vocab, generator=gen) * 4).to(dtype)
        scores[torch.rand(batch, vocab, generator=gen) < 0.3] = float("-inf")
        scores[:, 0] = 5.0  # never a row of -inf only
        expected, got = ref(ids, scores.clone()), fast(ids, scores.clone())
        assert got.dtype == expected.dtype and torch.equal(got, expected), f"step {step}"
        ids = torch.cat([ids, torch.randint(0, 4, (batch, 1), generator=gen)], dim=1)
    assert torch.equal(fast.state.context_history, ref.state.context_history) and fast.state.num_calls == steps


@pytest.mark.parametrize("ngram_len", [2, 3, 5])
@pytest.mark.parametrize("skip_first", [False, True])
def test_scores_are_bit_identical_to_transformers_step_by_step(ngram_len, skip_first):
    ref, fast = _pair(ngram_len, skip_first_ngram_calls=skip_first, context_history_size=16)
    _steps(ref, fast, batch=6, vocab=3000, steps=24, seed=ngram_len)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_scores_are_bit_identical_in_other_float_types_and_with_a_vocabulary_larger_than_the_table(dtype):
    ref, fast = _pair(3, table_size=2**8)
    _steps(ref, fast, batch=3, vocab=700, steps=10, dtype=dtype)


def test_a_table_size_that_is_not_a_power_of_two_gets_transformers_own_processor():
    proc = FastSynthIDTextWatermarkingConfig(ngram_len=3, keys=KEYS, sampling_table_size=1000).construct_processor(0, "cpu")
    assert type(proc) is SynthIDTextWatermarkLogitsProcessor
    assert isinstance(FastSynthIDTextWatermarkingConfig(ngram_len=3, keys=KEYS).construct_processor(0, "cpu"),
                      FastSynthIDTextWatermarkLogitsProcessor)


@pytest.fixture(scope="module")
def tiny_moe():
    from moewm.models.loading import load_model

    return load_model(ModelConfig(name="tiny_moe", path="builtin:tiny_moe"))


DECODING = {
    "sample": dict(do_sample=True),
    "top_p_0.9": dict(do_sample=True, top_p=0.9),
    "temperature_0.7_top_k_40": dict(do_sample=True, temperature=0.7, top_k=40),
    "greedy": dict(do_sample=False),
}


@pytest.mark.parametrize("ngram_len", [2, 3, 5])
@pytest.mark.parametrize("decoding", list(DECODING))
def test_generation_gives_the_ids_of_transformers_synthid(tiny_moe, ngram_len, decoding, monkeypatch):
    model, tokenizer = tiny_moe
    steps = []
    tilt = FastSynthIDTextWatermarkLogitsProcessor.tilt
    monkeypatch.setattr(FastSynthIDTextWatermarkLogitsProcessor, "tilt", lambda self, *a: steps.append(1) or tilt(self, *a))
    wm = SynthIDWatermark(model, tokenizer, WatermarkConfig(kind="synthid", synthid=SynthIDConfig(ngram_len=ngram_len, num_keys=8)),
                          WatermarkKey(TEST_SECRET, 0))
    assert isinstance(wm.watermarking_config, FastSynthIDTextWatermarkingConfig)
    prompts = [tokenizer(p)["input_ids"] for p in ["The", "Once upon a time there was", "def f(x):\n    return", "It was"]]
    assert len({len(p) for p in prompts}) > 1  # left padding in the batch
    generation = GenerationConfig(max_new_tokens=24, min_new_tokens=24, batch_size=4, **DECODING[decoding])
    fast = wm.generate_from_ids(prompts, generation)
    assert len(steps) == generation.max_new_tokens  # generate ran moewm's processor at every step
    ref = generate_batched(model, tokenizer, prompts, generation, [], extra_generate_kwargs={"watermarking_config": wm.transformers_config})
    plain = wm.generate_from_ids(prompts, generation, watermark=False)
    assert fast == ref and len(steps) == generation.max_new_tokens
    assert fast != plain  # the watermark changed something, so the comparison is not vacuous
