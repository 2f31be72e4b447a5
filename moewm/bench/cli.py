"""Benchmarks: generation, detection, calibrated detection, every scheme, routing capture, scaling and memory, timed in one process and one run.

``python -m moewm.bench`` (tiny_moe on the best device) writes ``bench.json`` and prints Markdown tables;
``--smoke`` shrinks every size so a run takes seconds; ``--sections`` / ``--skip`` pick sections.

Detection is what :meth:`MoELSHWatermark.detect_ids` does: a capture (one forward per text, the output
head in blocks) and calibrated scoring (the deployed key ranked among ``watermark.reference_keys``
public reference keys with Besag-Clifford stopping); the reference bank is built (or loaded) before
anything is timed, and its build time is reported on its own.

Every comparison runs on identical inputs of fixed length (greedy decoding, ``min_new_tokens =
max_new_tokens``), after warm-up, and the methods that are compared are interleaved repeat by repeat
(in rotated order), so a change in background load hits them alike; times are medians, and a ratio is the median of the per-round ratios, which cancels drifts of
machine speed between rounds. Ratios within one run are the meaningful output; absolute times depend on
the machine and its load (recorded in the JSON).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from moewm.bench.harness import loadavg, machine_info
from moewm.bench.report import markdown
from moewm.bench.sections import SECTIONS, Bench, load, targets
from moewm.config import (
    GREEN_LISTS,
    POOL_DESIGNS,
    EncoderConfig,
    KGWConfig,
    WatermarkConfig,
)
from moewm.io import write_json

log = logging.getLogger(__name__)

# -- arguments --------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moewm.bench", description=__doc__.split("\n\n")[0])
    m = p.add_argument_group("model")
    m.add_argument("--model", default="tiny_moe", help="tiny_moe (shipped), micro (random micro qwen2_moe), or a hub name / local directory")
    m.add_argument("--model-config", default=None, help="a conf/model/*.yaml merged into moewm.config.ModelConfig")
    m.add_argument("--random-init", action="store_true", help="build the model config's architecture with random weights")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotlist override of the model config, e.g. architecture.num_hidden_layers=2")
    m.add_argument("--micro-family", default="qwen2_moe", help="family of --model micro (qwen2_moe, mixtral, olmoe)")
    m.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1, ... (default: the model config's, else auto)")
    m.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: the model config's, else float32")
    m.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    s = p.add_argument_group("sizes")
    s.add_argument("--batch-size", type=int, default=8, help="generation batch (and generation-capture batch)")
    s.add_argument("--detect-batch-size", type=int, default=16, help="detection / forward batch")
    s.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (generation) and context tokens (detection)")
    s.add_argument("--gen-len", type=int, default=128, help="new tokens per generation (min = max, greedy)")
    s.add_argument("--text-len", type=int, default=128, help="scored tokens per text in the main detection run")
    s.add_argument("--reference-lengths", type=_ints, default=[64, 128, 256, 512], help="text lengths of the token-by-token comparison")
    s.add_argument("--reference-texts", type=int, default=2, help="texts scored token by token per length")
    s.add_argument("--scale-batches", type=_ints, default=[1, 4, 16, 64], help="detection scaling: batch sizes")
    s.add_argument("--scale-lengths", type=_ints, default=[64, 256, 1024], help="detection scaling: text lengths")
    s.add_argument("--gen-scale-batches", type=_ints, default=[1, 4, 16], help="generation scaling: batch sizes")
    s.add_argument("--gen-scale-lengths", type=_ints, default=[32, 128], help="generation scaling: new tokens")
    s.add_argument("--cal-texts", type=int, default=32, help="calibrated detection: texts (half watermarked, half plain samples)")
    s.add_argument("--cal-lengths", type=_ints, default=[64, 128], metavar="MIN,MAX", help="calibrated detection: text tokens, drawn per text in [MIN, MAX]")
    s.add_argument("--cal-reference-keys", type=_ints, default=[99, 249, 999, 2499], help="calibrated detection scaling: reference keys R")
    s.add_argument("--cal-texts-grid", type=_ints, default=[8, 32, 128], help="calibrated detection scaling: number of texts")
    s.add_argument("--scheme-batch", type=int, default=16, help="schemes section: prompts sampled per scheme (one batch)")
    s.add_argument("--scheme-new-tokens", type=int, default=64, help="schemes section: new tokens per prompt (sampling, min = max)")
    s.add_argument("--schemes", default="", help="schemes section: comma-separated watermark kinds (default: every registered scheme)")
    s.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    s.add_argument("--scale-repeats", type=int, default=3, help="timed repeats per scaling cell (at most)")
    s.add_argument("--cell-budget", type=float, default=20.0, help="seconds of timed repeats per scaling cell: big cells get fewer repeats")
    s.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    s.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: a seconds-long check that everything runs")
    w = p.add_argument_group("watermark")
    w.add_argument("--num-bits", type=int, default=EncoderConfig.num_bits)
    w.add_argument("--pool-size", type=int, default=None,
                   help=f"encoder.pool_size (default: {EncoderConfig.pool_size}, or usable tokens / (2 x num_bits) when smaller, as for a "
                   "random-init model with a byte-level tokenizer, so that green lists do not cover the whole vocabulary)")
    w.add_argument("--delta", type=float, default=WatermarkConfig.delta)
    w.add_argument("--kgw-gamma", type=float, default=KGWConfig.gamma)
    w.add_argument("--reference-keys", type=int, default=WatermarkConfig.reference_keys, help="watermark.reference_keys (R) of every detection")
    w.add_argument("--stop-after", type=_optional_int, default=WatermarkConfig.stop_after, help="watermark.stop_after (Besag-Clifford h; 'none': all R keys)")
    w.add_argument("--pools", choices=POOL_DESIGNS, default=EncoderConfig.pools,
                   help="encoder.pools (random: the same scoring cost as anchors, and a reference bank that builds in seconds at a 152k vocabulary on a CPU)")
    w.add_argument("--green-lists", choices=GREEN_LISTS, default=EncoderConfig.green_lists, help="encoder.green_lists")
    w.add_argument("--random-pools", action="store_true", help="deprecated: --pools random")
    w.add_argument("--cache-dir", default="default", help="reference-bank cache ('default': $MOEWM_CACHE_DIR or ~/.cache/moewm; 'none': memory only)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="bench.json", help="where the JSON goes")
    o.add_argument("--markdown", default=None, help="also write the Markdown tables to this file")
    o.add_argument("--sections", default="", help=f"comma-separated sections to run (default: all): {','.join(SECTIONS)}")
    o.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    return p


def _optional_int(text: str) -> Optional[int]:
    return None if text.strip().lower() in ("none", "null", "") else int(text)


def apply_smoke(args: argparse.Namespace) -> None:
    """Shrink every size so the whole benchmark takes seconds (the numbers then mean little)."""
    args.batch_size, args.detect_batch_size = 2, 2
    args.prompt_len, args.gen_len, args.text_len = 4, 6, 12
    args.reference_lengths, args.reference_texts = [12], 1
    args.scale_batches, args.scale_lengths = [1, 2], [8, 16]
    args.gen_scale_batches, args.gen_scale_lengths = [1, 2], [4]
    args.cal_texts, args.cal_lengths, args.cal_texts_grid = 4, [16, 20], [2, 4]
    args.scheme_batch, args.scheme_new_tokens = 2, 6
    args.reference_keys = min(args.reference_keys, 49)
    args.cal_reference_keys = [19, args.reference_keys]
    if args.stop_after is not None:
        args.stop_after = min(args.stop_after, 10)
    args.repeats, args.scale_repeats, args.warmup = 1, 1, 1


# -- main -------------------------------------------------------------------------------------------

def selected_sections(args: argparse.Namespace) -> list[str]:
    """``--sections`` (default: all), less ``--skip``, in the benchmark's order."""

    def parse(text: str, flag: str) -> set[str]:
        names = {s.strip() for s in text.split(",") if s.strip()}
        unknown = names - set(SECTIONS)
        if unknown:
            raise SystemExit(f"{flag}: unknown sections {sorted(unknown)}; allowed: {', '.join(SECTIONS)}")
        return names

    wanted = parse(args.sections, "--sections") or set(SECTIONS)
    skip = parse(args.skip, "--skip")
    return [name for name in SECTIONS if name in wanted and name not in skip]


def run(args: argparse.Namespace, checkpoint: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """All sections not skipped; ``checkpoint`` gets the partial result after each one."""
    if args.smoke:
        apply_smoke(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = selected_sections(args)
    if args.cal_texts < 2 or min(args.cal_texts_grid, default=2) < 2:
        raise SystemExit("--cal-texts / --cal-texts-grid: at least 2 texts (one watermarked, one plain)")
    if len(args.cal_lengths) not in (1, 2) or min(args.cal_lengths) < 1:
        raise SystemExit(f"--cal-lengths={args.cal_lengths}: MIN,MAX (or one length), each >= 1")
    torch.manual_seed(0)
    model, tokenizer, info = load(args)
    bench = Bench(args, model, tokenizer)
    result: dict[str, Any] = {
        "command": "python -m moewm.bench " + " ".join(args.argv),
        "settings": {k: v for k, v in vars(args).items() if k != "argv"},
        "model": info,
        "machine": machine_info(bench.device),
        "watermark": {
            "extractor": asdict(bench.wm.extractor_cfg),
            "encoder": asdict(bench.wm.encoder_cfg),
            "delta": bench.wm.watermark_cfg.delta,
            "feature_dim": bench.wm.capture_hooks.dim,
            "reference_keys": bench.wm.watermark_cfg.reference_keys,
            "stop_after": bench.wm.watermark_cfg.stop_after,
            "statistic": bench.wm.watermark_cfg.statistic,
            "null": bench.wm.watermark_cfg.null,
            "reference_bank_first_call_s": bench.reference_first_call_s,
        },
        "load_average": {"start": loadavg()},
    }
    started = time.perf_counter()
    for name in chosen:
        t0 = time.perf_counter()
        log.info("bench: %s ...", name)
        result[name] = getattr(bench, name)()
        result.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
        result["load_average"][f"after_{name}"] = loadavg()
        if checkpoint is not None:
            checkpoint(result)
    result["total_seconds"] = time.perf_counter() - started
    result["load_average"]["end"] = loadavg()
    result["targets"] = targets(result)
    return result


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(result: dict[str, Any]) -> None:
        write_json(out, result)  # strict JSON, written atomically, like every file moewm writes

    result = run(args, checkpoint=write)  # partial results land in --out as sections finish
    write(result)
    table = markdown(result)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
