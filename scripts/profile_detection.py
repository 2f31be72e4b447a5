"""Where batched detection spends its time, per text length: torch.profiler, grouped by operator.

BENCHMARKS.md uses it to explain how detection throughput changes with text length:

    python scripts/profile_detection.py --batch 16 --lengths 64,128,512 --null model

Each length is profiled over ``--repeats`` detections after one warm-up; the table lists the share of
self CPU time (or CUDA time on a GPU) of the largest operators, and the seconds per 1k scored tokens.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from moewm.bench import BENCH_SECRET, Inputs
from moewm.config import EncoderConfig, ExtractorConfig, ModelConfig, WatermarkConfig
from moewm.keys import WatermarkKey
from moewm.models import load_model
from moewm.watermark import MoELSHWatermark

# Operators grouped under one name: what they are in a transformer forward.
GROUPS = {
    "aten::mm": "matmul (projections, experts, LM head)",
    "aten::addmm": "matmul (projections, experts, LM head)",
    "aten::bmm": "matmul (projections, experts, LM head)",
    "aten::linear": "matmul (projections, experts, LM head)",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention (sdpa)",
    "aten::_scaled_dot_product_efficient_attention": "attention (sdpa)",
    "aten::_flash_attention_forward": "attention (sdpa)",
    "aten::_softmax": "softmax (router, model null)",
    "aten::index": "indexing (expert dispatch, gathers)",
    "aten::index_put_": "indexing (expert dispatch, gathers)",
    "aten::index_add_": "indexing (expert dispatch, gathers)",
    "aten::gather": "indexing (expert dispatch, gathers)",
    "aten::addmv_": "matmul (projections, experts, LM head)",
    "aten::topk": "router top-k",
    **{
        op: "elementwise and copies (memory-bound)"
        for op in ("aten::mul", "aten::add", "aten::add_", "aten::silu", "aten::sum", "aten::copy_", "aten::cat", "aten::sigmoid", "aten::pow", "aten::mean", "aten::rsqrt", "aten::div", "aten::neg", "aten::clamp_", "aten::fill_", "aten::zero_")
    },
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lengths", default="64,128,512")
    p.add_argument("--context", type=int, default=16)
    p.add_argument("--null", default="model", choices=["model", "uniform"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    model, tokenizer = load_model(ModelConfig(dtype="float32", device=args.device))
    wm = MoELSHWatermark(
        model, tokenizer, ExtractorConfig(), EncoderConfig(), WatermarkConfig(null=args.null, detect_batch_size=args.batch), WatermarkKey(BENCH_SECRET, 0)
    )
    wm.close()
    cuda = wm.device.type == "cuda"
    inputs = Inputs(tokenizer, wm.vocab_size)
    results = {}
    for length in [int(x) for x in args.lengths.split(",")]:
        prompts, texts = inputs.rows(args.batch, args.context, salt=2), inputs.rows(args.batch, length, salt=3)
        wm.detect_ids(texts, prompts)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                wm.detect_ids(texts, prompts)
            if cuda:
                torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / args.repeats
        shares: dict[str, float] = defaultdict(float)
        total = 0.0
        for ev in prof.key_averages():
            t = ev.self_device_time_total if cuda else ev.self_cpu_time_total
            total += t
            shares[GROUPS.get(ev.key, "other")] += t
        results[length] = (wall, {k: v / total for k, v in shares.items()})
    names = sorted({k for _, s in results.values() for k in s}, key=lambda k: -max(s.get(k, 0) for _, s in results.values()))
    lengths = list(results)
    print(f"Batched detection, batch {args.batch}, context {args.context}, null={args.null}, {wm.device} (profiled, so slower than the benchmark)")
    print()
    print("| | " + " | ".join(f"{n} tokens" for n in lengths) + " |")
    print("|---|" + "---:|" * len(lengths))
    print("| s per 1k scored tokens | " + " | ".join(f"{results[n][0] / (args.batch * n) * 1000:.4f}" for n in lengths) + " |")
    for name in names:
        print(f"| {name} | " + " | ".join(f"{results[n][1].get(name, 0) * 100:.1f} %" for n in lengths) + " |")
    wm.close()


if __name__ == "__main__":
    main()
