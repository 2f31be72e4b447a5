"""The validity study: are the detectors' p-values valid on text of every origin, key by key?

``python -m moewm.evaluation.validity`` scores >= 1000 unwatermarked texts of six origins (the three shipped human
corpora; greedy, top-p and temperature-1 samples of tiny_moe; text watermarked under *other* keys) under
several deployed keys, and reports per key and origin the share of texts at p <= 0.01 and p <= 1e-3 with
the binomial 99 % interval of the nominal rate, for MoE-LSH (calibrated), its old model-null p (the
diagnostic) and the KGW / SynthID exact tests. Every text is captured once; each key only scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import binom

from moewm.config import EncoderConfig, ExtractorConfig, GenerationConfig, ModelConfig, WatermarkConfig
from moewm.engine.keys import WatermarkKey
from moewm.null_corpora import HUMAN_CORPORA, human_texts
from moewm.evaluation.nulls import null_generation

log = logging.getLogger("moewm.evaluation.validity")
LEVELS = (0.01, 1e-3)


def _prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """Prompts: the shipped ones, then the first words of held-out docstrings (text the model never saw)."""
    from moewm.data import BUILTIN_PROMPTS, read_records
    from moewm.engine.generation import encode_prompt

    texts = [r.text for r in read_records(BUILTIN_PROMPTS)]
    texts += [" ".join(t.split()[:8]) for t in human_texts("human_docstrings")]
    return [encode_prompt(tokenizer, t) for t in texts[:count]]


def build_texts(model: Any, tokenizer: Any, prompts: int, new_tokens: int, wm_keys: list[WatermarkKey], cfgs: tuple) -> dict[str, tuple[list, list]]:
    """Unwatermarked texts by origin: (text ids, prompt ids)."""
    from moewm.schemes.moe_lsh import MoELSHWatermark

    from moewm.engine.generation import generate_batched

    prompt_ids = _prompts(tokenizer, prompts)
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens // 2, batch_size=32, sampling_seed=99)
    sets: dict[str, tuple[list, list]] = {}
    for name in ("greedy", "top_p"):
        sets[name] = (generate_batched(model, tokenizer, prompt_ids, null_generation(name, gen), []), prompt_ids)
    sets["temperature_1"] = (generate_batched(model, tokenizer, prompt_ids, gen, []), prompt_ids)
    extractor, encoder, watermark = cfgs
    other: list[list[int]] = []
    per_key = max(1, prompts // max(1, len(wm_keys)))
    for i, key in enumerate(wm_keys):  # watermarked, but under keys that are never the deployed one
        with MoELSHWatermark(model, tokenizer, extractor, encoder, watermark, key, cache_dir=None) as wm:
            other += wm.generate_from_ids(prompt_ids[i * per_key : (i + 1) * per_key], gen)
    sets["other_keys"] = (other, prompt_ids[: len(other)])
    for name in HUMAN_CORPORA:
        ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in human_texts(name)]
        sets[name] = (ids, [[] for _ in ids])
    return {k: ([t for t in v[0] if t], [p for t, p in zip(*v) if t]) for k, v in sets.items()}


def rate_row(p: np.ndarray, level: float) -> dict[str, Any]:
    p = p[np.isfinite(p)]
    n = len(p)
    k = int((p <= level).sum())
    lo, hi = (binom.ppf(0.005, n, level), binom.ppf(0.995, n, level)) if n else (0, 0)
    return {"n": n, "k": k, "rate": k / n if n else float("nan"), "lo": int(lo), "hi": int(hi), "inside": bool(lo <= k <= hi)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from moewm.schemes.registry import build_watermarker
    from moewm.models.loading import load_model
    from moewm.schemes.moe_lsh import MoELSHWatermark

    torch.manual_seed(0)
    model, tokenizer = load_model(ModelConfig())
    extractor, encoder = ExtractorConfig(), EncoderConfig(**json.loads(args.encoder))
    watermark = WatermarkConfig(reference_keys=args.reference_keys, alpha=max(1e-3, 1 / (args.reference_keys + 1)))
    t0 = time.perf_counter()
    texts = build_texts(model, tokenizer, args.prompts, args.new_tokens, [WatermarkKey("validity-other-keys", i) for i in range(4)],
                        (extractor, encoder, watermark))
    all_texts = [t for v in texts.values() for t in v[0]]
    all_prompts = [p for v in texts.values() for p in v[1]]
    origin = np.array([name for name, v in texts.items() for _ in v[0]])
    log.info("%d unwatermarked texts (%s) in %.0f s", len(all_texts), ", ".join(f"{k} {len(v[0])}" for k, v in texts.items()), time.perf_counter() - t0)
    rows: list[dict[str, Any]] = []
    captures = None
    for seed in range(args.keys):
        key = WatermarkKey(args.secret, seed)
        with MoELSHWatermark(model, tokenizer, extractor, encoder, watermark, key, cache_dir=args.cache_dir) as wm:
            if captures is None:
                t1 = time.perf_counter()
                captures = wm.capture(all_texts, all_prompts)
                log.info("captured %d texts in %.0f s", len(captures), time.perf_counter() - t1)
            t1 = time.perf_counter()
            out = wm.score(captures)
            log.info("key %d: scored in %.0f s (mean reference keys %.0f)", seed, time.perf_counter() - t1, out.num_reference_keys.mean())
        results = {"moe_lsh": out.p_value, "moe_lsh_model_null": out.p_value_model_null}
        if seed < args.baseline_keys:
            for kind in ("kgw", "synthid"):
                results[kind] = build_watermarker(kind, model, tokenizer, WatermarkConfig(kind=kind), key).detect_ids(all_texts, all_prompts).p_value
        for detector, p in results.items():
            for name in ["all", *texts]:
                sel = p if name == "all" else p[origin == name]
                for level in LEVELS:
                    rows.append({"key": seed, "detector": detector, "origin": name, "level": level, **rate_row(np.asarray(sel), level)})
    return {"texts": {k: len(v[0]) for k, v in texts.items()}, "n_texts": len(all_texts), "reference_keys": args.reference_keys,
            "encoder": dataclasses.asdict(encoder),
            "keys": args.keys, "rows": rows, "seconds": time.perf_counter() - t0}


def markdown(result: dict[str, Any]) -> str:
    """Per detector and level: over keys, how often the share over all texts lies inside its 99 % interval,
    the range of shares, and per origin the pooled share over keys."""
    import pandas as pd

    df = pd.DataFrame(result["rows"])
    lines = [f"{result['n_texts']} unwatermarked texts ({', '.join(f'{k} {v}' for k, v in result['texts'].items())}), "
             f"{result['keys']} keys, R = {result['reference_keys']}.", "",
             "| detector | level | keys inside 99 % interval (all texts) | share range over keys | nominal interval | pooled share by origin | (key, origin) pairs inside their interval | worst (key, origin) share |",
             "|---|---|---|---|---|---|---|---|"]
    for (det, level), g in df.groupby(["detector", "level"], sort=False):
        whole = g[g.origin == "all"]
        pooled = g[g.origin != "all"].groupby("origin").apply(lambda x: x.k.sum() / max(x.n.sum(), 1), include_groups=False)
        n = int(whole.n.iloc[0])
        pairs = g[g.origin != "all"]
        above = pairs.k > pairs.hi
        worst = pairs.loc[pairs.rate.idxmax()]
        lines.append(f"| {det} | {level:g} | {int(whole.inside.sum())}/{len(whole)} | {whole.rate.min():.4f}-{whole.rate.max():.4f} | "
                     f"[{int(whole.lo.iloc[0]) / n:.4f}, {int(whole.hi.iloc[0]) / n:.4f}] | "
                     + ", ".join(f"{o} {v:.4f}" for o, v in pooled.items())
                     + f" | {int(pairs.inside.sum())}/{len(pairs)} ({int(above.sum())} above) | {worst.rate:.4f} (key {worst.key}, {worst.origin}, n {worst.n}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moewm.evaluation.validity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10, help="deployed keys to test (default 10)")
    parser.add_argument("--baseline-keys", type=int, default=3, help="keys for which KGW and SynthID are tested too")
    parser.add_argument("--prompts", type=int, default=256, help="prompts for the generated sets")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--reference-keys", type=int, default=999)
    parser.add_argument("--encoder", default="{}", help='encoder fields as JSON, e.g. \'{"pools": "anchors"}\' (default: the defaults)')
    parser.add_argument("--secret", default="validity-study-secret", help="the deployed keys' secret (a study key, never a real one)")
    parser.add_argument("--cache-dir", default="outputs/cache/reference_keys")
    parser.add_argument("--out", default="outputs/validity")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validity.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / "validity.md").write_text(table + "\n")
    print(table)
    print(f"-> {out / 'validity.json'} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
