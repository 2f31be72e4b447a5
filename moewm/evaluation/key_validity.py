"""Key validity over many keys: how far one fixed key's false-positive rate on human text strays from the nominal.

A calibrated p-value is exact over the draw of the key; a deployed key is one draw. Where the same n-grams recur
across texts (the King James narrative: "and it came to pass"), a key that happens to favour them flags more of
that genre than the nominal rate, and the validity study's gate (:mod:`moewm.evaluation.validity`: 10 keys, each
inside its binomial interval) samples that spread with ten keys only. This study measures it with hundreds:

* a routing scheme (``moe_tournament``, ``moe_lsh``): every one of its R public reference keys in turn is the
  deployed key, ranked among the other R - 1 (:func:`moewm.engine.scoring.leave_one_out_p_values`; exactly the
  p-value a deployed key gets with those references), from one capture and one pass over the keys;
* an n-gram scheme (``synthid``, ``kgw``): ``--keys`` keys, each its own exact test on the same texts.

Per corpus and level it reports each key's share of texts at p <= level, their mean (the nominal rate, by
exchangeability), their spread (the dispersion ratio: sd over keys / binomial sd; 1 for independent texts), the
share of the worst 1 % of keys, the keys above the binomial 99 % interval (0.5 % expected), and the chance that a
10-key gate finds every key inside its interval on all texts at both levels (:func:`gate_pass_chance`). Human
text only (the shipped and held-out corpora: written by nobody here, the same for every model and design).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moewm.config import ModelConfig
from moewm.engine.keys import WatermarkKey
from moewm.evaluation.validity import LEVELS, STUDY_MODELS, binomial_interval, dispersion_ratio, study_configs, write_study
from moewm.null_corpora import HELD_OUT_CORPORA, HUMAN_CORPORA, human_texts

log = logging.getLogger("moewm.evaluation.key_validity")
CORPORA = (*HUMAN_CORPORA, *HELD_OUT_CORPORA)
GATE_KEYS = 10  # keys the validity study's gate draws
MIN_KEYS = round(1 / min(LEVELS))  # 1000: each key ranked among 999 others, as a deployed key among the 999 reference keys


def spread_row(p: np.ndarray, level: float) -> dict[str, Any]:
    """Over keys (rows of ``p``, (K, N) p-values of N texts): the shares at p <= ``level`` and their spread."""
    if p.ndim != 2 or p.shape[0] < 2 or p.shape[1] < 1:
        raise ValueError(f"spread_row: need p-values of at least 2 keys on at least 1 text, got shape {p.shape}")
    n = p.shape[1]
    k = (np.nan_to_num(p, nan=1.0) <= level).sum(1)
    lo, hi = binomial_interval(n, level)
    shares = k / n
    return {"level": level, "n": n, "keys": int(p.shape[0]), "mean_share": float(shares.mean()),
            "dispersion_ratio": dispersion_ratio(k, np.full(len(k), n), level),
            "share_median": float(np.median(shares)), "share_q90": float(np.quantile(shares, 0.9)),
            "share_q99": float(np.quantile(shares, 0.99)), "share_max": float(shares.max()),
            "lo": lo, "hi": hi, "keys_above": int((k > hi).sum()), "keys_below": int((k < lo).sum()),
            "inside": ((k >= lo) & (k <= hi)).tolist()}


def gate_pass_chance(rows: list[dict[str, Any]], keys: int = GATE_KEYS) -> float:
    """The chance that ``keys`` keys drawn at random all lie inside their interval in every row of ``rows`` (one
    per level, on the same texts and keys): the share of keys inside them all, to the power ``keys``."""
    inside = np.logical_and.reduce([np.asarray(r["inside"], dtype=bool) for r in rows])
    return float(inside.mean() ** keys)


def scheme_p_values(kind: str, model: Any, tokenizer: Any, configs: tuple, texts: list[list[int]], keys: int, secret: str,
                    cache_dir: str | None) -> tuple[np.ndarray, str]:
    """(K, N) p-values of the texts under K keys, and how they were had (see the module docstring)."""
    from moewm.engine.scoring import leave_one_out_p_values
    from moewm.schemes.registry import build_watermarker

    extractor, encoder, watermark = configs
    prompts = [[] for _ in texts]
    first = WatermarkKey(secret, 0)
    with build_watermarker(kind, model, tokenizer, watermark, first, extractor=extractor, encoder=encoder, cache_dir=cache_dir) as wm:
        if hasattr(wm, "reference_statistics"):
            stats = wm.reference_statistics(wm.capture(texts, prompts))
            return leave_one_out_p_values(torch.from_numpy(stats)).numpy(), f"{stats.shape[0]} reference keys, each ranked among the others"
    rows = []
    for seed in range(keys):
        with build_watermarker(kind, model, tokenizer, watermark, WatermarkKey(secret, seed)) as wm:
            rows.append(np.asarray(wm.detect_ids(texts, prompts).p_value, dtype=float))
    return np.stack(rows), f"{keys} keys, each its own exact test"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from moewm.models.loading import load_model
    from moewm.schemes.registry import resolve_statistic

    torch.manual_seed(0)
    configs = study_configs(args)
    watermark = configs[2]
    corpora = args.corpora.split(",")
    model, tokenizer = load_model(ModelConfig(name=args.model, path=f"builtin:{args.model}"))
    t0 = time.perf_counter()
    texts, origin = [], []
    for name in corpora:
        ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in human_texts(name)]
        ids = [t for t in ids if len(t) >= watermark.min_tokens]  # a shorter text gets no p-value from any detector
        texts += ids
        origin += [name] * len(ids)
    origin_arr = np.array(origin)
    p, how = scheme_p_values(watermark.kind, model, tokenizer, configs, texts, args.keys, args.secret, args.cache_dir)
    log.info("%s: %d texts in %.0f s", how, len(texts), time.perf_counter() - t0)
    rows = []
    for name in ["all", *corpora]:
        sel = p if name == "all" else p[:, origin_arr == name]
        for level in LEVELS:
            rows.append({"origin": name, "held_out": name in HELD_OUT_CORPORA, **spread_row(sel, level)})
    whole = [r for r in rows if r["origin"] == "all"]
    return {"model": args.model, "watermark": dataclasses.asdict(resolve_statistic(watermark)), "design": args.watermark or "{}",
            "keys_how": how, "texts": {c: int((origin_arr == c).sum()) for c in corpora}, "n_texts": len(texts),
            "gate_pass_chance": gate_pass_chance(whole), "rows": rows, "seconds": time.perf_counter() - t0}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Key validity, {result['model']}, design `{result['design']}` ({result['watermark']['kind']}): {result['keys_how']}; "
             f"{result['n_texts']} human texts ({', '.join(f'{k} {v}' for k, v in result['texts'].items())}). "
             f"Chance that {GATE_KEYS} keys all lie inside their 99 % interval on all texts at both levels: "
             f"{result['gate_pass_chance']:.2f}.", "",
             "| origin | level | n | keys | mean share | dispersion ratio | median / 90th / 99th percentile / largest share | "
             "[lo, hi] | keys above (below) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        name = r["origin"] + (" (held out)" if r["held_out"] else "")
        lines.append(f"| {name} | {r['level']:g} | {r['n']} | {r['keys']} | {r['mean_share']:.4f} | {r['dispersion_ratio']:.2f} | "
                     f"{r['share_median']:.4f} / {r['share_q90']:.4f} / {r['share_q99']:.4f} / {r['share_max']:.4f} | "
                     f"[{r['lo']}, {r['hi']}] | {r['keys_above']} ({r['keys_below']}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m moewm.evaluation.key_validity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_moe", choices=STUDY_MODELS)
    parser.add_argument("--watermark", default=None, help="the design, as in python -m moewm.evaluation.validity (default: the shipped design)")
    parser.add_argument("--extractor", default="{}")
    parser.add_argument("--encoder", default="{}")
    parser.add_argument("--reference-keys", type=int, default=MIN_KEYS,
                        help=f"a routing scheme's public keys, each deployed in turn among the others (default and least: {MIN_KEYS}, "
                             "so that each is ranked among 999, as a deployed key is)")
    parser.add_argument("--keys", type=int, default=200, help="keys of an n-gram scheme (synthid, kgw), each scored on every text")
    parser.add_argument("--corpora", default=",".join(CORPORA), help=f"comma-separated human corpora (default: {','.join(CORPORA)})")
    parser.add_argument("--secret", default="key-validity-study-secret", help="the n-gram schemes' keys' secret (a study key, never a real one)")
    parser.add_argument("--cache-dir", default="outputs/cache/reference_keys")
    parser.add_argument("--out", default="outputs/key_validity")
    args = parser.parse_args(argv)
    unknown = [c for c in args.corpora.split(",") if c not in CORPORA]
    if unknown:
        parser.error(f"--corpora: unknown {unknown}; allowed: {', '.join(CORPORA)}")
    if args.keys < 2:
        parser.error(f"--keys={args.keys}: allowed range is >= 2 (a spread over keys)")
    if args.reference_keys < MIN_KEYS:
        parser.error(f"--reference-keys={args.reference_keys}: allowed range is >= {MIN_KEYS} (a key ranked among R - 1 others has "
                     f"p >= 1 / R, which must reach the smallest level, {min(LEVELS):g})")
    try:
        study_configs(args)
    except Exception as err:  # a bad design: named before any weights load
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run(args)
    write_study(result, Path(args.out), "key_validity", markdown(result))
    return result


if __name__ == "__main__":
    main()
