"""Engine check on the random micro qwen2_moe: z of watermarked vs unwatermarked text, and the time of
batched one-pass detection against the token-by-token reference on the same texts (one run, one process).

    python scripts/engine_check.py [--prompts 16] [--tokens 96]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from moewm.config import EncoderConfig, ExtractorConfig, GenerationConfig, WatermarkConfig
from moewm.engine.keys import WatermarkKey
from moewm.bench.reference_detector import reference_detect
from moewm.models.micro import byte_tokenizer, micro_model
from moewm.schemes.moe_lsh import MoELSHWatermark

PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning there was", "import numpy as np",
           "Dear committee members,", "The results show that", "def main():", "It was a dark and stormy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = micro_model("qwen2_moe"), byte_tokenizer()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    gen = GenerationConfig(max_new_tokens=args.tokens, min_new_tokens=args.tokens, batch_size=16)
    with MoELSHWatermark(model, tokenizer, ExtractorConfig(), EncoderConfig(num_bits=16, pool_size=8),
                         WatermarkConfig(delta=2.0, capture_top_k=256), WatermarkKey("engine-check", 0)) as wm:
        prompt_ids, wm_ids = wm.generate_ids(prompts, gen)
        _, plain_ids = wm.generate_ids(prompts, gen, watermark=False)
        wm.detect_ids(wm_ids[:2], prompt_ids[:2])  # warm-up
        t0 = time.perf_counter()
        marked = wm.detect_ids(wm_ids, prompt_ids)
        plain = wm.detect_ids(plain_ids, prompt_ids)
        batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = [reference_detect(wm, t, p)["z_score"] for t, p in zip(wm_ids + plain_ids, prompt_ids + prompt_ids)]
        reference = time.perf_counter() - t0
    both = np.r_[marked.z_score, plain.z_score]
    print(json.dumps({
        "texts": 2 * len(prompts), "new_tokens": args.tokens, "delta": 2.0, "num_bits": 16, "pool_size": 8,
        "z_wm_mean": float(marked.z_score.mean()), "z_wm_std": float(marked.z_score.std(ddof=1)),
        "z_unwm_mean": float(plain.z_score.mean()), "z_unwm_std": float(plain.z_score.std(ddof=1)),
        "batched_detect_s": round(batched, 4), "reference_detect_s": round(reference, 3),
        "speedup": round(reference / batched, 1), "max_abs_z_diff_vs_reference": float(np.max(np.abs(both - np.array(ref)))),
    }, indent=2))


if __name__ == "__main__":
    main()
