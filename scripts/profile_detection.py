"""Where calibrated detection spends its time: capture vs scoring, the parts of scoring, and operators.

BENCHMARKS.md uses it to explain the calibrated-detection ratio of ``python -m moewm.bench``:

    python scripts/profile_detection.py --threads 1                      # tiny_moe, 32 texts, R = 999
    python scripts/profile_detection.py --reference-keys 99,999,2499     # how scoring grows with R

The texts are the benchmark's (``moewm.bench.sections.HalfMarked``): half sampled with the watermark, half plain
samples, ``--cal-lengths`` tokens after ``--prompt-len`` of context; every model option of the benchmark
works here (``--model-config``, ``--random-init``, ``--set``, ``--device``, ``--dtype``, ...). For each R
it reports (1) wall-clock seconds of the capture, the scoring and a full-logits forward over the same
padded batches (medians of ``--repeats``, unprofiled), (2) torch.profiler's split of the scoring into
its parts (inclusive CPU time of each function, so ``key_draws`` contains ``signatures`` and
``pack_bits``), and (3) the share of self CPU time (CUDA time on a GPU) of the largest operators in the
capture and in the scoring. Profiling slows everything; only the shares matter.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import contextlib  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from moewm.bench import cli, harness, sections  # noqa: E402

from moewm.engine import scoring  # noqa: E402
from moewm.schemes import moe_lsh as watermark_module  # noqa: E402
from moewm.config import WatermarkConfig  # noqa: E402

# Operators grouped under one name: what they are in a forward or in the scoring.
GROUPS = {
    **{op: "matmul (projections, experts, LM head, signatures, top-K green mass)" for op in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::addmv_", "aten::matmul")},
    **{op: "attention (sdpa)" for op in ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_efficient_attention",
                                         "aten::_flash_attention_forward")},
    "aten::_softmax": "softmax (router)",
    "aten::_log_softmax": "log-softmax / top-K (capture's head blocks)",
    "aten::topk": "log-softmax / top-K (capture's head blocks)",
    **{op: "indexing (expert dispatch, token-table gathers)" for op in ("aten::index", "aten::index_put_", "aten::index_add_", "aten::gather", "aten::index_select")},
    **{op: "bit ops (green membership)" for op in ("aten::bitwise_and", "aten::ne", "aten::__lshift__", "aten::any", "aten::gt")},
    **{
        op: "elementwise and copies (memory-bound)"
        for op in ("aten::mul", "aten::add", "aten::add_", "aten::sub", "aten::silu", "aten::sum", "aten::copy_", "aten::cat", "aten::sigmoid", "aten::pow",
                   "aten::mean", "aten::rsqrt", "aten::div", "aten::neg", "aten::clamp", "aten::clamp_", "aten::fill_", "aten::zero_", "aten::where",
                   "aten::log1p", "aten::exp", "aten::stack", "aten::cumsum")
    },
}

# Parts of the scoring, labelled by wrapping the functions that compute them (module attributes are
# looked up at call time, so wrapping them here labels every call).
PARTS = (
    (scoring, "signatures", "signatures (features x every key's hyperplanes)"),
    (scoring, "pack_bits", "bit packing of the signatures"),
    (scoring, "key_draws", "key_draws (green lookups of token + top-K, gamma; includes the two above)"),
    (scoring, "statistic", "statistic (llr / z sums)"),
    (scoring, "exact_gamma", "deployed-key diagnostics: exact gamma"),
    (watermark_module, "upper_tail", "deployed-key diagnostics: model-null p (Poisson-binomial)"),
    (scoring.CaptureBatch, "stack", "padding captures into one batch"),
)


@contextlib.contextmanager
def labelled() -> Iterator[None]:
    saved = []
    for owner, name, label in PARTS:
        fn = getattr(owner, name)
        saved.append((owner, name, fn))

        def wrapped(*args: Any, _fn: Callable[..., Any] = fn, _label: str = label, **kwargs: Any) -> Any:
            with record_function(_label):
                return _fn(*args, **kwargs)

        setattr(owner, name, staticmethod(wrapped) if isinstance(owner, type) else wrapped)
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, staticmethod(fn) if isinstance(owner, type) else fn)


def operator_shares(prof: Any, cuda: bool) -> dict[str, float]:
    shares: dict[str, float] = defaultdict(float)
    total = 0.0
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue  # record_function ranges and runtime events are not operators
        t = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        total += t
        shares[GROUPS.get(ev.key, "other")] += t
    return {k: v / total for k, v in shares.items()} if total else {}


def other_operators(prof: Any, cuda: bool, count: int = 5) -> list[tuple[str, float]]:
    """The largest operators not in GROUPS, with their share of the operators' self time."""
    events = [ev for ev in prof.key_averages() if ev.key.startswith("aten::")]
    time_of = (lambda ev: ev.self_device_time_total) if cuda else (lambda ev: ev.self_cpu_time_total)
    total = sum(time_of(ev) for ev in events) or 1.0
    other = sorted((ev for ev in events if ev.key not in GROUPS), key=lambda ev: -time_of(ev))[:count]
    return [(ev.key, time_of(ev) / total) for ev in other]


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        harness.sync(device)
        t0 = time.perf_counter()
        fn()
        harness.sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = cli.build_parser()
    parser.prog, parser.description = "python scripts/profile_detection.py", __doc__.split("\n\n")[0]
    parser.set_defaults(repeats=3, cal_reference_keys=None)
    args = parser.parse_args(argv)
    args.argv = argv or []
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer, info = sections.load(args)
    b = sections.Bench(args, model, tokenizer)
    wm = b.wm
    cuda = b.device.type == "cuda"
    half = sections.HalfMarked.make(model, tokenizer, wm, b.inputs, args.cal_texts, args.prompt_len, args.cal_lengths)
    texts, prompts, marked = half.take(args.cal_texts)
    rows = [list(p) + list(t) for p, t in zip(prompts, texts)]
    refs_list = args.cal_reference_keys or [args.reference_keys]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    results: dict[int, dict[str, Any]] = {}
    for refs in refs_list:
        alpha = max(WatermarkConfig.alpha, 1.0 / (refs + 1))
        with b.settings(reference_keys=refs, alpha=alpha, **b._batching(None)):
            cfg = wm.watermark_cfg
            wm.reference_tables()
            forward, _ = harness.forward_batches_fn(model, rows, b.pad, cfg.detect_batch_size, cfg.detect_max_tokens)
            capture = b.capturer(texts, prompts)
            captures = capture()
            out = wm.score(captures)
            forward()
            wall = {
                "capture": timed(capture, args.repeats, b.device),
                "score": timed(lambda: wm.score(captures), args.repeats, b.device),
                "forward_full_logits": timed(forward, args.repeats, b.device),
            }
            with profile(activities=activities) as prof_capture:
                capture()
            with labelled(), profile(activities=activities) as prof_score:
                t0 = time.perf_counter()
                wm.score(captures)
                harness.sync(b.device)
                score_total = (time.perf_counter() - t0) * 1e6  # microseconds, like the profiler's times
        parts = {ev.key: ev.cpu_time_total for ev in prof_score.key_averages() if ev.key in {label for _, _, label in PARTS}}
        keys = np.asarray(out.num_reference_keys)
        m = np.asarray(marked)
        results[refs] = {
            "wall": wall,
            "parts": {k: v / score_total for k, v in parts.items()},
            "capture_ops": operator_shares(prof_capture, cuda),
            "score_ops": operator_shares(prof_score, cuda),
            "capture_other": other_operators(prof_capture, cuda),
            "score_other": other_operators(prof_score, cuda),
            "keys_watermarked": float(keys[m].mean()),
            "keys_plain": float(keys[~m].mean()),
            "scored_tokens": int(np.asarray(out.num_tokens_scored).sum()),
        }
    print(f"Calibrated detection profile: {info['name']} ({info['num_layers']} layers, vocab {info['vocab_size']}) on {b.device}, "
          f"{torch.get_num_threads()} torch threads; {args.cal_texts} texts of {min(args.cal_lengths)}-{max(args.cal_lengths)} tokens "
          f"after {args.prompt_len} of context, half watermarked; stop_after={wm.watermark_cfg.stop_after}, statistic {wm.watermark_cfg.statistic}, "
          f"statistic_top_k={wm.watermark_cfg.statistic_top_k}")
    print()
    cols = list(results)
    print("| | " + " | ".join(f"R = {r}" for r in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for key, label in (("capture", "capture s"), ("score", "scoring s"), ("forward_full_logits", "full-logits forward s")):
        print(f"| {label} | " + " | ".join(f"{results[r]['wall'][key]:.3f}" for r in cols) + " |")
    print("| (capture + scoring) / forward | " + " | ".join(
        f"{(results[r]['wall']['capture'] + results[r]['wall']['score']) / results[r]['wall']['forward_full_logits']:.2f}" for r in cols) + " |")
    print("| reference keys scored per watermarked / plain text | " + " | ".join(
        f"{results[r]['keys_watermarked']:.0f} / {results[r]['keys_plain']:.0f}" for r in cols) + " |")
    print("| scoring: microseconds per (scored token x reference key) | " + " | ".join(
        f"{1e6 * results[r]['wall']['score'] / _token_keys(results[r], args.cal_texts):.3f}" for r in cols) + " |")
    print()
    print("Scoring, by part (inclusive CPU time / wall time of the profiled scoring; the diagnostics' own signatures count under signatures too):")
    print()
    print("| part | " + " | ".join(f"R = {r}" for r in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for _, _, label in PARTS:
        print(f"| {label} | " + " | ".join(f"{100 * results[r]['parts'].get(label, 0):.1f} %" for r in cols) + " |")
    for stage in ("capture_ops", "score_ops"):
        names = sorted({k for r in cols for k in results[r][stage]}, key=lambda k: -max(results[r][stage].get(k, 0) for r in cols))
        print()
        print(f"{'Capture' if stage == 'capture_ops' else 'Scoring'}, by operator (share of self {'CUDA' if cuda else 'CPU'} time):")
        print()
        print("| operators | " + " | ".join(f"R = {r}" for r in cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for name in names:
            print(f"| {name} | " + " | ".join(f"{100 * results[r][stage].get(name, 0):.1f} %" for r in cols) + " |")
        last = results[cols[-1]][stage.replace("_ops", "_other")]
        print()
        print(f"Largest operators in 'other' (R = {cols[-1]}): " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in last))
    wm.close()
    return results


def _token_keys(result: dict[str, Any], texts: int) -> float:
    """Scored tokens x reference keys, approximated by the mean keys of each half times its tokens."""
    per_text = result["scored_tokens"] / texts
    return max(1.0, per_text * (texts // 2) * result["keys_watermarked"] + per_text * (texts - texts // 2) * result["keys_plain"])


if __name__ == "__main__":
    main()
