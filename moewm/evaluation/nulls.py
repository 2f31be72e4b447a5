"""Null sets: unwatermarked text of several origins, scored in every run so that validity is measured.

A p-value promises a false-positive rate on text written without the key, whatever wrote it. Every
job therefore scores, besides its own temperature-1 samples (``plain``), greedy and top-p samples of
the same prompts (``greedy``, ``top_p``) and human-written text nobody on this project wrote (the
corpora of :mod:`moewm.null_corpora`). None of them depends on the key, so they are built once per
process and model, and :func:`null_set_metrics` reports, per set, the share at p <= alpha, its count,
and whether it lies under the binomial 99 % bound of the nominal rate (``null_ok``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy.stats import binom

from moewm.config import GENERATED_NULL_SETS as GENERATED_SETS, NULL_SET_NAMES, GenerationConfig, check_null_sets  # noqa: F401
from moewm.engine.detection import DetectorOutput
from moewm.null_corpora import human_texts

log = logging.getLogger(__name__)

# Decoding of the top-p null set: a common "chat" setting.
TOP_P, TOP_P_TEMPERATURE = 0.9, 0.7


@dataclass
class NullSet:
    """Unwatermarked texts of one origin, as token ids after their prompts (prompts are context)."""

    name: str
    prompt_ids: list[list[int]]
    text_ids: list[list[int]]


def null_generation(name: str, generation: GenerationConfig) -> GenerationConfig:
    """The decoding of a generated null set: the job's lengths and batch, another way of choosing tokens."""
    if name == "greedy":
        return dataclasses.replace(generation, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    if name == "top_p":
        return dataclasses.replace(generation, do_sample=True, temperature=TOP_P_TEMPERATURE, top_k=0, top_p=TOP_P, repetition_penalty=1.0)
    raise ValueError(f"{name!r} is not a generated null set")


_CACHE: dict[str, NullSet] = {}


def build_null_sets(
    names: Sequence[str],
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    generation: GenerationConfig,
    human_count: int,
    empty_prompt: Sequence[int],
    cache_key: str,
    progress: bool = False,
) -> list[NullSet]:
    """The configured null sets (each built once per process for the same model, prompts and decoding)."""
    from moewm.engine.generation import generate_batched

    check_null_sets(names)
    out = []
    for name in names:
        key = json.dumps([cache_key, name, dataclasses.asdict(generation), human_count, [list(p) for p in prompt_ids]], default=str)
        if key not in _CACHE:
            if name in GENERATED_SETS:
                texts = generate_batched(model, tokenizer, prompt_ids, null_generation(name, generation), [],
                                         progress=f"generate ({name} null)" if progress else None)
                _CACHE[key] = NullSet(name, [list(p) for p in prompt_ids], texts)
            else:
                chunks = human_texts(name, human_count)
                ids = [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in chunks]
                _CACHE[key] = NullSet(name, [list(empty_prompt) for _ in ids], ids)
        out.append(_CACHE[key])
    return out


def binomial_bound(n: int, rate: float, level: float = 0.99) -> int:
    """The largest count of false positives inside the two-sided ``level`` binomial interval of ``rate``."""
    return int(binom.ppf(1 - (1 - level) / 2, n, rate)) if n > 0 else 0


def null_set_metrics(outputs: dict[str, DetectorOutput], alpha: float) -> dict[str, Any]:
    """Per set: ``fpr_<set>`` (share with p <= alpha among texts with a p-value), ``n_<set>``,
    ``fp_<set>`` (the count), ``fpr_model_null_<set>`` (the diagnostic model-null p, for comparison);
    over all: ``null_ok`` (every set's count within its 99 % binomial bound), ``null_failures``."""
    out: dict[str, Any] = {}
    failures = []
    for name, det in outputs.items():
        p = det.p_value
        has_p = np.isfinite(p)
        n = int(has_p.sum())
        flagged = int((p[has_p] <= alpha).sum())
        out[f"fpr_{name}"] = flagged / n if n else float("nan")
        out[f"n_{name}"] = n
        out[f"fp_{name}"] = flagged
        diag = det.p_value_model_null
        ok_diag = np.isfinite(diag)
        out[f"fpr_model_null_{name}"] = float(np.mean(diag[ok_diag] <= alpha)) if ok_diag.any() else float("nan")
        if flagged > binomial_bound(n, alpha):
            failures.append(name)
    out["null_ok"] = not failures
    out["null_failures"] = ",".join(failures)
    if failures:
        log.warning("null sets over their 99%% binomial bound at alpha=%g: %s (the p-values are not valid there: a bug to fix)",
                    alpha, ", ".join(f"{n} {out[f'fp_{n}']}/{out[f'n_{n}']}" for n in failures))
    return out
