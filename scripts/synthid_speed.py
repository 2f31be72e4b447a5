"""SynthID generation time: moewm's processor (moewm/schemes/synthid_fast.py) against transformers' and plain sampling.

    OMP_NUM_THREADS=1 python scripts/synthid_speed.py --model tiny_moe --prompts 64 --new-tokens 64 --batch 64 --rounds 3

One thread; the shipped prompts (first 48 tokens); sampling at temperature 1 with ``min_new_tokens = max_new_tokens``;
the watermark of ``watermark=synthid`` (ngram_len 5, 20 layers). One untimed warm-up, then the three methods
interleaved within each round in rotated order. Times are medians over rounds; a ratio is the median of the
per-round ratios, so a change of machine speed between rounds cancels. Every round also checks that the two
SynthID paths generated the same ids. Prints a markdown table and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from moewm.config import DataConfig, GenerationConfig, ModelConfig, WatermarkConfig
from moewm.data import load_prompts
from moewm.engine.generation import generate_batched
from moewm.engine.keys import WatermarkKey
from moewm.models.loading import load_model
from moewm.schemes.synthid import SynthIDWatermark


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny_moe", help="builtin model name (builtin:<name>)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="synthid_speed.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(ModelConfig(name=args.model, path=f"builtin:{args.model}"))
    wm = SynthIDWatermark(model, tokenizer, WatermarkConfig(kind="synthid"), WatermarkKey("synthid-speed", 0))
    prompts = [wm.encode_prompt(p)[:48] for p in load_prompts(DataConfig(num_prompts=args.prompts))]
    generation = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, batch_size=args.batch)
    reference = {"watermarking_config": wm.transformers_config}

    def run(method: str, ids: list[list[int]], gen: GenerationConfig) -> list[list[int]]:
        if method == "plain":
            return wm.generate_from_ids(ids, gen, watermark=False)
        if method == "moewm":
            return wm.generate_from_ids(ids, gen)
        return generate_batched(model, tokenizer, ids, gen, [], extra_generate_kwargs=reference)

    methods = ["plain", "moewm", "transformers"]
    warm = GenerationConfig(max_new_tokens=4, min_new_tokens=4, batch_size=args.batch)
    for m in methods:
        run(m, prompts[:4], warm)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.rounds):
        out = {}
        for m in methods[r % 3:] + methods[: r % 3]:
            t = time.perf_counter()
            out[m] = run(m, prompts, generation)
            times[m].append(time.perf_counter() - t)
        assert out["moewm"] == out["transformers"], "the two SynthID paths generated different ids"
        print(f"round {r}: " + ", ".join(f"{m} {times[m][-1]:.1f} s" for m in methods), flush=True)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    result = {
        "command": "OMP_NUM_THREADS=1 python scripts/synthid_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model, "prompts": args.prompts, "new_tokens": args.new_tokens, "batch": args.batch,
        "rounds": args.rounds, "threads": args.threads, "torch": torch.__version__,
        "median_s": {m: statistics.median(times[m]) for m in methods}, "times_s": times,
        "ratio_moewm_over_plain": ratio("moewm", "plain"), "ratio_transformers_over_plain": ratio("transformers", "plain"),
        "ratio_transformers_over_moewm": ratio("transformers", "moewm"),
        "ratios_per_round": {"moewm_over_plain": [m / p for m, p in zip(times["moewm"], times["plain"])],
                             "transformers_over_plain": [t / p for t, p in zip(times["transformers"], times["plain"])]},
        "same_ids_every_round": True,  # asserted above
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| generation | median time | / plain |")
    print("|---|---:|---:|")
    print(f"| plain sampling | {result['median_s']['plain']:.1f} s | 1 |")
    print(f"| SynthID, moewm's processor | {result['median_s']['moewm']:.1f} s | {result['ratio_moewm_over_plain']:.2f} |")
    print(f"| SynthID, transformers' processor | {result['median_s']['transformers']:.1f} s | {result['ratio_transformers_over_plain']:.2f} |")
    print(f"transformers / moewm: {result['ratio_transformers_over_moewm']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
