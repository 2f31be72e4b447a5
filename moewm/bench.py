"""Benchmarks: generation, detection, calibrated detection, routing capture, scaling and memory, timed in one process and one run.

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
import contextlib
import ctypes
import json
import logging
import math
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from transformers import LogitsProcessorList, WatermarkingConfig

from moewm import keybank
from moewm.capture import detection_batches
from moewm.config import GREEN_LISTS, POOL_DESIGNS, EncoderConfig, ExtractorConfig, GenerationConfig, ModelConfig, WatermarkConfig
from moewm.keys import WatermarkKey
from moewm.padding import pad_id, pad_rows
from moewm.reference import reference_detect
from moewm.scoring import BankTables
from moewm.watermark import MoELSHWatermark, TokenizerVocabularyMask, model_vocab_size, usable_tokens

log = logging.getLogger(__name__)

# A fixed public key: the benchmark measures speed, nothing it produces is secret.
BENCH_SECRET = "moewm-benchmark-public-key"

TARGETS = {
    "generation_watermarked_over_plain": 1.10,
    # The capture (detection's one forward per text, output head in blocks) against a full-logits forward.
    "capture_over_forward": 1.3,
    "reference_speedup_at_128": 10.0,
    "watermark_memory_fraction": 0.05,
}
# Calibrated detection (R = 999 reference keys, stop_after = 10, half the texts watermarked) against one
# full-logits forward over the same padded batches, per model: tiny_moe on a CPU (a 7M-parameter model,
# the forward is cheap: the hard case) and full-width qwen_moe (random init, layers reduced to fit).
CALIBRATED_TARGETS = {"tiny_moe": 5.0, "qwen_moe": 1.2}
CALIBRATED_TARGET_DEFAULT = 5.0

SECTIONS = ("generation", "detection", "calibrated", "reference", "capture", "scaling", "memory")


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
    w.add_argument("--kgw-gamma", type=float, default=WatermarkConfig.kgw_gamma)
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
    args.reference_keys = min(args.reference_keys, 49)
    args.cal_reference_keys = [19, args.reference_keys]
    if args.stop_after is not None:
        args.stop_after = min(args.stop_after, 10)
    args.repeats, args.scale_repeats, args.warmup = 1, 1, 1


# -- model ------------------------------------------------------------------------------------------


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    """ModelConfig from a YAML (structured merge, so unknown keys fail), ``--model`` and ``--set`` overrides."""
    from omegaconf import OmegaConf

    base = OmegaConf.structured(ModelConfig)
    layers = []
    if args.model_config:
        loaded = OmegaConf.load(args.model_config)
        if "model" in loaded and "path" not in loaded:  # a file written as {model: {...}}
            loaded = loaded.model
        loaded = OmegaConf.masked_copy(loaded, [k for k in loaded.keys() if k != "defaults"])
        layers.append(loaded)
    elif args.model != "tiny_moe":
        layers.append(OmegaConf.create({"name": Path(args.model).name, "path": args.model}))
    overrides = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None}
    if overrides:
        layers.append(OmegaConf.create(overrides))
    if args.random_init:
        layers.append(OmegaConf.create({"random_init": True}))
    if args.set:
        layers.append(OmegaConf.from_dotlist(args.set))
    cfg = OmegaConf.to_object(OmegaConf.merge(base, *layers))
    assert isinstance(cfg, ModelConfig)
    return cfg


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Model, tokenizer and a description of what was loaded."""
    from moewm.models import load_model, pick_device

    if args.model == "micro" and not args.model_config:
        from moewm.testing import byte_tokenizer, micro_model

        device = pick_device(args.device or "auto")
        model = micro_model(args.micro_family).to(device=device, dtype=getattr(torch, args.dtype or "float32"))
        tokenizer = byte_tokenizer()
        info: dict[str, Any] = {"name": f"micro-{args.micro_family}", "source": "moewm.testing.micro_model (random init)"}
    else:
        cfg = model_config_from_args(args)
        model, tokenizer = load_model(cfg)
        info = {"name": cfg.name, "source": cfg.path, "random_init": cfg.random_init}
    info["forced_output_router_logits_off"] = bool(getattr(model.config, "output_router_logits", False))
    # A config saved with output_router_logits=true would make every forward compute the auxiliary loss;
    # the benchmark turns it off so that it is measured only where asked for.
    if hasattr(model.config, "output_router_logits"):
        model.config.output_router_logits = False
    info.update(
        model_type=model.config.model_type,
        vocab_size=int(model.config.vocab_size),
        num_layers=int(model.config.num_hidden_layers),
        hidden_size=int(model.config.hidden_size),
        parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        device=str(next(model.parameters()).device),
    )
    return model, tokenizer, info


# -- timing -----------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device, budget_s: Optional[float] = None
) -> dict[str, dict[str, Any]]:
    """Time several callables interleaved (A B C, B C A, ...) after warm-up; median, min and all times in seconds.

    Repeat i of every method runs within one round, so :func:`ratio` can pair them: a change of machine
    speed between rounds (turbo, a noisy neighbour) then cancels.

    With ``budget_s``, the repeats are cut (to no fewer than one) so that they take about that long,
    judged by the last warm-up round.
    """
    round_s = 0.0
    for _ in range(warmup):
        _sync(device)
        t0 = time.perf_counter()
        for fn in fns.values():
            fn()
        _sync(device)
        round_s = time.perf_counter() - t0
    if budget_s is not None and round_s > 0:
        repeats = min(repeats, int(budget_s // round_s))
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(max(1, repeats)):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotated: no method always runs first
            fn = fns[name]
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "times_s": ts} for name, ts in times.items()}


def ratio(timings: dict[str, dict[str, Any]], num: str, den: str) -> float:
    """Median over rounds of time(num) / time(den) in the same round (see :func:`compare`)."""
    a, b = timings[num]["times_s"], timings[den]["times_s"]
    return statistics.median(x / y for x, y in zip(a, b))


# -- memory -----------------------------------------------------------------------------------------


def _libc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


class PeakMemory:
    """Peak memory of a block above what was in use when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` (exact, tensors only). CPU: the process's resident set size
    sampled by a thread every ``interval`` seconds; it counts every touched page (tensors, allocator slack,
    Python objects), and a spike shorter than the interval can be missed.
    """

    def __init__(self, device: torch.device, interval: float = 0.0005) -> None:
        self.device = device
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()

    def _sample(self, process: Any) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            libc = _libc()
            if libc is not None:
                libc.malloc_trim(0)
            process = psutil.Process()
            self._base = self._max = process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, args=(process,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            import psutil

            self._stop.set()
            self._thread.join()
            self._max = max(self._max, psutil.Process().memory_info().rss)
            self.peak_bytes = self._max - self._base


@contextlib.contextmanager
def exact_rss() -> Iterator[bool]:
    """Make RSS follow live tensors: glibc then maps every block >= 128 KiB on its own and unmaps it on free.

    By default glibc raises its mmap threshold after large frees, so a later tensor reuses heap pages
    that never left the RSS and a peak delta reads too low. Yields whether the setting could be made.
    """
    libc = _libc()
    if libc is None:
        yield False
        return
    m_mmap_threshold = -3
    ok = bool(libc.mallopt(m_mmap_threshold, 128 * 1024))
    try:
        yield ok
    finally:
        libc.malloc_trim(0)


def param_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# -- inputs -----------------------------------------------------------------------------------------


class Inputs:
    """Fixed-length token ids drawn (seeded) from the tokenizer's usable tokens."""

    def __init__(self, tokenizer: Any, vocab_size: int, seed: int = 0) -> None:
        self.pool = torch.nonzero(usable_tokens(tokenizer, vocab_size), as_tuple=True)[0]
        self.seed = seed

    def rows(self, batch: int, length: int, salt: int = 0) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + salt * 7919 + length)
        idx = torch.randint(self.pool.numel(), (batch, length), generator=gen)
        return self.pool[idx].tolist()


def forward_fn(
    model: torch.nn.Module, rows: Sequence[Sequence[int]], pad: int, full_logits: bool = False, router_logits: bool = False
) -> Callable[[], Any]:
    """One forward pass over ``rows`` built exactly as the detector builds its batch (right padding, use_cache=False)."""
    device = model.get_input_embeddings().weight.device
    input_ids, attention = pad_rows(rows, pad)
    batch, length = input_ids.shape
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = torch.arange(length, device=device).unsqueeze(0).expand(batch, -1)
    kwargs: dict[str, Any] = {"use_cache": False}
    if not full_logits:
        kwargs["logits_to_keep"] = 1
    if router_logits:
        kwargs["output_router_logits"] = True

    @torch.no_grad()
    def run() -> Any:
        return model(input_ids=input_ids, attention_mask=attention, position_ids=positions, **kwargs)

    return run


def generate_fn(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    processors: Sequence[Any] = (),
    before: Optional[Callable[[], None]] = None,
    sample: bool = False,
    **extra: Any,
) -> Callable[[], torch.Tensor]:
    """``model.generate`` of exactly ``new_tokens`` tokens per prompt (all prompts the same length):
    greedy, or with ``sample`` pure sampling at temperature 1 (no top-k / top-p)."""
    device = model.get_input_embeddings().weight.device
    input_ids = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=device)
    attention = torch.ones_like(input_ids)
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=sample, temperature=1.0, top_k=0, top_p=1.0, batch_size=len(prompts))
    pad = pad_id(tokenizer)

    @torch.no_grad()
    def run() -> torch.Tensor:
        if before is not None:
            before()
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            logits_processor=LogitsProcessorList(list(processors)),
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            **gen.generate_kwargs(),
            **extra,
        )

    return run


# -- texts for calibrated detection -----------------------------------------------------------------


def sampled_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    wm: MoELSHWatermark,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    watermark: bool,
    seed: int,
    batch: int = 32,
) -> list[list[int]]:
    """Exactly ``new_tokens`` tokens per prompt sampled at temperature 1 (no top-k / top-p), with or without
    the watermark; sampling keeps to the tokenizer's ids when the model has spare rows."""
    mask = [TokenizerVocabularyMask(len(tokenizer))] if len(tokenizer) < wm.vocab_size else []
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        processors = mask + ([wm.logits_processor] if watermark else [])
        before = wm.logits_processor.reset if watermark else None
        run = generate_fn(model, tokenizer, chunk, new_tokens, processors, before=before, sample=True)
        torch.manual_seed(seed + start)
        if watermark:
            wm.capture_hooks.attach()
        try:
            ids = run()
        finally:
            wm.close()
        out += ids[:, len(chunk[0]) :].tolist()
    return out


class HalfMarked:
    """Texts sampled with the watermark and plain samples from the same prompts, each cut to a seeded
    length; :meth:`take` gives ``n`` texts, half of each kind (watermarked first)."""

    def __init__(self, marked: list[list[int]], plain: list[list[int]], prompts: list[list[int]]) -> None:
        self.marked, self.plain, self.prompts = marked, plain, prompts

    @staticmethod
    def make(model: torch.nn.Module, tokenizer: Any, wm: MoELSHWatermark, inputs: "Inputs", count: int, prompt_len: int,
             lengths: Sequence[int]) -> "HalfMarked":
        lo, hi = min(lengths), max(lengths)
        n_plain = count - count // 2
        prompts = inputs.rows(n_plain, prompt_len, salt=6)
        gen = torch.Generator().manual_seed(6)
        cut = torch.randint(lo, hi + 1, (2, n_plain), generator=gen).tolist()
        marked = sampled_texts(model, tokenizer, wm, prompts[: count // 2], hi, True, seed=1)
        plain = sampled_texts(model, tokenizer, wm, prompts, hi, False, seed=2)
        return HalfMarked([t[:c] for t, c in zip(marked, cut[0])], [t[:c] for t, c in zip(plain, cut[1])], prompts)

    def take(self, n: int) -> tuple[list[list[int]], list[list[int]], list[bool]]:
        k, m = n // 2, n - n // 2
        if k > len(self.marked) or m > len(self.plain):
            raise ValueError(f"{n} texts asked for, {len(self.marked) + len(self.plain)} made")
        return self.marked[:k] + self.plain[:m], self.prompts[:k] + self.prompts[:m], [True] * k + [False] * m


def forward_batches_fn(model: torch.nn.Module, rows: Sequence[Sequence[int]], pad: int, batch_size: int,
                       max_tokens: Optional[int]) -> tuple[Callable[[], Any], list[int]]:
    """Full-logits forwards over the padded batches the capture makes of ``rows`` (longest first, at most
    ``batch_size`` rows and ``max_tokens`` padded tokens each: :func:`moewm.capture.detection_batches`);
    returns the callable and the batch sizes."""
    order = np.argsort([-len(r) for r in rows], kind="stable")
    spans = detection_batches([len(rows[i]) for i in order], batch_size, max_tokens)
    fns = [forward_fn(model, [rows[i] for i in order[s:e]], pad, full_logits=True) for s, e in spans]

    def run() -> None:
        for fn in fns:
            fn()

    return run, [e - s for s, e in spans]


def default_pool_size(tokenizer: Any, vocab_size: int, num_bits: int) -> int:
    """The library's pool size, or usable tokens / (2 x num_bits) when smaller: about half the bits are set,
    so green lists then cover about a quarter of the usable tokens instead of all of them."""
    usable = int(usable_tokens(tokenizer, vocab_size).sum())
    return max(1, min(EncoderConfig.pool_size, usable // (2 * num_bits)))


def _mean(values: Any) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()) if arr.size else float("nan")


# -- sections ---------------------------------------------------------------------------------------


class Bench:
    """The state one run shares: model, watermark, inputs, device and settings."""

    def __init__(self, args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any) -> None:
        self.args = args
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.get_input_embeddings().weight.device
        refs = args.reference_keys
        pool_size = args.pool_size or default_pool_size(tokenizer, model_vocab_size(model), args.num_bits)
        # alpha cannot go below the smallest calibrated p-value, 1 / (R + 1).
        watermark = WatermarkConfig(delta=args.delta, kgw_gamma=args.kgw_gamma, reference_keys=refs, stop_after=args.stop_after,
                                    alpha=max(WatermarkConfig.alpha, 1.0 / (refs + 1)))
        cache_dir = None if str(args.cache_dir).lower() == "none" else args.cache_dir
        self.wm = MoELSHWatermark(
            model,
            tokenizer,
            ExtractorConfig(),
            EncoderConfig(num_bits=args.num_bits, pool_size=pool_size, pools="random" if args.random_pools else args.pools, green_lists=args.green_lists),
            watermark,
            WatermarkKey(BENCH_SECRET, 0),
            cache_dir=cache_dir,
        )
        self.wm.close()  # hooks only where a measurement asks for them
        self.inputs = Inputs(tokenizer, self.wm.vocab_size)
        self.pad = pad_id(tokenizer)
        # The reference bank is built (or loaded from the cache) before anything is timed.
        t0 = time.perf_counter()
        self.wm.reference_tables()
        self.reference_first_call_s = time.perf_counter() - t0

    @contextlib.contextmanager
    def hooks(self, on: bool) -> Iterator[None]:
        if on:
            self.wm.capture_hooks.attach()
        else:
            self.wm.close()
        try:
            yield
        finally:
            self.wm.close()

    @contextlib.contextmanager
    def settings(self, **values: Any) -> Iterator[WatermarkConfig]:
        """Watermark settings changed for a block, and restored after it."""
        cfg = self.wm.watermark_cfg
        old = {k: getattr(cfg, k) for k in values}
        for k, v in values.items():
            setattr(cfg, k, v)
        try:
            yield cfg
        finally:
            for k, v in old.items():
                setattr(cfg, k, v)

    def kgw_config(self) -> WatermarkingConfig:
        cfg = self.wm.watermark_cfg
        return WatermarkingConfig(
            greenlist_ratio=cfg.kgw_gamma, bias=cfg.delta, seeding_scheme=cfg.kgw_seeding_scheme, context_width=cfg.kgw_context_width
        )

    def generation_fns(self, batch: int, new_tokens: int, kgw: bool = True) -> dict[str, Callable[[], Any]]:
        prompts = self.inputs.rows(batch, self.args.prompt_len, salt=1)
        plain = generate_fn(self.model, self.tokenizer, prompts, new_tokens)
        marked = generate_fn(self.model, self.tokenizer, prompts, new_tokens, [self.wm.logits_processor], before=self.wm.logits_processor.reset)

        def with_hooks(fn: Callable[[], Any], on: bool) -> Callable[[], Any]:
            def run() -> Any:
                with self.hooks(on):
                    return fn()

            return run

        fns = {"plain": with_hooks(plain, False), "moe_lsh": with_hooks(marked, True)}
        if kgw:
            fns["kgw"] = with_hooks(generate_fn(self.model, self.tokenizer, prompts, new_tokens, watermarking_config=self.kgw_config()), False)
        return fns

    def _batching(self, batch: Optional[int]) -> dict[str, Any]:
        """Exactly ``batch`` texts per forward (like the plain forward compared with), or the library's batching."""
        if batch is None:
            return {"detect_batch_size": self.args.detect_batch_size, "detect_max_tokens": WatermarkConfig.detect_max_tokens}
        return {"detect_batch_size": batch, "detect_max_tokens": None}

    def _library_call(self, method: str, texts: list[list[int]], prompts: list[list[int]], batch: Optional[int],
                      keep: Optional[list[Any]]) -> Callable[[], Any]:
        """A timed call of ``self.wm.<method>(texts, prompts)`` under the batching asked for (``keep`` receives
        the last output); the hooks come off after each call, as a user's code would leave them."""

        def run() -> Any:
            with self.settings(**self._batching(batch)):
                try:
                    out = getattr(self.wm, method)(texts, prompts)
                finally:
                    self.wm.close()
            if keep is not None:
                keep[:] = [out]
            return out

        return run

    def detector(self, texts: list[list[int]], prompts: list[list[int]], batch: Optional[int] = None,
                 keep: Optional[list[Any]] = None) -> Callable[[], Any]:
        """``detect_ids``: capture + calibrated scoring."""
        return self._library_call("detect_ids", texts, prompts, batch, keep)

    def capturer(self, texts: list[list[int]], prompts: list[list[int]], batch: Optional[int] = None,
                 keep: Optional[list[Any]] = None) -> Callable[[], Any]:
        """``capture`` alone: detection's forward (output head in blocks, top-K kept), no scoring."""
        return self._library_call("capture", texts, prompts, batch, keep)

    def detection_fns(self, batch: int, text_len: int, keep: Optional[list[Any]] = None) -> dict[str, Callable[[], Any]]:
        """Detection, its capture alone and the two plain forwards, on the same padded batch of random-token
        texts (none watermarked: each stops after about ``stop_after`` reference keys reach it).

        The capture needs the model's distribution at every scored position, so its limit is the
        forward with full logits; ``logits_to_keep=1`` is shown for scale.
        """
        prompts = self.inputs.rows(batch, self.args.prompt_len, salt=2)
        texts = self.inputs.rows(batch, text_len, salt=3)
        rows = [p + t for p, t in zip(prompts, texts)]
        return {
            "detect": self.detector(texts, prompts, batch, keep),
            "capture": self.capturer(texts, prompts, batch),
            "forward_full_logits": forward_fn(self.model, rows, self.pad, full_logits=True),
            "forward": forward_fn(self.model, rows, self.pad),
        }

    @staticmethod
    def detection_ratios(t: dict[str, dict[str, Any]]) -> dict[str, float]:
        return {
            "ratio_detect_over_forward_full_logits": ratio(t, "detect", "forward_full_logits"),
            "ratio_capture_over_forward_full_logits": ratio(t, "capture", "forward_full_logits"),
            "ratio_detect_over_forward": ratio(t, "detect", "forward"),
        }

    def _keys_info(self) -> dict[str, Any]:
        cfg = self.wm.watermark_cfg
        return {"reference_keys": cfg.reference_keys, "stop_after": cfg.stop_after, "statistic": cfg.statistic, "null": cfg.null}

    # Each section returns a JSON-able dict.
    def generation(self) -> dict[str, Any]:
        a = self.args
        t = compare(self.generation_fns(a.batch_size, a.gen_len), a.repeats, a.warmup, self.device)
        tokens = a.batch_size * a.gen_len
        for v in t.values():
            v["tokens_per_s"] = tokens / v["median_s"]
        out: dict[str, Any] = {"batch_size": a.batch_size, "prompt_len": a.prompt_len, "new_tokens": a.gen_len, "timings": t}
        out["ratio_moe_lsh_over_plain"] = ratio(t, "moe_lsh", "plain")
        out["ratio_kgw_over_plain"] = ratio(t, "kgw", "plain")
        out["sanity"] = self._sanity(a.batch_size, a.gen_len)
        return out

    def _sanity(self, batch: int, new_tokens: int) -> dict[str, Any]:
        """Calibrated p-values (and the diagnostic z) of what was timed, with plain samples beside it.

        The watermark must be there in the timed (greedy) output. The calibrated p-value holds for any
        text written without the key (greedy included); the diagnostic z's model null holds only for
        text sampled at temperature 1 from the model (the mode of a distribution is green more often
        than its green mass says when the key's pools hold likely tokens), so plain text sampled at
        temperature 1 from the same prompts is reported next to the greedy plain output.
        """
        new_tokens = max(new_tokens, 2 * self.wm.watermark_cfg.min_tokens)  # nothing is scored below min_tokens
        prompts = self.inputs.rows(batch, self.args.prompt_len, salt=1)
        fns = self.generation_fns(batch, new_tokens, kgw=False)
        width = self.args.prompt_len
        texts = {"moe_lsh_greedy": fns["moe_lsh"]()[:, width:].tolist(), "plain_greedy": fns["plain"]()[:, width:].tolist()}
        torch.manual_seed(0)
        texts["plain_sampled"] = generate_fn(self.model, self.tokenizer, prompts, new_tokens, sample=True)()[:, width:].tolist()
        cfg = self.wm.watermark_cfg
        out: dict[str, Any] = {**self._keys_info(), "alpha": cfg.alpha, "texts": batch, "new_tokens": new_tokens}
        with self.settings(**self._batching(batch)):
            for name, rows in texts.items():
                d = self.wm.detect_ids(rows, prompts)
                out[f"z_{name}_mean"], out[f"z_{name}_std"] = _finite_mean(d.z_score), _finite_std(d.z_score)
                finite = [float(p) for p in d.p_value if math.isfinite(float(p))]
                out[f"p_{name}_median"] = statistics.median(finite) if finite else float("nan")
                out[f"detected_{name}"] = int(np.asarray(d.prediction).sum())
        self.wm.close()
        return out

    def detection(self) -> dict[str, Any]:
        a = self.args
        keep: list[Any] = []
        t = compare(self.detection_fns(a.detect_batch_size, a.text_len, keep), a.repeats, a.warmup, self.device)
        scored = a.detect_batch_size * a.text_len
        for v in t.values():
            v["scored_tokens_per_s"] = scored / v["median_s"]
        captures = self.capturer(*self._detection_texts(a.detect_batch_size, a.text_len), a.detect_batch_size)()
        tokens = sum(c.num_scored for c in captures)
        capture_bytes = sum(sum(v.numel() * v.element_size() for v in vars(c).values() if isinstance(v, torch.Tensor)) for c in captures)
        return {
            "batch_size": a.detect_batch_size,
            "context_len": a.prompt_len,
            "text_len": a.text_len,
            **self._keys_info(),
            "mean_reference_keys_scored": _mean(keep[0].num_reference_keys) if keep else float("nan"),
            "capture_bytes_per_scored_token": capture_bytes / max(1, tokens),
            "timings": t,
            **self.detection_ratios(t),
        }

    def _detection_texts(self, batch: int, text_len: int) -> tuple[list[list[int]], list[list[int]]]:
        return self.inputs.rows(batch, text_len, salt=3), self.inputs.rows(batch, self.args.prompt_len, salt=2)

    # -- calibrated detection: half the texts watermarked ------------------------------------------
    def bank_build(self, count: int) -> dict[str, Any]:
        """A reference bank of ``count`` keys built from scratch (no cache), and its token table: what the
        first detection for a model and encoder pays once (then it is cached in memory and on disk)."""
        emb = self.model.get_input_embeddings().weight
        _sync(self.device)
        t0 = time.perf_counter()
        bank = keybank.build_bank(self.wm.encoder_cfg, keybank.reference_keys(count), self.wm.capture_hooks.dim, emb,
                                  self.wm.encoder.usable, self.wm.vocab_size)
        _sync(self.device)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        tables = BankTables.of(bank, self.device)
        _sync(self.device)
        return {
            "reference_keys": count,
            "pools": self.wm.encoder_cfg.pool_design,
            "green_lists": self.wm.encoder_cfg.green_lists,
            "build_s": build_s,
            "token_table_s": time.perf_counter() - t0,
            "bank_bytes": bank.nbytes(),
            "token_table_bytes": 0 if tables.table is None else tables.table.numel() * tables.table.element_size(),
        }

    def calibrated_cell(self, texts: list[list[int]], prompts: list[list[int]], marked: list[bool], refs: int,
                        detail: bool = False) -> dict[str, Any]:
        """``detect_ids`` (capture + calibrated scoring under ``refs`` reference keys, the library's batching)
        against full-logits forwards over the same padded batches; with ``detail`` also the capture and
        the scoring alone. The bank is loaded before the timing."""
        a = self.args
        cfg = self.wm.watermark_cfg
        alpha = max(WatermarkConfig.alpha, 1.0 / (refs + 1))
        rows = [list(p) + list(t) for p, t in zip(prompts, texts)]
        with self.settings(reference_keys=refs, alpha=alpha, **self._batching(None)):
            t0 = time.perf_counter()
            self.wm.reference_tables()
            bank_s = time.perf_counter() - t0
            forward, batches = forward_batches_fn(self.model, rows, self.pad, cfg.detect_batch_size, cfg.detect_max_tokens)
            keep: list[Any] = []
            fns = {"detect": self.detector(texts, prompts, None, keep), "forward_full_logits": forward}
            if detail:
                captures = self.capturer(texts, prompts)()
                fns["capture"] = self.capturer(texts, prompts)
                fns["score"] = lambda: self.wm.score(captures)
                t = compare(fns, a.repeats, a.warmup, self.device)
            else:
                t = compare(fns, a.scale_repeats, a.warmup, self.device, a.cell_budget)
        out = keep[0]
        keys = np.asarray(out.num_reference_keys)
        m = np.asarray(marked, dtype=bool)
        cell: dict[str, Any] = {
            "reference_keys": refs,
            "stop_after": cfg.stop_after,
            "alpha": alpha,
            "texts": len(texts),
            "watermarked_texts": int(m.sum()),
            "scored_tokens": int(np.asarray(out.num_tokens_scored).sum()),
            "forward_batches": batches,
            "bank_first_call_s": bank_s,
            "detect_s": t["detect"]["median_s"],
            "forward_full_logits_s": t["forward_full_logits"]["median_s"],
            "ratio_detect_over_forward_full_logits": ratio(t, "detect", "forward_full_logits"),
            "mean_keys_watermarked": _mean(keys[m]),
            "mean_keys_unwatermarked": _mean(keys[~m]),
            "early_stop_share_watermarked": _mean(keys[m] < refs),
            "early_stop_share_unwatermarked": _mean(keys[~m] < refs),
            "detected_share_watermarked": _mean(np.asarray(out.prediction)[m]),
            "false_positive_share_unwatermarked": _mean(np.asarray(out.prediction)[~m]),
            "repeats": len(t["detect"]["times_s"]),
        }
        if detail:
            cell["timings"] = t
            cell["capture_s"] = t["capture"]["median_s"]
            cell["score_s"] = t["score"]["median_s"]
            cell["ratio_capture_over_forward_full_logits"] = ratio(t, "capture", "forward_full_logits")
            cell["ratio_score_over_forward_full_logits"] = ratio(t, "score", "forward_full_logits")
            cell["score_share_of_capture_plus_score"] = statistics.median(
                s / (c + s) for c, s in zip(t["capture"]["times_s"], t["score"]["times_s"])
            )
        return cell

    def calibrated(self) -> dict[str, Any]:
        """Detection as deployed: half the texts watermarked (sampled with the watermark), half plain samples;
        R reference keys with sequential stopping; scaling with R and with the number of texts."""
        a = self.args
        cfg = self.wm.watermark_cfg
        refs = cfg.reference_keys
        sizes = sorted(set(a.cal_texts_grid) | {a.cal_texts})
        t0 = time.perf_counter()
        half = HalfMarked.make(self.model, self.tokenizer, self.wm, self.inputs, max(sizes), a.prompt_len, a.cal_lengths)
        generation_s = time.perf_counter() - t0
        bank = self.bank_build(refs)
        main = self.calibrated_cell(*half.take(a.cal_texts), refs, detail=True)
        by_keys = [main if r == refs else self.calibrated_cell(*half.take(a.cal_texts), r) for r in a.cal_reference_keys]
        by_texts = [main if n == a.cal_texts else self.calibrated_cell(*half.take(n), refs) for n in sorted(a.cal_texts_grid)]
        self.wm.reference_tables()  # back to the run's own R
        return {
            **self._keys_info(),
            "context_len": a.prompt_len,
            "text_lengths": [min(a.cal_lengths), max(a.cal_lengths)],
            "texts": a.cal_texts,
            "detect_batch_size": a.detect_batch_size,
            "detect_max_tokens": WatermarkConfig.detect_max_tokens,
            "text_generation_s": generation_s,
            "bank": bank,
            **{k: v for k, v in main.items() if k not in ("reference_keys", "stop_after", "texts")},
            "by_reference_keys": by_keys,
            "by_texts": by_texts,
        }

    def reference(self) -> dict[str, Any]:
        """Token-by-token reference vs the batched detector on the same texts (per scored token)."""
        a = self.args
        out = []
        warm = self.inputs.rows(1, 4, salt=9)[0]
        reference_detect(self.wm, warm, self.inputs.rows(1, a.prompt_len, salt=9)[0])
        self.wm.close()
        for length in a.reference_lengths:
            n = a.reference_texts
            prompts = self.inputs.rows(a.detect_batch_size, a.prompt_len, salt=4)
            texts = self.inputs.rows(a.detect_batch_size, length, salt=5)
            ref_times = []
            for i in range(n):
                _sync(self.device)
                t0 = time.perf_counter()
                reference_detect(self.wm, texts[i], prompts[i])
                _sync(self.device)
                ref_times.append(time.perf_counter() - t0)
                self.wm.close()
            per_text = statistics.median(ref_times)

            def detect(batch: int) -> Callable[[], Any]:
                return self.detector(texts[:batch], prompts[:batch], batch)

            t = compare({"batched": detect(a.detect_batch_size), "batch1": detect(1)}, a.repeats, a.warmup, self.device)
            ref_tps = length / per_text
            batched_tps = a.detect_batch_size * length / t["batched"]["median_s"]
            single_tps = length / t["batch1"]["median_s"]
            out.append(
                {
                    "text_len": length,
                    "reference_texts": n,
                    "reference_s_per_text": per_text,
                    "reference_times_s": ref_times,
                    "reference_tokens_per_s": ref_tps,
                    "batched_batch_size": a.detect_batch_size,
                    "batched_tokens_per_s": batched_tps,
                    "batch1_tokens_per_s": single_tps,
                    "speedup_batched": batched_tps / ref_tps,
                    "speedup_batch1": single_tps / ref_tps,
                }
            )
        return {"context_len": a.prompt_len, **self._keys_info(), "rows": out}

    def capture(self) -> dict[str, Any]:
        """Why moewm hooks the routers instead of asking for output_router_logits=True."""
        a = self.args
        prompts = self.inputs.rows(a.detect_batch_size, a.prompt_len, salt=2)
        texts = self.inputs.rows(a.detect_batch_size, a.text_len, salt=3)
        rows = [p + t for p, t in zip(prompts, texts)]
        plain = forward_fn(self.model, rows, self.pad)
        orl = forward_fn(self.model, rows, self.pad, router_logits=True)
        batch = len(rows)

        def hooked(features: bool) -> Callable[[], Any]:
            def run() -> Any:
                with self.hooks(True):
                    out = plain()
                    if features:
                        self.wm.capture_hooks.features(batch)
                    return out

            return run

        def unhooked(fn: Callable[[], Any]) -> Callable[[], Any]:
            def run() -> Any:
                with self.hooks(False):
                    return fn()

            return run

        fwd = compare(
            {"no_capture": unhooked(plain), "hooks": hooked(False), "hooks_and_features": hooked(True), "output_router_logits": unhooked(orl)},
            a.repeats,
            a.warmup,
            self.device,
        )
        for name, v in fwd.items():
            v["ratio_over_no_capture"] = ratio(fwd, name, "no_capture")
        prompts_g = self.inputs.rows(a.batch_size, a.prompt_len, salt=1)
        gplain = generate_fn(self.model, self.tokenizer, prompts_g, a.gen_len)
        gorl = generate_fn(self.model, self.tokenizer, prompts_g, a.gen_len, output_router_logits=True)

        def ghooked() -> Any:
            with self.hooks(True):
                return gplain()

        gen = compare({"no_capture": unhooked(gplain), "hooks": ghooked, "output_router_logits": unhooked(gorl)}, a.repeats, a.warmup, self.device)
        for name, v in gen.items():
            v["ratio_over_no_capture"] = ratio(gen, name, "no_capture")
        return {
            "forward": {"batch_size": batch, "tokens_per_row": len(rows[0]), "timings": fwd},
            "generation": {"batch_size": a.batch_size, "new_tokens": a.gen_len, "timings": gen},
        }

    def scaling(self) -> dict[str, Any]:
        a = self.args
        det = []
        for batch in a.scale_batches:
            for length in a.scale_lengths:
                t = compare(self.detection_fns(batch, length), a.scale_repeats, a.warmup, self.device, a.cell_budget)
                det.append(
                    {
                        "batch_size": batch,
                        "text_len": length,
                        **{f"{k}_s": v["median_s"] for k, v in t.items()},
                        **self.detection_ratios(t),
                        "detect_tokens_per_s": batch * length / t["detect"]["median_s"],
                        "capture_tokens_per_s": batch * length / t["capture"]["median_s"],
                        "repeats": len(t["forward"]["times_s"]),
                    }
                )
        defaults = [self._detect_with_defaults(max(a.scale_batches), length) for length in a.scale_lengths]
        gen = []
        for batch in a.gen_scale_batches:
            for length in a.gen_scale_lengths:
                t = compare(self.generation_fns(batch, length), a.scale_repeats, a.warmup, self.device, a.cell_budget)
                gen.append(
                    {
                        "batch_size": batch,
                        "new_tokens": length,
                        "plain_s": t["plain"]["median_s"],
                        "moe_lsh_s": t["moe_lsh"]["median_s"],
                        "kgw_s": t["kgw"]["median_s"],
                        "ratio_moe_lsh_over_plain": ratio(t, "moe_lsh", "plain"),
                        "ratio_kgw_over_plain": ratio(t, "kgw", "plain"),
                        "plain_tokens_per_s": batch * length / t["plain"]["median_s"],
                        "repeats": len(t["plain"]["times_s"]),
                    }
                )
        return {"context_len": a.prompt_len, **self._keys_info(), "detection": det, "detection_defaults": defaults, "generation": gen}

    def _detect_with_defaults(self, texts_n: int, length: int) -> dict[str, Any]:
        """``texts_n`` texts scored with the library's own batching (detect_batch_size, detect_max_tokens)."""
        a = self.args
        defaults = WatermarkConfig()
        prompts = self.inputs.rows(texts_n, a.prompt_len, salt=2)
        texts = self.inputs.rows(texts_n, length, salt=3)

        def run() -> Any:
            with self.settings(detect_batch_size=defaults.detect_batch_size, detect_max_tokens=defaults.detect_max_tokens):
                try:
                    return self.wm.detect_ids(texts, prompts)
                finally:
                    self.wm.close()

        t = compare({"defaults": run}, a.scale_repeats, a.warmup, self.device, a.cell_budget)["defaults"]
        return {
            "texts": texts_n,
            "text_len": length,
            "detect_batch_size": defaults.detect_batch_size,
            "detect_max_tokens": defaults.detect_max_tokens,
            "median_s": t["median_s"],
            "tokens_per_s": texts_n * length / t["median_s"],
        }

    def memory(self) -> dict[str, Any]:
        a = self.args
        with exact_rss() as exact:
            peaks: dict[str, int] = {}
            cases = {
                **{f"generation_{k}": v for k, v in self.generation_fns(a.batch_size, a.gen_len, kgw=False).items()},
                **{f"detection_{k}": v for k, v in self.detection_fns(a.detect_batch_size, a.text_len).items()},
            }
            for name, fn in cases.items():
                fn()  # warm: first-call allocations are not what we measure
                runs = []
                for _ in range(max(1, min(a.repeats, 3))):
                    with PeakMemory(self.device) as pm:
                        fn()
                    runs.append(pm.peak_bytes)
                peaks[name] = max(runs)
        model_bytes = param_bytes(self.model)
        enc_bytes = self.wm.encoder.nbytes()
        tables = self.wm.reference_tables()
        # What the hooks hold during a capture forward: the features of the whole batch.
        features_bytes = a.detect_batch_size * (a.prompt_len + a.text_len) * self.wm.capture_hooks.dim * 4
        method = "torch.cuda.max_memory_allocated" if self.device.type == "cuda" else "sampled RSS delta (psutil, 0.5 ms)"
        return {
            "method": method,
            "glibc_exact_rss": exact if self.device.type != "cuda" else None,
            "peak_bytes_above_start": peaks,
            "generation_extra_bytes": peaks["generation_moe_lsh"] - peaks["generation_plain"],
            "detection_extra_bytes": peaks["detection_detect"] - peaks["detection_forward_full_logits"],
            "capture_extra_bytes": peaks["detection_capture"] - peaks["detection_forward_full_logits"],
            "model_parameter_bytes": model_bytes,
            "watermark_encoder_bytes": enc_bytes,
            "watermark_fraction_of_model": enc_bytes / model_bytes,
            "reference_keys": tables.num_keys,
            "reference_bank_bytes": tables.bank.nbytes(),
            "reference_token_table_bytes": 0 if tables.table is None else tables.table.numel() * tables.table.element_size(),
            "detection_features_bytes": features_bytes,
            "process_max_rss_bytes": _max_rss(),
        }


def _finite_mean(values: Any) -> float:
    vals = [float(v) for v in values if math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def _finite_std(values: Any) -> float:
    vals = [float(v) for v in values if math.isfinite(float(v))]
    if len(vals) < 2:
        return float("nan")
    mean = sum(vals) / len(vals)
    return math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def _max_rss() -> Optional[int]:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except (ImportError, AttributeError):
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The project's targets, evaluated on this run."""
    rows = []

    def add(name: str, value: Optional[float], limit: float, higher_is_better: bool, note: str = "") -> None:
        met = None if value is None else (value >= limit if higher_is_better else value <= limit)
        rows.append({"target": name, "value": value, "limit": limit, "higher_is_better": higher_is_better, "met": met, "note": note})

    gen = result.get("generation")
    if gen:
        add("generation moe_lsh/plain", gen["ratio_moe_lsh_over_plain"], TARGETS["generation_watermarked_over_plain"], False)
        add("generation moe_lsh/plain below kgw/plain", gen["ratio_kgw_over_plain"] - gen["ratio_moe_lsh_over_plain"], 0.0, True, "kgw ratio minus moe_lsh ratio")
    det = result.get("detection")
    if det:
        add("capture (detection's forward) / forward with full logits", det["ratio_capture_over_forward_full_logits"], TARGETS["capture_over_forward"], False)
    cal = result.get("calibrated")
    if cal:
        name = result.get("model", {}).get("name", "")
        limit = CALIBRATED_TARGETS.get(name, CALIBRATED_TARGET_DEFAULT)
        note = f"{name}: {result.get('model', {}).get('num_layers', '?')} layers" if name in CALIBRATED_TARGETS else \
            f"no target for {name or 'this model'}: tiny_moe's limit shown"
        add(f"calibrated detection (R={cal['reference_keys']}, stop_after={cal['stop_after']}, half watermarked) / full-logits forward",
            cal["ratio_detect_over_forward_full_logits"], limit, False, note)
    ref = result.get("reference")
    if ref and ref["rows"]:
        rows_by_len = sorted(ref["rows"], key=lambda r: r["text_len"])
        at = [r for r in rows_by_len if r["text_len"] == 128] or [min(rows_by_len, key=lambda r: abs(r["text_len"] - 128))]
        add(f"batched detection / reference speed at {at[0]['text_len']} tokens", at[0]["speedup_batched"], TARGETS["reference_speedup_at_128"], True)
        if len(rows_by_len) > 1:
            first, last = rows_by_len[0], rows_by_len[-1]
            span = f"{first['text_len']} -> {last['text_len']} tokens"
            for key, label in (("speedup_batch1", "batch-1"), ("speedup_batched", f"batch-{first['batched_batch_size']}")):
                add(f"{label} speedup grows with length ({span})", last[key] / first[key], 1.0, True, "ratio of speedups")
    mem = result.get("memory")
    if mem:
        add("watermark tensors / model parameters", mem["watermark_fraction_of_model"], TARGETS["watermark_memory_fraction"], False)
    return rows


# -- report -----------------------------------------------------------------------------------------


def _mib(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


def _grid(title: str, rows: list[dict[str, Any]], column: str, column_label: str, cell: Callable[[dict[str, Any]], str]) -> list[str]:
    """A batch-size x ``column`` Markdown table of ``cell(row)`` ("-" where the grid has no row)."""
    batches = sorted({r["batch_size"] for r in rows})
    columns = sorted({r[column] for r in rows})
    by_key = {(r["batch_size"], r[column]): r for r in rows}
    lines = [title, "", f"| batch \\ {column_label} | " + " | ".join(str(n) for n in columns) + " |", "|---|" + "---:|" * len(columns)]
    for b in batches:
        cells = ["-" if (b, n) not in by_key else cell(by_key[(b, n)]) for n in columns]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return lines + [""]


def _calibrated_markdown(cal: dict[str, Any]) -> list[str]:
    lo, hi = cal["text_lengths"]
    t = cal["timings"]
    bank = cal["bank"]
    lines = [
        f"### Calibrated detection (R={cal['reference_keys']} reference keys, stop_after={cal['stop_after']}, statistic {cal['statistic']}; "
        f"{cal['texts']} texts of {lo}-{hi} tokens after {cal['context_len']} of context: {cal['watermarked_texts']} sampled with the "
        f"watermark, {cal['texts'] - cal['watermarked_texts']} plain samples; forward batches {cal['forward_batches']})",
        "",
        "| method | median s | / full-logits forward |",
        "|---|---:|---:|",
        f"| `detect_ids`: capture + calibrated scoring | {t['detect']['median_s']:.4f} | **{cal['ratio_detect_over_forward_full_logits']:.3f}** |",
        f"| capture alone | {t['capture']['median_s']:.4f} | {cal['ratio_capture_over_forward_full_logits']:.3f} |",
        f"| scoring alone (captures given) | {t['score']['median_s']:.4f} | {cal['ratio_score_over_forward_full_logits']:.3f} |",
        f"| full-logits forward over the same padded batches | {t['forward_full_logits']['median_s']:.4f} | 1 |",
        "",
        f"Scoring is {100 * cal['score_share_of_capture_plus_score']:.0f} % of capture + scoring. Reference keys scored per text: "
        f"watermarked {cal['mean_keys_watermarked']:.0f} (stopped early: {100 * cal['early_stop_share_watermarked']:.0f} %), "
        f"unwatermarked {cal['mean_keys_unwatermarked']:.0f} (stopped early: {100 * cal['early_stop_share_unwatermarked']:.0f} %). "
        f"Detected at alpha={cal['alpha']:g}: {100 * cal['detected_share_watermarked']:.0f} % of the watermarked texts, "
        f"{100 * cal['false_positive_share_unwatermarked']:.0f} % of the plain ones. Reference bank (not in the timings: built once, "
        f"cached in memory and on disk): {bank['reference_keys']} keys built from scratch in {bank['build_s']:.2f} s "
        f"({bank.get('pools', 'anchors')} pools, {bank.get('green_lists', 'bits')} green lists) + token table {bank['token_table_s']:.2f} s; "
        f"{_mib(bank['bank_bytes'])} + {_mib(bank['token_table_bytes'])} table. Texts sampled in {cal['text_generation_s']:.1f} s.",
        "",
    ]

    def table(title: str, rows: list[dict[str, Any]], first: str, key: str) -> list[str]:
        out = [title, "", f"| {first} | detect s | forward s | detect / forward | keys / watermarked text | keys / plain text | "
               "plain texts stopped early | repeats |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            out.append(
                f"| {r[key]} | {r['detect_s']:.3f} | {r['forward_full_logits_s']:.3f} | {r['ratio_detect_over_forward_full_logits']:.2f} | "
                f"{r['mean_keys_watermarked']:.0f} | {r['mean_keys_unwatermarked']:.0f} | {100 * r['early_stop_share_unwatermarked']:.0f} % | "
                f"{r['repeats']} |"
            )
        return out + [""]

    lines += table(f"Scaling with the number of reference keys ({cal['texts']} texts, half watermarked):", cal["by_reference_keys"], "R", "reference_keys")
    lines += table(f"Scaling with the number of texts (R={cal['reference_keys']}, half watermarked):", cal["by_texts"], "texts", "texts")
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The Markdown tables of a result (what BENCHMARKS.md keeps)."""
    lines: list[str] = [f"Command: `{result['command']}`", ""]
    m, mc = result["model"], result["machine"]
    lines.append(
        f"Model `{m['name']}` ({m['model_type']}, {m['parameters'] / 1e6:.2f} M parameters, {m['num_layers']} layers, "
        f"vocab {m['vocab_size']}, {m['dtype']}) on {mc['device']} ({mc['cpu']}, {mc['cpu_count']} cores, "
        f"{mc['torch_threads']} torch threads{', ' + mc['gpu'] if 'gpu' in mc else ''}); torch {mc['torch']}, "
        f"transformers {mc['transformers']}; load average {result['load_average']['start']} at start, {result['load_average']['end']} at end. "
        "Times are medians of the repeats; ratios are medians of the per-round ratios (methods interleaved in one round)."
    )
    lines.append("")
    gen = result.get("generation")
    if gen:
        lines += [
            f"### Generation (batch {gen['batch_size']}, prompt {gen['prompt_len']}, {gen['new_tokens']} new tokens, greedy)",
            "",
            "| method | median s | tokens/s | / plain |",
            "|---|---:|---:|---:|",
        ]
        for name, label in (("plain", "plain generate"), ("moe_lsh", "MoE-LSH watermark"), ("kgw", "KGW (transformers WatermarkingConfig)")):
            t = gen["timings"][name]
            r = {"plain": 1.0, "moe_lsh": gen["ratio_moe_lsh_over_plain"], "kgw": gen["ratio_kgw_over_plain"]}[name]
            lines.append(f"| {label} | {t['median_s']:.3f} | {t['tokens_per_s']:.0f} | {r:.3f} |")
        s = gen["sanity"]
        lines += [
            "",
            f"Sanity ({s['texts']} texts each; calibrated p-value over R={s['reference_keys']} reference keys, positives at "
            f"alpha={s['alpha']:g}; diagnostic z mean ± std): timed MoE-LSH output p median {s['p_moe_lsh_greedy_median']:.3g}, "
            f"{s['detected_moe_lsh_greedy']} detected, z {s['z_moe_lsh_greedy_mean']:.2f} ± {s['z_moe_lsh_greedy_std']:.2f}; "
            f"timed plain greedy output p median {s['p_plain_greedy_median']:.3g}, {s['detected_plain_greedy']} detected, "
            f"z {s['z_plain_greedy_mean']:.2f} ± {s['z_plain_greedy_std']:.2f}; plain output sampled at temperature 1 "
            f"p median {s['p_plain_sampled_median']:.3g}, {s['detected_plain_sampled']} detected, z {s['z_plain_sampled_mean']:.2f} ± "
            f"{s['z_plain_sampled_std']:.2f} (the p-value holds for any text written without the key; the diagnostic z only for "
            "temperature-1 samples).",
            "",
        ]
    det = result.get("detection")
    if det:
        lines += [
            f"### Detection (batch {det['batch_size']}, {det['context_len']} context + {det['text_len']} scored tokens per text, "
            f"random tokens, none watermarked; R={det['reference_keys']}, stop_after={det['stop_after']}, statistic {det['statistic']})",
            "",
            "| method | median s | scored tokens/s |",
            "|---|---:|---:|",
        ]
        for name, label in (
            ("detect", "`detect_ids`: capture + calibrated scoring"),
            ("capture", "capture alone (one forward, output head in blocks)"),
            ("forward_full_logits", "one plain forward, full logits"),
            ("forward", "one plain forward, logits_to_keep=1"),
        ):
            t = det["timings"][name]
            lines.append(f"| {label} | {t['median_s']:.4f} | {t['scored_tokens_per_s']:.0f} |")
        lines += [
            "",
            f"detection / forward with full logits: **{det['ratio_detect_over_forward_full_logits']:.3f}**; "
            f"capture / forward with full logits: **{det['ratio_capture_over_forward_full_logits']:.3f}**; "
            f"detection / forward with logits_to_keep=1: {det['ratio_detect_over_forward']:.3f}. "
            f"Reference keys scored per text: {det['mean_reference_keys_scored']:.1f} on average; "
            f"a capture holds {det['capture_bytes_per_scored_token']:.0f} bytes per scored token.",
            "",
        ]
    cal = result.get("calibrated")
    if cal:
        lines += _calibrated_markdown(cal)
    ref = result.get("reference")
    if ref:
        lines += [
            "### Batched detector vs token-by-token reference (`reference_detect`)",
            "",
            "| text tokens | reference tokens/s | batched tokens/s (batch) | speedup | batch-1 speedup |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in ref["rows"]:
            lines.append(
                f"| {r['text_len']} | {r['reference_tokens_per_s']:.0f} | {r['batched_tokens_per_s']:.0f} ({r['batched_batch_size']}) | "
                f"{r['speedup_batched']:.1f}x | {r['speedup_batch1']:.1f}x |"
            )
        lines.append("")
    cap = result.get("capture")
    if cap:
        f, g = cap["forward"], cap["generation"]
        lines += [
            f"### Routing capture cost (forward: batch {f['batch_size']} x {f['tokens_per_row']} tokens; generation: batch {g['batch_size']} x {g['new_tokens']} new tokens)",
            "",
            "| capture | forward s | / none | generation s | / none |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, label in (
            ("no_capture", "none"),
            ("hooks", "moewm forward hooks"),
            ("hooks_and_features", "hooks + features (softmax, concat)"),
            ("output_router_logits", "output_router_logits=True (+ aux loss)"),
        ):
            ft = f["timings"][name]
            gt = g["timings"].get(name)
            gcol = f"{gt['median_s']:.3f} | {gt['ratio_over_no_capture']:.3f}" if gt else "- | -"
            lines.append(f"| {label} | {ft['median_s']:.4f} | {ft['ratio_over_no_capture']:.3f} | {gcol} |")
        lines.append("")
    sc = result.get("scaling")
    if sc:
        lines += _grid(
            f"### Detection scaling (context {sc['context_len']}, random-token texts, R={sc['reference_keys']}): detection / full-logits forward, "
            "capture / full-logits forward; detection seconds and scored tokens/s",
            sc["detection"],
            "text_len",
            "text tokens",
            lambda r: f"{r['ratio_detect_over_forward_full_logits']:.2f} / {r['ratio_capture_over_forward_full_logits']:.2f} "
            f"({r['detect_s']:.3f} s, {r['detect_tokens_per_s']:.0f}/s)",
        )
        dd = sc.get("detection_defaults") or []
        if dd:
            lines += [
                f"With the library's own batching (detect_batch_size={dd[0]['detect_batch_size']}, detect_max_tokens={dd[0]['detect_max_tokens']}), "
                f"{dd[0]['texts']} texts: "
                + ", ".join(f"{r['text_len']} tokens {r['tokens_per_s']:.0f}/s" for r in dd)
                + ".",
                "",
            ]
        if sc["generation"]:
            lines += _grid(
                "### Generation scaling: MoE-LSH / plain and KGW / plain (plain tokens/s)",
                sc["generation"],
                "new_tokens",
                "new tokens",
                lambda r: f"{r['ratio_moe_lsh_over_plain']:.3f} / {r['ratio_kgw_over_plain']:.3f} ({r['plain_tokens_per_s']:.0f}/s)",
            )
    mem = result.get("memory")
    if mem:
        pk = mem["peak_bytes_above_start"]
        lines += [
            f"### Memory ({mem['method']})",
            "",
            "| what | bytes |",
            "|---|---:|",
            f"| model parameters + buffers | {_mib(mem['model_parameter_bytes'])} |",
            f"| watermark encoder tensors (`LSHEncoder.nbytes()`) | {_mib(mem['watermark_encoder_bytes'])} ({100 * mem['watermark_fraction_of_model']:.3f} % of the model) |",
            f"| reference bank, {mem['reference_keys']} keys (`KeyBank.nbytes()`; public, cached) | {_mib(mem['reference_bank_bytes'])} |",
            f"| its token table (vocabulary x keys x words) | {_mib(mem['reference_token_table_bytes'])} |",
            f"| routing features held per detection batch | {_mib(mem['detection_features_bytes'])} |",
            f"| peak above start: plain generation | {_mib(pk['generation_plain'])} |",
            f"| peak above start: MoE-LSH generation | {_mib(pk['generation_moe_lsh'])} |",
            f"| peak above start: plain forward, logits_to_keep=1 | {_mib(pk['detection_forward'])} |",
            f"| peak above start: plain forward, full logits | {_mib(pk['detection_forward_full_logits'])} |",
            f"| peak above start: capture | {_mib(pk['detection_capture'])} |",
            f"| peak above start: MoE-LSH detection (capture + calibrated scoring) | {_mib(pk['detection_detect'])} |",
            "",
        ]
    tg = result.get("targets")
    if tg:
        lines += ["### Targets", "", "| target | value | limit | met |", "|---|---:|---:|---|"]
        for t in tg:
            value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
            op = ">=" if t["higher_is_better"] else "<="
            lines.append(f"| {t['target']} | {value} | {op} {t['limit']} | {'yes' if t['met'] else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


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
        "load_average": {"start": _loadavg()},
    }
    started = time.perf_counter()
    for name in chosen:
        t0 = time.perf_counter()
        log.info("bench: %s ...", name)
        result[name] = getattr(bench, name)()
        result.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
        result["load_average"][f"after_{name}"] = _loadavg()
        if checkpoint is not None:
            checkpoint(result)
    result["total_seconds"] = time.perf_counter() - started
    result["load_average"]["end"] = _loadavg()
    result["targets"] = targets(result)
    return result


def _loadavg() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _json_safe(value: Any) -> Any:
    """NaN / inf become null (strict JSON); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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
        out.write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n")

    result = run(args, checkpoint=write)  # partial results land in --out as sections finish
    write(result)
    table = markdown(result)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
