"""Why a routing design's keys spread more than its twin's: a key's count of scored units.

Under ``watermark.tournament.skip_repeated`` a layer context is scored once per text, and with routing in the context
how often contexts repeat depends on the key's hyperplanes, so on the same text one key scores a few more (layer,
position) units than another. The shipped statistic (``green``) is the raw count of g = 1 over the scored units, ranked
among the reference keys: a key that scores more units ranks higher on every text. This script measures, over R
reference keys of the shipped design on human text, the correlation between a key's mean count of scored units and its
share of texts at p <= 0.01, and the keys' spread (dispersion ratio, keys above and below their interval) with the
count as it is and centred by its units ((count - units / 2) / sqrt(units / 4)), each key ranked among the others
(:func:`moewm.engine.scoring.leave_one_out_p_values`).

    python scripts/key_validity_units.py [--model tiny_moe] [--keys 300] [--corpora devils_dictionary,human_docstrings,kjv_narrative]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from moewm import ModelConfig, WatermarkConfig, WatermarkKey, build_watermarker, load_model
from moewm.engine.lsh import mix32_int32_
from moewm.engine.scoring import CaptureBatch, leave_one_out_p_values
from moewm.engine.tournament import REPEAT_TABLE_BITS, first_slots
from moewm.evaluation.key_validity import CORPORA, spread_row
from moewm.null_corpora import human_texts

LEVEL = 0.01


def counts_and_units(wm, captures, keys: int, block: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, N) each reference key's green count and its scored units on each text (the shipped design's scorer)."""
    ref = wm.reference_tables()
    counts, units = [], []
    for s in range(0, len(captures), 32):
        batch = CaptureBatch.stack(captures[s : s + 32])
        c_parts, u_parts = [], []
        for a in range(0, keys, block):
            tables = ref.select(a, min(keys, a + block))
            c_parts.append(wm.scorer.draws(batch, tables).green.sum(-1))
            codes, _ = wm.scorer.contexts32(batch, tables)  # (r, B, m, n): the units, as the scorer forms them
            r, b, m, n = codes.shape
            scored = batch.valid.view(1, b, 1, n).expand(r, b, m, n)
            slots = mix32_int32_(codes).bitwise_and_((1 << REPEAT_TABLE_BITS) - 1)
            scored = first_slots(slots.reshape(-1, n), scored.reshape(-1, n), REPEAT_TABLE_BITS).view(r, b, m, n)
            u_parts.append(scored.sum((-2, -1)).double())
        counts.append(torch.cat(c_parts))
        units.append(torch.cat(u_parts))
    return torch.cat(counts, 1), torch.cat(units, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_moe", choices=("tiny_moe", "tiny_olmoe"))
    parser.add_argument("--keys", type=int, default=300)
    parser.add_argument("--corpora", default="devils_dictionary,human_docstrings,kjv_narrative")
    args = parser.parse_args()
    corpora = args.corpora.split(",")
    unknown = [c for c in corpora if c not in CORPORA]
    if unknown:
        parser.error(f"--corpora: unknown {unknown}; allowed: {', '.join(CORPORA)}")
    if args.keys < round(1 / LEVEL):
        parser.error(f"--keys={args.keys}: allowed range is >= {round(1 / LEVEL)} (a key's p-value among the others must reach {LEVEL})")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, tok = load_model(ModelConfig(name=args.model, path=f"builtin:{args.model}"))
    texts = [list(tok(t, add_special_tokens=False)["input_ids"]) for c in corpora for t in human_texts(c)]
    cfg = WatermarkConfig(reference_keys=args.keys, alpha=LEVEL)  # the shipped design
    with build_watermarker(cfg.kind, model, tok, cfg, WatermarkKey("key-validity-units")) as wm:
        count, unit = counts_and_units(wm, wm.capture(texts, [[] for _ in texts]), args.keys)
    mean_units = unit.mean(1).numpy()
    print(f"{args.model}, shipped design, {args.keys} reference keys, {len(texts)} texts ({', '.join(corpora)}); "
          f"a key's mean scored units: {mean_units.min():.1f} - {np.median(mean_units):.1f} - {mean_units.max():.1f} (min, median, max)")
    for name, stat in (("green count (shipped)", count), ("centred by its units", (count - unit / 2) / (unit / 4).sqrt())):
        p = leave_one_out_p_values(stat).numpy()
        row = spread_row(p, LEVEL)
        share = (p <= LEVEL).mean(1)
        print(f"{name}: dispersion {row['dispersion_ratio']:.2f}, keys above {row['keys_above']} / below {row['keys_below']} "
              f"their 99 % interval, correlation of a key's mean units with its share at p <= {LEVEL}: "
              f"{np.corrcoef(mean_units, share)[0, 1]:+.2f}")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
