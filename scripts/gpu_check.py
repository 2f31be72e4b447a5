"""GPU check: memory profiles on real-size models, timed; one JSON of results.

For each model x memory profile (tiny_moe and Qwen1.5-MoE-A2.7B at full size with random weights, in
bf16 (``memory=default``) and NF4 (``memory=ultra_low``'s weights, the experiment left as is) it
records load time, weight bytes measured vs the estimator, tokens/s of plain and watermarked
generation (same prompts, fixed length), the reference-key bank's build time, detection tokens/s
(capture + calibrated scoring), calibrated p-values and detections (z-scores as diagnostics), peak
CUDA memory, and the LSH signature flip rate between the bf16 and the NF4 model (same random weights).

    python scripts/gpu_check.py --out results.json          # on a CUDA machine (scripts/gpu_check.sh)
    python scripts/gpu_check.py --smoke --out smoke.json    # CPU, micro model, seconds (tested in CI)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moewm.config import EncoderConfig, ExtractorConfig, GenerationConfig, ModelConfig, WatermarkConfig  # noqa: E402
from moewm.models.footprint import model_nbytes  # noqa: E402
from moewm.engine.keys import WatermarkKey  # noqa: E402
from moewm.models.memory import GIB, estimate, profile_memory  # noqa: E402
from moewm.models.loading import load_model  # noqa: E402
from moewm.evaluation.signature_agreement import signature_flip_rate  # noqa: E402
from moewm.models.micro import MICRO_ARCHITECTURES  # noqa: E402
from moewm.schemes.moe_lsh import MoELSHWatermark  # noqa: E402
from moewm.engine.generation import generate_batched  # noqa: E402
from transformers import LogitsProcessor  # noqa: E402


class VocabularyMask(LogitsProcessor):
    """Sample only ids below ``size`` (the tokenizer's), for random-weight models with a small tokenizer."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.size :] = float("-inf")
        return scores

log = logging.getLogger("gpu_check")
SECRET = "moewm-gpu-check-public-key"  # speed check: nothing here is secret
PROMPTS = [
    "The history of the printing press begins",
    "In a small village by the sea, there lived",
    "The main advantage of mixture-of-experts models is",
    "def parse_config(path):",
    "Dear members of the committee,",
    "The results of the experiment show that",
    "Once upon a time",
    "A recipe for a simple tomato soup:",
]


def model_config(name: str, smoke: bool) -> ModelConfig:
    if smoke:
        arch = dict(MICRO_ARCHITECTURES["qwen2_moe"], vocab_size=259)
        return ModelConfig(name="micro_moe", path="random:micro_moe", random_init=True, dtype="float32", device="cpu", architecture=arch)
    if name == "tiny_moe":
        return ModelConfig(name="tiny_moe", path="builtin:tiny_moe", dtype="bfloat16", device="cuda")
    from omegaconf import OmegaConf

    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml"))
    cfg: ModelConfig = OmegaConf.to_object(node)
    cfg.random_init = True  # full size, random weights: no download
    cfg.device = "cuda"
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device, base: int = 0) -> Optional[int]:
    """Peak CUDA allocation above ``base`` (what was allocated before this model, e.g. a model kept for comparison)."""
    return int(torch.cuda.max_memory_allocated(device)) - base if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _finite(value: Any) -> Optional[float]:
    value = float(value)
    return round(value, 3) if value == value and abs(value) != float("inf") else None


def measure(model_name: str, profile: str, args: argparse.Namespace, keep: bool = False) -> tuple[dict[str, Any], Any, Any]:
    """Load, time generation (plain / watermarked) and detection; returns (record, model, texts) ."""
    cfg = model_config(model_name, args.smoke)
    memory = profile_memory(profile)
    if args.smoke:
        memory.compute_dtype = "float32"
    record: dict[str, Any] = {"model": cfg.name, "profile": profile, "quantization": memory.quantization}
    device = torch.device("cuda" if (not args.smoke and torch.cuda.is_available()) else "cpu")
    gen = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, batch_size=args.batch, do_sample=True)
    ext, enc = ExtractorConfig(), EncoderConfig(num_bits=32, pool_size=min(64, args.pool_size))
    est = estimate(cfg, memory, batch_size=args.batch, prompt_tokens=16, new_tokens=args.new_tokens, num_bits=enc.num_bits,
                   pool_size=enc.pool_size, suggest=False)
    record["estimated_weight_bytes"] = est.weight_bytes
    record["estimated_total_gib"] = round(est.total_bytes / GIB, 3)
    before = 0
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        _reset_peak(device)
        before = torch.cuda.memory_allocated(device)
    torch.manual_seed(args.seed)  # same random weights for every profile of a model
    t0 = time.perf_counter()
    model, tokenizer = load_model(cfg, memory)
    _sync(device)
    record["load_s"] = round(time.perf_counter() - t0, 2)
    record["weight_bytes"] = model_nbytes(model)
    record["estimate_error"] = round(est.weight_bytes / record["weight_bytes"] - 1, 4)
    if device.type == "cuda":
        record["allocated_after_load_bytes"] = int(torch.cuda.memory_allocated(device) - before)
        record["peak_load_bytes"] = _peak(device, before)  # NF4: includes the bf16 weights it is quantized from
    wm = MoELSHWatermark(model, tokenizer, ext, enc, WatermarkConfig(delta=2.0, min_tokens=min(16, args.new_tokens)), WatermarkKey(SECRET, 0))
    try:
        prompt_ids = [wm.encode_prompt(p) for p in PROMPTS[: args.batch]]
        # A random-weight model with the byte-level fallback tokenizer samples from its full vocabulary:
        # keep it to the tokenizer's ids so that the text can be scored (detection ignores other ids).
        restrict = [VocabularyMask(len(tokenizer))] if len(tokenizer) < wm.vocab_size else []
        record["sampling_restricted_to_tokenizer"] = bool(restrict)

        def generate(config: GenerationConfig, marked: bool) -> list[list[int]]:
            processors = restrict + ([wm.logits_processor] if marked else [])
            return generate_batched(model, tokenizer, prompt_ids, config, processors, on_batch=wm.logits_processor.reset)

        generate(GenerationConfig(max_new_tokens=2, min_new_tokens=2, batch_size=args.batch), True)  # warm-up
        _reset_peak(device)
        timings = {}
        outputs = {}
        for label, marked in (("plain", False), ("watermarked", True)):
            _sync(device)
            t = time.perf_counter()
            ids = generate(gen, marked)
            _sync(device)
            timings[label] = time.perf_counter() - t
            outputs[label] = (prompt_ids, ids)
        tokens = sum(len(r) for r in outputs["watermarked"][1])
        record["generated_tokens"] = tokens
        record["plain_tokens_per_s"] = round(sum(len(r) for r in outputs["plain"][1]) / timings["plain"], 2)
        record["watermarked_tokens_per_s"] = round(tokens / timings["watermarked"], 2)
        record["watermark_overhead"] = round(timings["watermarked"] / timings["plain"] - 1, 4)
        # The public reference keys (R = watermark.reference_keys) are built once per model and cached:
        # timed on their own, so that the detection rate is what every later detection gets.
        _sync(device)
        t = time.perf_counter()
        wm.reference_tables()
        _sync(device)
        record["reference_keys"] = wm.watermark_cfg.reference_keys
        record["reference_bank_s"] = round(time.perf_counter() - t, 2)
        _sync(device)
        t = time.perf_counter()
        marked = wm.detect_ids(outputs["watermarked"][1], outputs["watermarked"][0])
        plain = wm.detect_ids(outputs["plain"][1], outputs["plain"][0])
        _sync(device)
        elapsed = time.perf_counter() - t
        read = sum(len(p) + len(r) for out in outputs.values() for p, r in zip(*out))
        record["detect_tokens_per_s"] = round(read / elapsed, 2)  # prompt + text tokens through the model (capture + calibrated scoring)
        record["detect_scored_tokens"] = int(marked.num_tokens_scored.sum() + plain.num_tokens_scored.sum())
        # Calibrated p-values (rank among the reference keys) decide; z is the model-null diagnostic.
        record["p_watermarked_max"] = _finite(np.nanmax(marked.p_value)) if np.isfinite(marked.p_value).any() else None
        record["p_plain_min"] = _finite(np.nanmin(plain.p_value)) if np.isfinite(plain.p_value).any() else None
        record["detected_watermarked"] = int(marked.prediction.sum())
        record["detected_plain"] = int(plain.prediction.sum())
        record["reference_keys_scored_watermarked_mean"] = _finite(marked.num_reference_keys.mean())
        record["reference_keys_scored_plain_mean"] = _finite(plain.num_reference_keys.mean())
        record["z_watermarked_mean"] = _finite(marked.z_score.mean())
        record["z_plain_mean"] = _finite(plain.z_score.mean())
        record["peak_cuda_bytes"] = _peak(device, before)
        record["peak_cuda_gib"] = None if record["peak_cuda_bytes"] is None else round(record["peak_cuda_bytes"] / GIB, 3)
        texts = [list(p) + list(r) for p, r in zip(*outputs["watermarked"])]
    finally:
        wm.close()
    if not keep:
        del model
        model = None
    return record, (model, tokenizer), texts


def flip_rate(full: Any, quant: Any, rows: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """Signature bits of the bf16 and the NF4 model on the same token ids (the watermarked outputs)."""
    model_a, tokenizer = full
    model_b, _ = quant
    enc = EncoderConfig(num_bits=32, pool_size=min(64, args.pool_size))
    agreement = signature_flip_rate(model_a, model_b, tokenizer, rows, ExtractorConfig(), enc, WatermarkKey(SECRET, 0))
    return agreement.to_dict()


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = "cuda" if (torch.cuda.is_available() and not args.smoke) else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("gpu_check: no CUDA device; use --smoke for the CPU smoke run")
    result: dict[str, Any] = {
        "smoke": args.smoke,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "runs": [],
        "errors": [],
    }
    models = ["micro_moe"] if args.smoke else args.models
    started = time.perf_counter()
    for name in models:
        kept: dict[str, Any] = {}
        rows: list[list[int]] = []
        for profile in ("default", "ultra_low"):
            try:
                record, loaded, rows_ = measure(name, profile, args, keep=True)
                result["runs"].append(record)
                kept[profile] = loaded
                rows = rows or rows_
                log.info("%s", json.dumps(record))
            except Exception as err:  # noqa: BLE001 - recorded; the other runs go on
                if isinstance(err, Exception) and "shipped model is missing" in str(err):
                    result["runs"].append({"model": name, "profile": profile, "skipped": str(err)})
                    continue
                result["errors"].append({"model": name, "profile": profile, "error": f"{type(err).__name__}: {err}",
                                         "traceback": traceback.format_exc(limit=8)})
        if len(kept) == 2 and rows:
            try:
                result.setdefault("signature_flip_rate", {})[name] = flip_rate(kept["default"], kept["ultra_low"], rows, args)
            except Exception as err:  # noqa: BLE001
                result["errors"].append({"model": name, "step": "flip_rate", "error": f"{type(err).__name__}: {err}"})
        kept.clear()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", ".") + "/gpu_check.json", help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="CPU, micro model, a few tokens (what CI runs)")
    parser.add_argument("--models", nargs="+", default=["tiny_moe", "qwen_moe"], help="model names (conf/model) or tiny_moe")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pool-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.new_tokens = min(args.new_tokens, 6)
        args.batch = min(args.batch, 2)
    if args.batch > len(PROMPTS):
        raise SystemExit(f"--batch={args.batch}: allowed range is [1, {len(PROMPTS)}]")
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "errors"}, indent=2))
    if result["errors"]:
        print(json.dumps(result["errors"], indent=2), file=sys.stderr)
    print(f"gpu_check: wrote {out}")
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
