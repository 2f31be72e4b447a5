"""The validity study: are the detectors' p-values valid on text of every origin, key by key?

``python -m moewm.evaluation.validity`` scores >= 1000 unwatermarked texts of up to nine origins (the three
shipped human corpora; the two *held-out* human corpora, which nothing else reads; greedy, top-p and
temperature-1 samples of tiny_moe; text watermarked under *other* keys) under several deployed keys, and
reports per key and origin the share of texts at p <= 0.01 and p <= 1e-3 with the binomial 99 % interval of
the nominal rate, for MoE-LSH (calibrated), its old model-null p (the diagnostic) and the KGW / SynthID exact
tests; per detector, level and origin it reports how many keys lie inside that interval and the dispersion
ratio of the per-key shares (:func:`dispersion_ratio`). Every text is captured once; a routing scheme's deployed keys
are ranked among the same reference keys, scored once for all of them (``score_keys``: each key's own p-values, tested).

The held-out corpora (``moewm.null_corpora.HELD_OUT_CORPORA``) are the study's final gate: on by default
(``--no-held-out`` leaves them out), never a job's null set, never read by a design study.
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
from scipy.stats import binom, chi2

from moewm.config import EncoderConfig, ExtractorConfig, GenerationConfig, ModelConfig, WatermarkConfig
from moewm.engine.keys import WatermarkKey
from moewm.null_corpora import HELD_OUT_CORPORA, HUMAN_CORPORA, human_texts
from moewm.evaluation.nulls import null_generation

log = logging.getLogger("moewm.evaluation.validity")
LEVELS = (0.01, 1e-3)
GENERATED_ORIGINS = ("greedy", "top_p", "temperature_1", "other_keys")


def study_origins(held_out: bool = True, only: list[str] | None = None) -> list[str]:
    """The origins the study scores: every generated origin and shipped corpus, the held-out corpora when
    ``held_out`` (the default), restricted to ``only`` (in the study's order) when given."""
    origins = [*GENERATED_ORIGINS, *HUMAN_CORPORA, *(HELD_OUT_CORPORA if held_out else ())]
    if only is None:
        return origins
    known = [*GENERATED_ORIGINS, *HUMAN_CORPORA, *HELD_OUT_CORPORA]
    unknown = [o for o in only if o not in known]
    if unknown:
        raise ValueError(f"--origins: unknown {unknown}; known origins are {known}")
    excluded = [o for o in only if o not in origins]
    if excluded:
        raise ValueError(f"--origins: {excluded} held out, but --no-held-out leaves the held-out corpora out")
    if not only:
        raise ValueError(f"--origins: empty; known origins are {known}")
    return [o for o in origins if o in only]


def _prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """Prompts: the shipped ones, then the first words of held-out docstrings (text the model never saw)."""
    from moewm.data import BUILTIN_PROMPTS, read_records
    from moewm.engine.generation import encode_prompt

    texts = [r.text for r in read_records(BUILTIN_PROMPTS)]
    texts += [" ".join(t.split()[:8]) for t in human_texts("human_docstrings")]
    return [encode_prompt(tokenizer, t) for t in texts[:count]]


def build_texts(model: Any, tokenizer: Any, prompts: int, new_tokens: int, wm_keys: list[WatermarkKey], cfgs: tuple,
                origins: list[str] | None = None) -> dict[str, tuple[list, list]]:
    """Unwatermarked texts by origin (``origins``, default :func:`study_origins`): (text ids, prompt ids)."""
    from moewm.engine.generation import generate_batched
    from moewm.schemes.registry import build_watermarker

    origins = study_origins() if origins is None else origins
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens // 2, batch_size=32, sampling_seed=99)
    prompt_ids = _prompts(tokenizer, prompts) if any(o in GENERATED_ORIGINS for o in origins) else []
    sets: dict[str, tuple[list, list]] = {}
    for name in origins:
        if name in ("greedy", "top_p"):
            sets[name] = (generate_batched(model, tokenizer, prompt_ids, null_generation(name, gen), []), prompt_ids)
        elif name == "temperature_1":
            sets[name] = (generate_batched(model, tokenizer, prompt_ids, gen, []), prompt_ids)
        elif name == "other_keys":
            extractor, encoder, watermark = cfgs
            other: list[list[int]] = []
            per_key = max(1, prompts // max(1, len(wm_keys)))
            for i, key in enumerate(wm_keys):  # watermarked, but under keys that are never the deployed one
                with build_watermarker(watermark.kind, model, tokenizer, watermark, key, extractor=extractor, encoder=encoder,
                                       cache_dir=None) as wm:
                    other += wm.generate_from_ids(prompt_ids[i * per_key : (i + 1) * per_key], gen)
            sets[name] = (other, prompt_ids[: len(other)])
        else:  # a human corpus, shipped or held out
            ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in human_texts(name)]
            sets[name] = (ids, [[] for _ in ids])
    return {k: ([t for t in v[0] if t], [p for t, p in zip(*v) if t]) for k, v in sets.items()}


def rate_row(p: np.ndarray, level: float) -> dict[str, Any]:
    p = p[np.isfinite(p)]
    n = len(p)
    k = int((p <= level).sum())
    lo, hi = binomial_interval(n, level) if n else (0, 0)
    return {"n": n, "k": k, "rate": k / n if n else float("nan"), "lo": lo, "hi": hi, "inside": bool(lo <= k <= hi)}


def binomial_interval(n: int, level: float) -> tuple[int, int]:
    """The binomial 99 % interval of a key's count of n texts flagged at the nominal rate ``level`` (the gate's)."""
    return int(binom.ppf(0.005, n, level)), int(binom.ppf(0.995, n, level))


def dispersion_ratio(k: Any, n: Any, level: float) -> float:
    """How much wider the per-key shares spread than a binomial at the nominal rate allows.

    ``k[i]`` of ``n[i]`` texts were flagged at p <= ``level`` under key i. Returns the sample standard
    deviation (ddof 1) of the shares ``k / n`` over keys divided by the binomial standard deviation of a
    share at the nominal rate, ``sqrt(level (1 - level) mean(1 / n))`` (``sqrt(level (1 - level) / n)`` when
    every key scored the same n texts). About 1 when each key's count is an independent binomial draw at the
    nominal rate; above 1 when keys differ in their luck on the same texts (a key-by-genre effect); 0 when
    every key flags the same share. NaN for fewer than two keys.
    """
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    if k.shape != n.shape or k.ndim != 1:
        raise ValueError(f"dispersion_ratio: k and n must be 1-d of the same length, got shapes {k.shape} and {n.shape}")
    if not 0 < level < 1:
        raise ValueError(f"dispersion_ratio: level={level!r} must lie in (0, 1)")
    if (n <= 0).any() or (k < 0).any() or (k > n).any():
        raise ValueError(f"dispersion_ratio: need 0 <= k <= n and n >= 1, got k={k.tolist()}, n={n.tolist()}")
    if len(k) < 2:
        return float("nan")
    return float(np.std(k / n, ddof=1) / np.sqrt(level * (1 - level) * np.mean(1 / n)))


def dispersion_p(ratio: float, keys: int) -> float:
    """The chance of a dispersion ratio at least ``ratio`` over ``keys`` keys if every key's count were an
    independent binomial draw at the nominal rate (chi-square with keys - 1 degrees of freedom)."""
    return float(chi2.sf((keys - 1) * ratio**2, keys - 1)) if keys >= 2 and np.isfinite(ratio) else float("nan")


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per detector, level and origin (``all`` included): the keys inside / above the 99 % interval, the
    counts over keys and the dispersion ratio of the shares."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["detector"], r["level"], r["origin"]), []).append(r)
    out = []
    for (det, level, origin), g in groups.items():
        g = sorted(g, key=lambda r: r["key"])
        ratio = dispersion_ratio([r["k"] for r in g], [r["n"] for r in g], level) if all(r["n"] for r in g) else float("nan")
        out.append({"detector": det, "level": level, "origin": origin, "held_out": origin in HELD_OUT_CORPORA,
                    "keys": len(g), "keys_inside": sum(r["inside"] for r in g), "keys_above": sum(r["k"] > r["hi"] for r in g),
                    "n": [r["n"] for r in g], "k": [r["k"] for r in g], "lo": g[0]["lo"], "hi": g[0]["hi"],
                    "dispersion_ratio": ratio, "dispersion_p": dispersion_p(ratio, len(g))})
    return out


STUDY_MODELS = ("tiny_moe", "tiny_olmoe")  # the embedded models the study can load offline


def study_configs(args: argparse.Namespace) -> tuple[ExtractorConfig, EncoderConfig, WatermarkConfig]:
    """The design under study from ``--extractor``, ``--encoder`` and ``--watermark`` (JSON of config fields; nested ones
    such as ``{"kind": "moe_tournament", "tournament": {"block_bits": 8}}`` too), checked before any weights load."""
    from omegaconf import OmegaConf

    from moewm.schemes.registry import check_watermark_config

    extractor = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExtractorConfig), json.loads(args.extractor)))
    encoder = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EncoderConfig), json.loads(args.encoder)))
    design = {} if args.watermark is None else json.loads(args.watermark)
    fields = {"reference_keys": args.reference_keys, "alpha": max(1e-3, 1 / (args.reference_keys + 1)), **design}
    watermark = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(WatermarkConfig), fields))
    if watermark.kind == "none":
        raise ValueError("--watermark kind='none': allowed values are the watermarking schemes moe_tournament, moe_lsh, kgw, synthid "
                         "(none writes no watermark to test)")
    extractor.validate()
    encoder.validate()
    watermark.validate()
    check_watermark_config(watermark, encoder)
    return extractor, encoder, watermark


def run(args: argparse.Namespace) -> dict[str, Any]:
    from moewm.schemes.registry import build_watermarker, resolve_statistic, scheme_class
    from moewm.models.loading import load_model

    torch.manual_seed(0)
    extractor, encoder, watermark = study_configs(args)
    model, tokenizer = load_model(ModelConfig(name=args.model, path=f"builtin:{args.model}"))
    t0 = time.perf_counter()
    origins = study_origins(args.held_out, args.origins.split(",") if args.origins else None)
    texts = build_texts(model, tokenizer, args.prompts, args.new_tokens, [WatermarkKey("validity-other-keys", i) for i in range(4)],
                        (extractor, encoder, watermark), origins)
    all_texts = [t for v in texts.values() for t in v[0]]
    all_prompts = [p for v in texts.values() for p in v[1]]
    origin = np.array([name for name, v in texts.items() for _ in v[0]])
    log.info("%d unwatermarked texts (%s) in %.0f s", len(all_texts), ", ".join(f"{k} {len(v[0])}" for k, v in texts.items()), time.perf_counter() - t0)
    rows: list[dict[str, Any]] = []
    captures = None
    keys = [WatermarkKey(args.secret, seed) for seed in range(args.keys)]
    shared = None  # a scheme ranked among reference keys: every deployed key's p-values at once (score_keys)
    if hasattr(scheme_class(watermark.kind), "score_keys"):
        with build_watermarker(watermark.kind, model, tokenizer, watermark, keys[0], extractor=extractor, encoder=encoder,
                               cache_dir=args.cache_dir) as wm:
            t1 = time.perf_counter()
            captures = wm.capture(all_texts, all_prompts)
            log.info("captured %d texts in %.0f s", len(captures), time.perf_counter() - t1)
            t1 = time.perf_counter()
            shared = wm.score_keys(captures, keys)
            log.info("%d keys scored in %.0f s (the reference keys once for all)", len(keys), time.perf_counter() - t1)
    # The model-null diagnostic reads the deployed key alone: a detector with one reference key gives it (its
    # calibrated p is not used; the shared ranking above is the study's).
    diagnostic = watermark if shared is None else dataclasses.replace(watermark, reference_keys=1, stop_after=1, alpha=0.5)
    for seed, key in enumerate(keys):
        results = {} if shared is None else {watermark.kind: shared[seed]}
        if shared is None or args.model_null:
            with build_watermarker(watermark.kind, model, tokenizer, diagnostic, key, extractor=extractor, encoder=encoder,
                                   cache_dir=args.cache_dir) as wm:
                if captures is None:
                    t1 = time.perf_counter()
                    captures = wm.capture(all_texts, all_prompts)
                    log.info("captured %d texts in %.0f s", len(captures), time.perf_counter() - t1)
                t1 = time.perf_counter()
                out = wm.score(captures)
                log.info("key %d: scored in %.0f s", seed, time.perf_counter() - t1)
            if shared is None:
                results[watermark.kind] = out.p_value
            elif out.p_value_model_null is not None and np.isfinite(np.asarray(out.p_value_model_null, dtype=float)).any():
                results[f"{watermark.kind}_model_null"] = out.p_value_model_null
        if seed < args.baseline_keys:
            for kind in ("kgw", "synthid"):
                if kind == watermark.kind:  # the deployed design is a baseline itself: its own row already scores it
                    continue
                results[kind] = build_watermarker(kind, model, tokenizer, WatermarkConfig(kind=kind), key).detect_ids(all_texts, all_prompts).p_value
        for detector, p in results.items():
            for name in ["all", *texts]:
                sel = p if name == "all" else p[origin == name]
                for level in LEVELS:
                    rows.append({"key": seed, "detector": detector, "origin": name, "level": level, **rate_row(np.asarray(sel), level)})
    return {"texts": {k: len(v[0]) for k, v in texts.items()}, "n_texts": len(all_texts), "reference_keys": args.reference_keys,
            "model": args.model,
            "extractor": dataclasses.asdict(extractor), "encoder": dataclasses.asdict(encoder), "watermark": dataclasses.asdict(resolve_statistic(watermark)),
            "held_out": [o for o in texts if o in HELD_OUT_CORPORA],
            "keys": args.keys, "rows": rows, "summary": summarize(rows), "seconds": time.perf_counter() - t0}


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
    lines += ["", "Per origin: keys whose count lies inside the binomial 99 % interval [lo, hi] of the nominal rate (above it), "
              "the counts over keys, and the dispersion ratio (sd of the per-key shares / binomial sd at the nominal rate; "
              "about 1 for independent binomial draws; p: chance of a ratio this large if they were).", "",
              "| detector | level | origin | n | keys inside (above) | [lo, hi] | counts over keys | dispersion ratio (p) |",
              "|---|---|---|---|---|---|---|---|"]
    for s in result.get("summary") or summarize(result["rows"]):
        n = s["n"][0] if len(set(s["n"])) == 1 else f"{min(s['n'])}-{max(s['n'])}"
        name = s["origin"] + (" (held out)" if s["held_out"] else "")
        lines.append(f"| {s['detector']} | {s['level']:g} | {name} | {n} | {s['keys_inside']}/{s['keys']} ({s['keys_above']}) | "
                     f"[{s['lo']}, {s['hi']}] | {', '.join(map(str, s['k']))} | {s['dispersion_ratio']:.2f} ({s['dispersion_p']:.2g}) |")
    return "\n".join(lines)


def write_study(result: dict[str, Any], out: Path, stem: str, table: str) -> None:
    """A study's result as ``out/stem.json`` and its table as ``out/stem.md``; the table and the path printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(table + "\n")
    print(table)
    print(f"-> {out / f'{stem}.json'} ({result['seconds']:.0f} s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moewm.evaluation.validity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10, help="deployed keys to test (default 10)")
    parser.add_argument("--baseline-keys", type=int, default=3, help="keys for which KGW and SynthID are tested too")
    parser.add_argument("--prompts", type=int, default=256, help="prompts for the generated sets")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--reference-keys", type=int, default=999)
    parser.add_argument("--extractor", default="{}", help='extractor fields as JSON, e.g. \'{"use_top_k": true, "k": 1}\' (default: the defaults)')
    parser.add_argument("--encoder", default="{}", help='encoder fields as JSON, e.g. \'{"pools": "anchors"}\' (default: the defaults)')
    parser.add_argument("--watermark", default=None,
                        help='the deployed design: watermark fields as JSON over WatermarkConfig\'s defaults, any scheme, e.g. '
                             '\'{"kind": "synthid", "synthid": {"ngram_len": 3}}\', \'{"tournament": {"routing_layers": 0}}\' '
                             '(default: {}, the shipped design)')
    parser.add_argument("--model", default="tiny_moe", choices=STUDY_MODELS, help="the embedded model that writes and scores (default tiny_moe)")
    parser.add_argument("--secret", default="validity-study-secret", help="the deployed keys' secret (a study key, never a real one)")
    parser.add_argument("--held-out", action=argparse.BooleanOptionalAction, default=True,
                        help=f"score the held-out human corpora too ({', '.join(HELD_OUT_CORPORA)}; default: yes)")
    parser.add_argument("--origins", default=None,
                        help="comma-separated origins to score, e.g. 'jargon_file,crawl_lore' (default: all of them; "
                             "the generated ones need --prompts)")
    parser.add_argument("--model-null", action=argparse.BooleanOptionalAction, default=True,
                        help="also report a routing scheme's model-null p (a diagnostic of the deployed key alone, about half the "
                             "scoring time; --no-model-null: the calibrated detector only, the gate's verdict)")
    parser.add_argument("--cache-dir", default="outputs/cache/reference_keys")
    parser.add_argument("--out", default="outputs/validity")
    args = parser.parse_args(argv)
    try:
        study_origins(args.held_out, args.origins.split(",") if args.origins else None)
        study_configs(args)
    except Exception as err:  # a bad origin or design: named before any weights load
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = run(args)
    write_study(result, Path(args.out), "validity", markdown(result))


if __name__ == "__main__":
    main()
