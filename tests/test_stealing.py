"""Watermark stealing: the estimator recovers planted green lists, the processor adds exactly delta * score,
subset contexts find a watermark keyed by a token further back, foreign keys and bad arguments are refused
before weights load, and a tiny run writes its report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from moewm.config import ConfigError
from moewm.evaluation.stealing_scores import (NO_TOKEN, ContextCoder, StealingConfig, StealingProcessor, context_masks, estimate_scores,
                                       positions_of)

V = 64


@dataclass(frozen=True)
class Row:
    prompt_ids: tuple[int, ...]
    ids: tuple[int, ...]


def _green_lists(seed: int = 0, gamma: float = 0.25) -> np.ndarray:
    """(V, V) bool: the green list of every context token (a planted KGW key)."""
    rng = np.random.default_rng(seed)
    green = np.zeros((V, V), bool)
    for c in range(V):
        green[c, rng.choice(V, int(gamma * V), replace=False)] = True
    return green


def _corpus(n: int, length: int, seed: int, green: np.ndarray | None, back: int = 1, delta: float = 3.0) -> list[Row]:
    """Texts from a fixed Zipf-like unigram model, boosted by delta on the green list of the token ``back`` before."""
    rng = np.random.default_rng(seed)
    base = np.log(1.0 / np.arange(1, V + 1) ** 0.8)
    rows = []
    for _ in range(n):
        prompt = list(rng.integers(0, V, 4))
        seq = list(prompt)
        for _ in range(length):
            logits = base.copy()
            if green is not None:
                logits = logits + delta * green[seq[-back]]
            p = np.exp(logits - logits.max())
            seq.append(int(rng.choice(V, p=p / p.sum())))
        rows.append(Row(tuple(prompt), tuple(seq[len(prompt):])))
    return rows


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    """Probability that a random green token scores above a random red one (ties count half)."""
    pos, neg = score[label], score[~label]
    return float(((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()))


def _scores_for(table, context_tokens: list[int]) -> np.ndarray:
    """(V,) combined scores after a context (nearest token first)."""
    values = torch.tensor([[t + 2 for t in context_tokens]])
    return table.score_matrix(values)[0].numpy()


def test_context_masks_are_every_subset_with_the_empty_one_first():
    masks = context_masks(3)
    assert masks.shape == (8, 3) and not masks[0].any()
    assert len({tuple(m) for m in masks}) == 8


def test_estimator_recovers_a_planted_green_list_better_than_chance():
    green = _green_lists()
    table = estimate_scores(_corpus(300, 40, 1, green), _corpus(300, 40, 2, None), StealingConfig(context_tokens=1), V)
    aucs = [_auc(_scores_for(table, [c]), green[c]) for c in range(V)]
    assert np.mean(aucs) > 0.75, np.mean(aucs)
    # without a watermark the same estimator finds nothing
    null = estimate_scores(_corpus(300, 40, 3, None), _corpus(300, 40, 2, None), StealingConfig(context_tokens=1), V)
    assert abs(np.mean([_auc(_scores_for(null, [c]), green[c]) for c in range(V)]) - 0.5) < 0.08


def test_subset_contexts_find_a_watermark_keyed_by_the_token_two_back():
    green = _green_lists(seed=5)
    marked, plain = _corpus(300, 40, 1, green, back=2), _corpus(300, 40, 2, None)
    two = estimate_scores(marked, plain, StealingConfig(context_tokens=2), V)
    one = estimate_scores(marked, plain, StealingConfig(context_tokens=1), V)
    rng = np.random.default_rng(0)
    # the context (t-1 arbitrary, t-2 = c): mask {t-2} carries the green list of c
    auc_two = np.mean([_auc(_scores_for(two, [int(rng.integers(V)), c]), green[c]) for c in range(V)])
    auc_one = np.mean([_auc(_scores_for(one, [c]), green[c]) for c in range(V)])
    assert auc_two > 0.65 > auc_one + 0.05, (auc_two, auc_one)


def test_context_codes_are_exact_and_distinct_across_masks():
    coder = ContextCoder(StealingConfig(context_tokens=3), 8192)
    before = np.array([[5, 7, NO_TOKEN], [5, 8, NO_TOKEN], [0, 0, 0]])
    codes = coder.codes(coder.values(before, None))
    assert codes.shape == (3, 8) and (codes[:, 0] == 0).all()  # the empty context is one code
    assert len(set(codes[:2].ravel().tolist())) == 8 + 8 - 4  # the rows share exactly the 4 masks without t-2
    assert torch.equal(coder.torch_codes(torch.as_tensor(coder.values(before, None))), torch.as_tensor(codes))


def test_positions_take_the_prompt_as_context_and_no_token_before_it():
    before, target, index = positions_of([Row((3, 4), (5, 6))], 3)
    assert target.tolist() == [5, 6] and index.tolist() == [2, 3]
    assert before.tolist() == [[4, 3, NO_TOKEN], [5, 4, 3]]


def _brute_force(rows_w, rows_b, cfg: StealingConfig, context: list[int]) -> np.ndarray:
    """The combined score after ``context`` from Python dictionaries (an independent implementation)."""
    from collections import Counter

    h = cfg.context_tokens
    masks = [m for m in context_masks(h)]

    def counts(rows):
        pair, ctx, uni = Counter(), Counter(), Counter()
        for r in rows:
            seq = [NO_TOKEN] * h + list(r.prompt_ids) + list(r.ids)
            for i in range(h + len(r.prompt_ids), len(seq)):
                prev = [seq[i - j] for j in range(1, h + 1)]
                uni[seq[i]] += 1
                for m in masks:
                    key = tuple(p if k else None for p, k in zip(prev, m))
                    pair[key, seq[i]] += 1
                    ctx[key] += 1
        return pair, ctx, uni

    pw, cw, _ = counts(rows_w)
    pb, cb, ub = counts(rows_b)
    total = sum(ub.values())
    out, weight = np.zeros(V), 0.0
    for m in masks:
        key = tuple(p if k else None for p, k in zip(context, m))
        if cw[key] < cfg.min_count:
            continue
        weight += 1.0
        for t in range(V):
            if pw[key, t] == 0:
                continue
            prior = (ub[t] + 0.5) / (total + 0.5 * V)
            ratio = (pw[key, t] / cw[key]) / ((pb[key, t] + cfg.base_prior * prior) / (cb[key] + cfg.base_prior))
            out[t] += min(ratio, cfg.ratio_cap) / cfg.ratio_cap if ratio >= 1 else 0.0
    return out / max(weight, 1e-12)


def test_processor_adds_exactly_delta_times_the_combined_score():
    cfg = StealingConfig(context_tokens=2, min_count=2)
    rows_w, rows_b = _corpus(60, 20, 1, _green_lists()), _corpus(60, 20, 2, None)
    table = estimate_scores(rows_w, rows_b, cfg, V)
    ids = torch.tensor([[1, 2, 3, rows_w[0].ids[0], rows_w[0].ids[1]], [9, 9, 9, 9, 9], [4, 4, 4, 0, 7]])
    scores = torch.randn(3, V)
    out = StealingProcessor(table, 2.5)(ids, scores)
    for b in range(3):
        expected = _brute_force(rows_w, rows_b, cfg, [int(ids[b, -1]), int(ids[b, -2])])
        assert np.allclose((out[b] - scores[b]).numpy(), 2.5 * expected, atol=1e-5)
    assert (out - scores).abs().sum() > 0
    assert torch.equal(StealingProcessor(table, 0.0)(ids, scores), scores)


def test_stealing_config_names_the_bad_setting():
    with pytest.raises(ConfigError, match="context_tokens"):
        StealingConfig(context_tokens=5).validate()
    with pytest.raises(ConfigError, match="weighting"):
        StealingConfig(weighting="max").validate()
    rows = _corpus(4, 5, 1, None)
    cfg = StealingConfig(context_tokens=1, routing_clusters=4)
    with pytest.raises(ValueError, match="clusters"):
        estimate_scores(rows, rows, cfg, V)
    table = estimate_scores(rows, rows, cfg, V, np.zeros(20, np.int64), np.ones(20, np.int64))
    with pytest.raises(ValueError, match="capture"):
        StealingProcessor(table, 1.0)


# -- the study: corpora, keys and the command line -----------------------------------------------
def _write_corpus(folder: Path, name: str, watermark: dict | None, fingerprint: str | None, rows: int = 6) -> None:
    from moewm.evaluation.stealing_corpus import CorpusRow, append_rows, write_meta

    path = folder / "tiny_moe" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    append_rows(path, [CorpusRow(i, (5, 6, 7), (8, 9, 10, 11)) for i in range(rows)])
    write_meta(path, {"model": "tiny_moe", "name": name, "watermarked": watermark is not None, "watermark": watermark,
                      "key_fingerprint": fingerprint})


def _no_weights(monkeypatch):
    import moewm.models.loading as loading

    def refuse(*a, **k):
        raise AssertionError("weights loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_model", refuse)


def test_a_corpus_written_under_another_key_is_refused(tmp_path, monkeypatch):
    from moewm.engine.keys import WatermarkKey
    from moewm.evaluation.stealing import StudyConfig

    _no_weights(monkeypatch)
    _write_corpus(tmp_path, "plain", None, None)
    _write_corpus(tmp_path, "kgw", {"kind": "kgw"}, WatermarkKey("another-secret", 0).fingerprint)
    cfg = StudyConfig(corpora=str(tmp_path), schemes=("kgw",), counts=(4,))
    with pytest.raises(ConfigError, match="fingerprint"):
        cfg.validate()
    _write_corpus(tmp_path, "kgw2", {"kind": "kgw"}, WatermarkKey(cfg.secret, 0).fingerprint)
    StudyConfig(corpora=str(tmp_path), schemes=("kgw2",), counts=(4,)).validate()
    _write_corpus(tmp_path, "future", {"kind": "kgw", "new_field": 3}, WatermarkKey(cfg.secret, 0).fingerprint)
    with pytest.raises(ConfigError, match="new_field"):
        StudyConfig(corpora=str(tmp_path), schemes=("future",), counts=(4,)).validate()


@pytest.mark.parametrize("args, message", [
    (["--model", "gpt2"], "--model"),
    (["--attackers", "oracle"], "--attackers"),
    (["--counts", "7"], "--counts"),
    (["--deltas", "0"], "--deltas"),
    (["--schemes", "missing"], "does not exist"),
    (["--attacker-model", "tiny_olmoe"], "weights_holder"),
    (["--context-tokens", "9"], "context_tokens"),
    (["--scrub-count", "99", "--spoof-count", "4"], "--scrub-count"),
])
def test_the_command_line_refuses_bad_arguments_before_weights_load(tmp_path, monkeypatch, capsys, args, message):
    from moewm.engine.keys import WatermarkKey
    from moewm.evaluation.stealing import DEFAULT_SECRET, main

    _no_weights(monkeypatch)
    _write_corpus(tmp_path, "plain", None, None)
    _write_corpus(tmp_path, "kgw", {"kind": "kgw"}, WatermarkKey(DEFAULT_SECRET, 0).fingerprint)
    with pytest.raises(SystemExit):
        main(["--corpora", str(tmp_path), "--schemes", "kgw", "--counts", "4", *args])
    assert message in capsys.readouterr().err


def test_a_tiny_run_writes_the_csv_and_markdown(tmp_path):
    """KGW h=1 corpora written by the corpus script on tiny_moe (few short texts), then the study end to end."""
    import importlib.util

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("stealing_corpora", Path(__file__).resolve().parent.parent / "scripts" / "stealing_corpora.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    corpora = tmp_path / "corpora"
    common = ["--model", "tiny_moe", "--count", "12", "--new-tokens", "12", "--batch-size", "12", "--out", str(corpora)]
    script.main(["--name", "plain", *common])
    script.main(["--name", "kgw_h1", "--watermark", json.dumps({"kind": "kgw", "kgw": {"context_width": 1}}), *common])
    from moewm.evaluation.stealing import main

    out = tmp_path / "out"
    main(["--corpora", str(corpora), "--schemes", "kgw_h1", "--counts", "6,12", "--attackers", "text_only,weights_holder",
          "--deltas", "4", "--scrub-deltas", "4", "--spoof-count", "4", "--scrub-count", "2", "--new-tokens", "12",
          "--routing-clusters", "4", "--cache-dir", "none", "--out", str(out)])
    import pandas as pd

    frame = pd.read_csv(out / "stealing.csv", keep_default_na=False, na_values=[""])
    assert set(frame["mode"]) == {"plain", "watermarked", "paraphrase", "spoof", "scrub"}
    assert len(frame[frame["mode"] == "spoof"]) == 2 * 2 and (frame["wall_s"] >= 0).all()
    assert "stealing-study-secret" not in (out / "stealing.csv").read_text() + (out / "stealing.md").read_text()
    assert "Best spoofing attack" in (out / "stealing.md").read_text() and (out / "stealing.png").exists()


def test_a_corpus_meta_names_the_extractor_and_encoder_that_wrote_it():
    from moewm.config import ConfigError, EncoderConfig, ExtractorConfig
    from moewm.evaluation.stealing import design_from_meta

    assert design_from_meta({}) == (ExtractorConfig(), EncoderConfig())  # corpora written before the meta named them
    extractor, encoder = design_from_meta({"extractor": {"use_top_k": True, "k": 1}, "encoder": {"num_bits": 16}})
    assert (extractor.use_top_k, extractor.k, encoder.num_bits) == (True, 1, 16)
    with pytest.raises(ConfigError, match="extractor.k=0"):
        design_from_meta({"extractor": {"use_top_k": True, "k": 0}})
    with pytest.raises(ConfigError, match="extractor.hyperplanes"):
        design_from_meta({"extractor": {"hyperplanes": 3}})
