"""Power and perplexity cost of encoder designs on tiny_moe, at a valid false-positive rate.

For each design (a JSON object of encoder fields, plus optional "delta" and "ignore_repeated"), several keys each watermark the
same prompts; every text is scored with the calibrated detector (R public reference keys, Besag-Clifford
stop). Printed per design: the share of texts at p <= alpha, the spread of that share over keys, and the
mean perplexity of the watermarked texts under tiny_moe (the generator itself: a first look at quality,
not an oracle judgement). Plain (unwatermarked) perplexity is printed once for comparison.

    python scripts/design_power.py --keys 4 --prompts 64 --tokens 64 \\
        '{"pools": "anchors"}' '{"pools": "partition", "green_lists": "hashed", "num_bits": 128}'
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from moewm import ModelConfig, load_model
from moewm.config import EncoderConfig, ExtractorConfig, GenerationConfig, WatermarkConfig
from moewm.engine.keys import WatermarkKey
from moewm.schemes.moe_lsh import MoELSHWatermark


def perplexity(captures) -> float:
    logprob = torch.cat([c.logprob for c in captures])
    return math.exp(-float(logprob.mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("designs", nargs="+", help="JSON objects of encoder fields (and optionally delta)")
    parser.add_argument("--keys", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_model(ModelConfig())
    prompts = open("conf/data/prompts.txt").read().splitlines()[: args.prompts]
    gen = GenerationConfig(max_new_tokens=args.tokens, min_new_tokens=args.tokens, batch_size=32)
    plain_ppl = None
    for text in args.designs:
        fields = json.loads(text)
        delta = float(fields.pop("delta", 2.0))
        ignore_repeated = bool(fields.pop("ignore_repeated", WatermarkConfig.ignore_repeated))
        encoder = EncoderConfig(**fields)
        rates, ppl = [], []
        t0 = time.perf_counter()
        for seed in range(args.keys):
            key = WatermarkKey("design-power-study", seed)
            with MoELSHWatermark(model, tokenizer, ExtractorConfig(), encoder, WatermarkConfig(delta=delta, ignore_repeated=ignore_repeated), key) as wm:
                prompt_ids, ids = wm.generate_ids(prompts, gen)
                captures = wm.capture(ids, prompt_ids)
                out = wm.score(captures)
                if plain_ppl is None:
                    _, plain = wm.generate_ids(prompts, gen, watermark=False)
                    plain_ppl = perplexity(wm.capture(plain, prompt_ids))
                    print(f"plain perplexity {plain_ppl:.1f}")
            rates.append(float(np.mean(np.nan_to_num(out.p_value, nan=1.0) <= args.alpha)))
            ppl.append(perplexity(captures))
        print(f"{json.dumps({**fields, 'delta': delta, 'ignore_repeated': ignore_repeated})}: detected at p <= {args.alpha:g}: mean {np.mean(rates):.3f} "
              f"(keys {min(rates):.3f}-{max(rates):.3f}); perplexity {np.mean(ppl):.1f} (keys {min(ppl):.1f}-{max(ppl):.1f}); "
              f"{time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
