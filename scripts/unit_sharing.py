"""How much of a fixed key's evidence repeats across the texts of one genre: the mechanism behind per-key validity.

A keyed detector scores units (MoE-LSH: (signature, token); the routing tournament: (layer, context code, token);
KGW: (previous token, token); SynthID: (four tokens before, token)), each unit once per text. Under one fixed key every unit has one fixed pseudo-random
value, so when texts of a genre share units their statistics move together: the key's false-positive share on the
genre is a draw over few independent values, not over many texts. The variance inflation of a genre's summed
statistic across keys is ``sum_u c_u^2 / sum_u c_u`` (``c_u``: texts holding unit u); 1 means no unit is shared.
The per-key dispersion ratio of the validity study grows with it.

    python scripts/unit_sharing.py --model tiny_moe --prompts 64 --new-tokens 64 --out unit_sharing.md

Texts are the validity study's own (:func:`moewm.evaluation.validity.build_texts`, same seeds), minus the
``other_keys`` set; units are read under one deployed key (the study secret, seed 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch

from moewm.config import EncoderConfig, ExtractorConfig, ModelConfig, TournamentConfig, WatermarkConfig
from moewm.engine.keys import WatermarkKey

log = logging.getLogger("unit_sharing")
ORIGINS = ("greedy", "top_p", "temperature_1", "human_docstrings", "devils_dictionary", "kjv_narrative", "jargon_file", "crawl_lore")


@dataclass(frozen=True)
class Design:
    name: str
    kind: str  # moe_lsh | moe_tournament | ngram (KGW / SynthID units: the context_tokens before, and the token)
    block_bits: int = 8
    skip_repeated: bool = True
    context_tokens: int = 0


DESIGNS = (
    Design("moe_lsh default (signature, token)", "moe_lsh"),
    Design("tournament b4 (no skip)", "moe_tournament", 4, False),
    Design("tournament b8", "moe_tournament", 8, True),
    Design("tournament b8 + previous token", "moe_tournament", 8, True, 1),
    Design("tournament b4 + previous token", "moe_tournament", 4, True, 1),
    Design("tournament b8 + two tokens before", "moe_tournament", 8, True, 2),
    Design("KGW h=1 (previous token, token)", "ngram", context_tokens=1),
    Design("token 3-gram (two tokens, token)", "ngram", context_tokens=2),
    Design("SynthID 5-gram (four tokens, token)", "ngram", context_tokens=4),
)


def sharing(units: list[np.ndarray]) -> dict[str, float]:
    """Per-text unique unit ids -> the mean correlation of two texts' summed statistics under one key
    (|U_s & U_t| / sqrt(|U_s| |U_t|) over pairs, unit values independent with equal variance), the design effect
    1 + (N - 1) rho of the genre's mean statistic across keys, sum c^2 / sum c, the share of a text's units
    found in another text (mean over texts), and the units per text."""
    units = [u for u in units if len(u)]
    lengths = np.array([len(u) for u in units])
    if len(units) < 2:
        return {"rho": float("nan"), "design_effect": float("nan"), "vif": float("nan"), "shared": float("nan"), "units_per_text": 0.0}
    flat = np.concatenate(units)
    _, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    shared = counts[inverse] >= 2
    per_text = np.add.reduceat(shared, np.r_[0, np.cumsum(lengths)[:-1]]) / lengths
    w = np.repeat(1 / np.sqrt(lengths), lengths)  # each occurrence weighted by its text's 1 / sqrt(size)
    s1 = np.bincount(inverse, weights=w)
    s2 = np.bincount(inverse, weights=w * w)
    n = len(units)
    rho = float((s1 * s1 - s2).sum() / (n * (n - 1)))
    return {"rho": rho, "design_effect": 1 + (n - 1) * rho, "vif": float((counts.astype(float) ** 2).sum() / counts.sum()),
            "shared": float(per_text.mean()), "units_per_text": float(lengths.mean())}


def tournament_units(wm: Any, captures: list, batch_size: int = 64) -> list[np.ndarray]:
    from moewm.engine.scoring import CaptureBatch

    out = []
    m = wm.scorer.layers
    for s in range(0, len(captures), batch_size):
        chunk = captures[s : s + batch_size]
        batch = CaptureBatch.stack(chunk, wm.device)
        codes = wm.scorer.contexts(batch, wm._true_tables)[0]
        scored = wm.scorer.scored_units(batch, codes)[0]  # (B, n, m)
        unit = (codes[0] * wm.vocab_size + batch.tokens.unsqueeze(-1)) * m + torch.arange(m, device=codes.device)
        for i in range(len(chunk)):
            out.append(np.unique(unit[i][scored[i]].cpu().numpy()))
    return out


def signature_units(wm: Any, captures: list, batch_size: int = 64) -> list[np.ndarray]:
    from moewm.engine.scoring import CaptureBatch, signatures

    out = []
    for s in range(0, len(captures), batch_size):
        chunk = captures[s : s + batch_size]
        batch = CaptureBatch.stack(chunk, wm.device)
        bits = signatures(batch.features, wm._true_tables.bank)[0].long()  # (B, n, nb)
        word = (bits[..., :32] << torch.arange(min(32, bits.shape[-1]), device=bits.device)).sum(-1)
        unit = word * wm.vocab_size + batch.tokens
        for i in range(len(chunk)):
            out.append(np.unique(unit[i][batch.valid[i]].cpu().numpy()))
    return out


def ngram_units(texts: list[list[int]], prompts: list[list[int]], context: int) -> list[np.ndarray]:
    """Per text the distinct (``context`` tokens before, token) n-grams ending on a generated token (hashed to int64)."""
    out = []
    for t, p in zip(texts, prompts):
        ids = np.asarray(list(p[-context:] if p else []) + list(t), dtype=np.int64)
        if len(ids) <= context:
            out.append(np.zeros(0, np.int64))
            continue
        grams = np.lib.stride_tricks.sliding_window_view(ids, context + 1)
        out.append(np.unique(pd.util.hash_array(np.ascontiguousarray(grams).view(f"V{8 * (context + 1)}").ravel()).astype(np.int64)))
    return out


def run(args: argparse.Namespace) -> pd.DataFrame:
    from moewm.evaluation.validity import build_texts
    from moewm.models.loading import load_model
    from moewm.schemes.registry import build_watermarker

    torch.manual_seed(0)
    model, tokenizer = load_model(ModelConfig(name=args.model, path=f"builtin:{args.model}"))
    cfgs = (ExtractorConfig(), EncoderConfig(), WatermarkConfig())
    origins = [o for o in ORIGINS if o in args.origins.split(",")] if args.origins else list(ORIGINS)
    t0 = time.perf_counter()
    texts = build_texts(model, tokenizer, args.prompts, args.new_tokens, [], cfgs, origins)
    log.info("%d texts in %.0f s", sum(len(v[0]) for v in texts.values()), time.perf_counter() - t0)
    key = WatermarkKey(args.secret, args.seed)
    captures: Optional[dict] = None
    rows = []
    for design in DESIGNS:
        if design.kind == "ngram":
            units = {o: ngram_units(*texts[o], design.context_tokens) for o in texts}
        else:
            watermark = WatermarkConfig(kind=design.kind, ignore_repeated=True,  # each scheme's own statistic
                                        tournament=TournamentConfig(layers=20, block_bits=design.block_bits, skip_repeated=design.skip_repeated,
                                                                    context_tokens=design.context_tokens))
            encoder = EncoderConfig()
            with build_watermarker(design.kind, model, tokenizer, watermark, key, extractor=cfgs[0], encoder=encoder, cache_dir=None) as wm:
                if captures is None:  # the capture is key-free and design-free: once for all designs
                    t1 = time.perf_counter()
                    captures = {o: wm.capture(*texts[o]) for o in texts}
                    log.info("captured in %.0f s", time.perf_counter() - t1)
                read = tournament_units if design.kind == "moe_tournament" else signature_units
                units = {o: read(wm, captures[o]) for o in texts}
        for origin, u in units.items():
            rows.append({"design": design.name, "origin": origin, "texts": len(u), **sharing(u)})
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    rho = df.pivot(index="design", columns="origin", values="rho")
    effect = df.pivot(index="design", columns="origin", values="design_effect")
    cols = [o for o in ORIGINS if o in rho.columns]
    order = [d.name for d in DESIGNS if d.name in rho.index]
    lines = ["| design | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for d in order:
        lines.append(f"| {d} | " + " | ".join(f"{rho.loc[d, c]:.4f} ({effect.loc[d, c]:.1f})" for c in cols) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny_moe", choices=("tiny_moe", "tiny_olmoe"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--origins", default="", help="comma-separated subset of " + ",".join(ORIGINS))
    parser.add_argument("--secret", default="validity-study", help="a study key, never a real one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="write the table (markdown) and rows (json) here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    df = run(args)
    text = ("Mean correlation of two texts' statistics under one fixed key, from the units they share (in brackets: the "
            "design effect 1 + (N - 1) rho of the genre's mean statistic across keys), one key.\n\n" + markdown(df))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(df.to_dict(orient="records"), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
