"""How the two nulls judge unwatermarked text from different decodings, on tiny_moe.

The model null (``watermark.null=model``) is exact for text sampled from the model at temperature 1.
This script measures how far it (and the uniform null) drift for greedy text, for a few keys, on
seeded random-token prompts (the benchmark's inputs):

    python scripts/null_decoding_check.py --keys 3 --prompts 24 --new-tokens 128
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from moewm.bench import BENCH_SECRET, Inputs, generate_fn
from moewm.config import EncoderConfig, ExtractorConfig, ModelConfig, WatermarkConfig
from moewm.keys import WatermarkKey
from moewm.models import load_model
from moewm.watermark import MoELSHWatermark


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=3, help="key 0 is the benchmark's public key, the others seeds 1..")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args(argv)
    model, tokenizer = load_model(ModelConfig(dtype="float32", device="cpu"))
    print("| key | null | ignore_repeated | greedy z (mean ± std) | sampled z (mean ± std) |")
    print("|---|---|---|---|---|")
    for k in range(args.keys):
        key = WatermarkKey(BENCH_SECRET, 0) if k == 0 else WatermarkKey(BENCH_SECRET, k)
        wm = MoELSHWatermark(model, tokenizer, ExtractorConfig(), EncoderConfig(), WatermarkConfig(), key)
        wm.close()
        prompts = Inputs(tokenizer, wm.vocab_size).rows(args.prompts, args.prompt_len, salt=1)
        w = args.prompt_len
        greedy = generate_fn(model, tokenizer, prompts, args.new_tokens)()[:, w:].tolist()
        torch.manual_seed(k)
        sampled = generate_fn(model, tokenizer, prompts, args.new_tokens, sample=True)()[:, w:].tolist()
        for null in ("model", "uniform"):
            for ignore in (False, True):
                wm.watermark_cfg.null, wm.watermark_cfg.ignore_repeated = null, ignore
                zg, zs = wm.detect_ids(greedy, prompts).z_score, wm.detect_ids(sampled, prompts).z_score
                print(
                    f"| {key.fingerprint} | {null} | {ignore} | {np.nanmean(zg):.2f} ± {np.nanstd(zg):.2f} "
                    f"| {np.nanmean(zs):.2f} ± {np.nanstd(zs):.2f} |",
                    flush=True,
                )
        wm.close()


if __name__ == "__main__":
    main()
