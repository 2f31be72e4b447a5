"""The benchmark's ``schemes`` section: every scheme of the registry against plain sampling and one forward.

For each ``watermark.kind`` of :data:`moewm.schemes.registry.SCHEMES` (the routing tournament as shipped, built
from ``WatermarkConfig()`` (the shipped design); MoE-LSH with the run's encoder; KGW, SynthID and the ``none``
control with their defaults), on one loaded model and the same seeded prompts:

* generation: the scheme's :meth:`generate_from_ids` with and without its watermark (pure sampling at
  temperature 1, ``min_new_tokens = max_new_tokens``, the same sampling seed), interleaved in rotated rounds,
  the routing hooks on only for the watermarked run; the ratio is the median of the per-round ratios;
* detection: ``detect_ids`` over the texts just sampled, half with the watermark and half plain (the routing
  schemes' calibrated detection, reference bank loaded before timing; ``detect_ids`` of the others), against
  one full-logits forward over the same padded batches.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from moewm.bench.harness import compare, forward_batches_fn, mean_of, ratio
from moewm.config import GenerationConfig, WatermarkConfig
from moewm.schemes.registry import build_watermarker, scheme_kinds

# Which schemes read the routing (their detection is calibrated among reference keys).
ROUTING_SCHEMES = ("moe_tournament", "moe_lsh", "none")


def scheme_config(kind: str, bench: Any) -> WatermarkConfig:  # bench: moewm.bench.sections.Bench
    """The configuration a scheme is measured with: the shipped design for the tournament, the run's MoE-LSH
    settings for ``moe_lsh`` and ``none``, the defaults otherwise; reference keys and alpha from the run."""
    refs = bench.wm.watermark_cfg.reference_keys
    alpha = max(WatermarkConfig.alpha, 1.0 / (refs + 1))
    if kind == "moe_tournament":
        cfg = WatermarkConfig()  # the shipped design
    elif kind in ("moe_lsh", "none"):
        cfg = WatermarkConfig(**{k: v for k, v in vars(bench.wm.watermark_cfg).items()})
        cfg.kind = kind
    else:
        cfg = WatermarkConfig(kind=kind)
    cfg.reference_keys, cfg.alpha, cfg.stop_after = refs, alpha, bench.wm.watermark_cfg.stop_after
    return cfg


def _hooks(wm: Any) -> Any:
    """The routing hooks of a scheme (None for the n-gram schemes); ``none`` wraps a MoE-LSH detector."""
    inner = getattr(wm, "inner", wm)
    return getattr(inner, "capture_hooks", None)


def scheme_row(bench: Any, kind: str) -> dict[str, Any]:
    """Generation and detection cost of one scheme (see the module docstring)."""
    a = bench.args
    cfg = scheme_config(kind, bench)
    t0 = time.perf_counter()
    wm = build_watermarker(kind, bench.model, bench.tokenizer, cfg, bench.wm.key, extractor=bench.wm.extractor_cfg,
                           encoder=bench.wm.encoder_cfg, cache_dir=bench.cache_dir)
    hooks = _hooks(wm)
    if hooks is not None:
        hooks.detach()
    build_s = time.perf_counter() - t0
    prompts = bench.inputs.rows(a.scheme_batch, a.prompt_len, salt=7)
    gen = GenerationConfig(max_new_tokens=a.scheme_new_tokens, min_new_tokens=a.scheme_new_tokens, do_sample=True, temperature=1.0,
                           top_k=0, top_p=1.0, batch_size=a.scheme_batch)
    outputs: dict[str, list[list[int]]] = {}

    def generation(marked: bool) -> Callable[[], Any]:
        def run() -> Any:
            if marked and hooks is not None:
                hooks.attach()
            try:
                outputs["watermarked" if marked else "plain"] = wm.generate_from_ids(prompts, gen, watermark=marked)
            finally:
                if hooks is not None:
                    hooks.detach()

        return run

    try:
        t = compare({"plain": generation(False), "watermarked": generation(True)}, a.repeats, a.warmup, bench.device)
        half = max(1, len(prompts) // 2)
        texts = outputs["watermarked"][:half] + outputs["plain"][half:]
        contexts = [list(p) for p in prompts]
        rows = [p + list(x) for p, x in zip(contexts, texts)]
        batch_size = wm.watermark_cfg.detect_batch_size
        forward, batches = forward_batches_fn(bench.model, rows, bench.pad, batch_size, wm.watermark_cfg.detect_max_tokens)
        inner = getattr(wm, "inner", wm)
        if hasattr(inner, "reference_tables"):
            inner.reference_tables()  # built (or loaded) before anything is timed
        keep: list[Any] = []

        def detect() -> Any:
            try:
                keep[:] = [wm.detect_ids(texts, contexts)]
            finally:
                if hooks is not None:
                    hooks.detach()

        d = compare({"detect": detect, "forward_full_logits": forward}, a.repeats, a.warmup, bench.device)
    finally:
        wm.close()
    out = keep[0]
    marked = np.arange(len(texts)) < half
    keys = np.asarray(out.num_reference_keys)
    return {
        "kind": kind,
        "statistic": wm.watermark_cfg.statistic if kind in ROUTING_SCHEMES else kind,  # resolved by the scheme
        "routing": kind in ROUTING_SCHEMES,
        "build_s": build_s,
        "generation_timings": t,
        "ratio_generation_over_plain": ratio(t, "watermarked", "plain"),
        "detection_timings": d,
        "ratio_detect_over_forward_full_logits": ratio(d, "detect", "forward_full_logits"),
        "forward_batches": batches,
        "mean_keys_watermarked": mean_of(keys[marked]),
        "mean_keys_unwatermarked": mean_of(keys[~marked]),
        "detected_share_watermarked": mean_of(np.asarray(out.prediction)[marked]),
        "false_positive_share_unwatermarked": mean_of(np.asarray(out.prediction)[~marked]),
    }


def schemes_section(bench: Any) -> dict[str, Any]:
    a = bench.args
    kinds = ["moe_tournament"] + [k for k in scheme_kinds() if k != "moe_tournament"]  # the shipped design first
    wanted = [k.strip() for k in getattr(a, "schemes", "").split(",") if k.strip()]
    unknown = set(wanted) - set(kinds)
    if unknown:
        raise SystemExit(f"--schemes: unknown kinds {sorted(unknown)}; allowed: {', '.join(kinds)}")
    kinds = [k for k in kinds if not wanted or k in wanted]
    rows = [scheme_row(bench, kind) for kind in kinds]
    return {"batch_size": a.scheme_batch, "prompt_len": a.prompt_len, "new_tokens": a.scheme_new_tokens,
            "reference_keys": bench.wm.watermark_cfg.reference_keys, "threads": torch.get_num_threads(), "rows": rows}


def schemes_markdown(sec: dict[str, Any]) -> list[str]:
    lines = [
        f"### Every scheme (batch {sec['batch_size']}, prompt {sec['prompt_len']}, {sec['new_tokens']} new tokens, sampling at "
        f"temperature 1; detection of those texts, half watermarked, R={sec['reference_keys']} for the routing schemes)",
        "",
        "| scheme | statistic | generation / plain | detect_ids / full-logits forward | keys / watermarked text | detected (watermarked / plain) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in sec["rows"]:
        keys = f"{r['mean_keys_watermarked']:.0f}" if r["routing"] else "-"
        lines.append(f"| {r['kind']} | {r['statistic']} | **{r['ratio_generation_over_plain']:.3f}** | **{r['ratio_detect_over_forward_full_logits']:.2f}** | "
                     f"{keys} | {100 * r['detected_share_watermarked']:.0f} % / {100 * r['false_positive_share_unwatermarked']:.0f} % |")
    return lines + [""]
