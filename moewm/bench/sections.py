"""The benchmark's sections (generation, detection, calibrated detection, reference, capture, scaling, memory) and
their targets, on one model loaded once; and ``quantization``, the two quantization backends side by side on the
micro checkpoints of the tests (built here, whatever model was loaded)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from transformers import WatermarkingConfig

from moewm.bench.harness import (
    Inputs,
    PeakMemory,
    compare,
    exact_rss,
    finite_mean,
    finite_std,
    forward_batches_fn,
    forward_fn,
    generate_fn,
    max_rss,
    mean_of,
    param_bytes,
    ratio,
    sync,
)
from moewm.bench.reference_detector import reference_detect
from moewm.config import (
    EncoderConfig,
    ExtractorConfig,
    KGWConfig,
    ModelConfig,
    WatermarkConfig,
)
from moewm.engine import keybank
from moewm.engine.generation import (
    TokenizerVocabularyMask,
    model_vocab_size,
    usable_tokens,
)
from moewm.engine.keys import WatermarkKey
from moewm.engine.padding import pad_id
from moewm.engine.scoring import BankTables
from moewm.schemes.moe_lsh import MoELSHWatermark

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

SECTIONS = ("generation", "detection", "calibrated", "schemes", "reference", "capture", "scaling", "memory", "quantization")
# The shipped design (the routing tournament) in the ``schemes`` section, per model: its sampling against plain
# sampling (16 prompts x 64 new tokens, one thread), and its calibrated detection against a full-logits forward.
TOURNAMENT_GENERATION_TARGETS = {"tiny_moe": 1.10, "qwen_moe": 1.03}
TOURNAMENT_GENERATION_TARGET_DEFAULT = 1.10
# memory.backend=bitsandbytes: experts at most this fraction of their bf16 bytes (NF4) on the micro checkpoints
QUANTIZED_EXPERTS_TARGET = 0.30


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
    from moewm.models.loading import load_model, pick_device

    if args.model == "micro" and not args.model_config:
        from moewm.models.micro import byte_tokenizer, micro_model

        device = pick_device(args.device or "auto")
        model = micro_model(args.micro_family).to(device=device, dtype=getattr(torch, args.dtype or "float32"))
        tokenizer = byte_tokenizer()
        info: dict[str, Any] = {"name": f"micro-{args.micro_family}", "source": "moewm.models.micro.micro_model (random init)"}
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


def default_pool_size(tokenizer: Any, vocab_size: int, num_bits: int) -> int:
    """The library's pool size, or usable tokens / (2 x num_bits) when smaller: about half the bits are set,
    so green lists then cover about a quarter of the usable tokens instead of all of them."""
    usable = int(usable_tokens(tokenizer, vocab_size).sum())
    return max(1, min(EncoderConfig.pool_size, usable // (2 * num_bits)))


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
        watermark = WatermarkConfig(delta=args.delta, kgw=KGWConfig(gamma=args.kgw_gamma), reference_keys=refs, stop_after=args.stop_after,
                                    alpha=max(WatermarkConfig.alpha, 1.0 / (refs + 1)))
        cache_dir = None if str(args.cache_dir).lower() == "none" else args.cache_dir
        self.cache_dir = cache_dir
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
            greenlist_ratio=cfg.kgw.gamma, bias=cfg.delta, seeding_scheme=cfg.kgw.seeding_scheme, context_width=cfg.kgw.context_width
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
                out[f"z_{name}_mean"], out[f"z_{name}_std"] = finite_mean(d.z_score), finite_std(d.z_score)
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
            "mean_reference_keys_scored": mean_of(keep[0].num_reference_keys) if keep else float("nan"),
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
        sync(self.device)
        t0 = time.perf_counter()
        bank = keybank.build_bank(self.wm.encoder_cfg, keybank.reference_keys(count), self.wm.capture_hooks.dim, emb,
                                  self.wm.encoder.usable, self.wm.vocab_size)
        sync(self.device)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        tables = BankTables.of(bank, self.device)
        sync(self.device)
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
            "mean_keys_watermarked": mean_of(keys[m]),
            "mean_keys_unwatermarked": mean_of(keys[~m]),
            "early_stop_share_watermarked": mean_of(keys[m] < refs),
            "early_stop_share_unwatermarked": mean_of(keys[~m] < refs),
            "detected_share_watermarked": mean_of(np.asarray(out.prediction)[m]),
            "false_positive_share_unwatermarked": mean_of(np.asarray(out.prediction)[~m]),
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

    def schemes(self) -> dict[str, Any]:
        """Every scheme of the registry: generation against plain sampling, detection against a forward (moewm.bench.schemes)."""
        from moewm.bench.schemes import schemes_section

        return schemes_section(self)

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
                sync(self.device)
                t0 = time.perf_counter()
                reference_detect(self.wm, texts[i], prompts[i])
                sync(self.device)
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

    def _timed_grid(self, batches: Sequence[int], lengths: Sequence[int], fns: Callable[[int, int], Any],
                    row: Callable[[int, int, dict[str, Any]], dict[str, Any]]) -> list[dict[str, Any]]:
        """One row per (batch, length) cell: ``fns(batch, length)`` compared, then described by ``row``."""
        a = self.args
        return [row(batch, length, compare(fns(batch, length), a.scale_repeats, a.warmup, self.device, a.cell_budget))
                for batch in batches for length in lengths]

    def scaling(self) -> dict[str, Any]:
        a = self.args
        det = self._timed_grid(a.scale_batches, a.scale_lengths, self.detection_fns, lambda batch, length, t: {
            "batch_size": batch,
            "text_len": length,
            **{f"{k}_s": v["median_s"] for k, v in t.items()},
            **self.detection_ratios(t),
            "detect_tokens_per_s": batch * length / t["detect"]["median_s"],
            "capture_tokens_per_s": batch * length / t["capture"]["median_s"],
            "repeats": len(t["forward"]["times_s"]),
        })
        defaults = [self._detect_with_defaults(max(a.scale_batches), length) for length in a.scale_lengths]
        gen = self._timed_grid(a.gen_scale_batches, a.gen_scale_lengths, self.generation_fns, lambda batch, length, t: {
            "batch_size": batch,
            "new_tokens": length,
            "plain_s": t["plain"]["median_s"],
            "moe_lsh_s": t["moe_lsh"]["median_s"],
            "kgw_s": t["kgw"]["median_s"],
            "ratio_moe_lsh_over_plain": ratio(t, "moe_lsh", "plain"),
            "ratio_kgw_over_plain": ratio(t, "kgw", "plain"),
            "plain_tokens_per_s": batch * length / t["plain"]["median_s"],
            "repeats": len(t["plain"]["times_s"]),
        })
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

    def quantization(self) -> dict[str, Any]:
        return quantization_backends(self.args)

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
            "process_max_rss_bytes": max_rss(),
        }


def quantization_backends(args: argparse.Namespace) -> dict[str, Any]:
    """memory.backend=bitsandbytes against moewm's own module, int8 and NF4, on the big micro checkpoints.

    Per family and variant: expert bytes (measured, and the estimator's formula), bits per expert weight,
    the share of bf16's expert bytes; greedy decode speed (batch 4, paired rounds, the ratio
    bitsandbytes / moewm per scheme); LSH signature agreement with the float32 model and with its bf16
    copy (all router layers, 16 and 64 bits). Models are float32 micro models cast to bf16, compute in bf16.
    """
    from moewm.config import MemoryConfig
    from moewm.evaluation.signature_agreement import signature_flip_rate
    from moewm.models.footprint import model_nbytes
    from moewm.models.micro import MICRO_BIG_OVERRIDES, byte_tokenizer, micro_model
    from moewm.models.quantize import QuantizedExperts, fused_experts_layout, plan_quantization, quantize_model, quantized_nbytes
    from moewm.models.quantize_bnb import availability

    bnb_reason = availability("cpu")
    backends = ["moewm"] + (["bitsandbytes"] if bnb_reason is None else [])
    new_tokens = 4 if args.smoke else 32
    n_texts, text_len = (2, 16) if args.smoke else (8, 96)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 259, (4, 8), generator=gen).tolist()
    texts = torch.randint(3, 259, (n_texts, text_len), generator=gen).tolist()
    tok = byte_tokenizer()
    key = WatermarkKey(BENCH_SECRET, 0)
    out: dict[str, Any] = {"backends": backends, "bitsandbytes_unavailable": bnb_reason, "new_tokens": new_tokens, "batch_size": len(prompts),
                           "signature_texts": n_texts, "signature_text_len": text_len, "families": {}}
    try:
        import bitsandbytes

        out["bitsandbytes_version"] = bitsandbytes.__version__
    except Exception:
        out["bitsandbytes_version"] = None
    for family in ("qwen2_moe", "mixtral"):
        full = micro_model(family, **MICRO_BIG_OVERRIDES[family])
        bf16 = copy.deepcopy(full).to(torch.bfloat16)
        expert_params = sum(p.numel() for p in full.parameters() if p.dim() == 3)
        bf16_expert_bytes = 2 * expert_params
        variants: dict[str, torch.nn.Module] = {"bf16": bf16}
        rows: dict[str, dict[str, Any]] = {"bf16": {"total_bytes": model_nbytes(bf16), "expert_bytes": bf16_expert_bytes,
                                                    "expert_bytes_estimated": bf16_expert_bytes}}
        for scheme in ("int8", "nf4"):
            for backend in backends:
                mem = MemoryConfig(quantization=scheme, double_quant=scheme == "nf4", compute_dtype="bfloat16", backend=backend)
                model = copy.deepcopy(full).to(torch.bfloat16)
                plan = plan_quantization(model, mem)
                estimated = sum(
                    quantized_nbytes(shape, scheme, mem.double_quant, backend=backend,
                                     transposed=bool(getattr(model.get_submodule(item.name), "is_transposed", False)))
                    for item in plan.items if item.kind == "experts" and fused_experts_layout(model.get_submodule(item.name))
                    for shape in item.shapes
                )
                t0 = time.perf_counter()
                quantize_model(model, mem)
                quantize_s = time.perf_counter() - t0
                measured = sum(model_nbytes(m) for m in model.modules() if isinstance(m, QuantizedExperts))
                name = f"{scheme}/{backend}"
                variants[name] = model
                rows[name] = {"total_bytes": model_nbytes(model), "expert_bytes": measured, "expert_bytes_estimated": estimated,
                              "quantize_s": quantize_s}
        for name, row in rows.items():
            row["expert_bits_per_weight"] = 8 * row["expert_bytes"] / expert_params
            row["expert_fraction_of_bf16"] = row["expert_bytes"] / bf16_expert_bytes
            row["total_fraction_of_bf16"] = row["total_bytes"] / rows["bf16"]["total_bytes"]
        # decode speed: greedy generation, every variant in each round
        fns = {name: generate_fn(m, tok, prompts, new_tokens) for name, m in variants.items()}
        t = compare(fns, args.repeats, args.warmup, torch.device("cpu"))
        for name in variants:
            rows[name]["decode_median_s"] = t[name]["median_s"]
            rows[name]["decode_tokens_per_s"] = len(prompts) * new_tokens / t[name]["median_s"]
            rows[name]["ratio_decode_time_over_bf16"] = ratio(t, name, "bf16")
        ratios = {}
        if "bitsandbytes" in backends:
            for scheme in ("int8", "nf4"):
                ratios[scheme] = ratio(t, f"{scheme}/bitsandbytes", f"{scheme}/moewm")
        # signature agreement with the float32 model and with its unquantized bf16 copy
        for bits in (16, 64):
            enc = EncoderConfig(num_bits=bits, pool_size=2)
            for name, m in variants.items():
                for ref_name, ref in (("float32", full), ("bf16", bf16)):
                    if m is ref:
                        continue
                    agreement = signature_flip_rate(ref, m, tok, texts, ExtractorConfig(), enc, key)
                    rows[name][f"bits{bits}_vs_{ref_name}_bit_flip_rate"] = agreement.bit_flip_rate
                    rows[name][f"bits{bits}_vs_{ref_name}_signature_change_rate"] = agreement.signature_change_rate
                    rows[name]["signature_positions"] = agreement.positions
        out["families"][family] = {"expert_params": expert_params, "variants": rows,
                                   "ratio_decode_time_bitsandbytes_over_moewm": ratios}
    return out


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
    sch = result.get("schemes")
    if sch:
        name = result.get("model", {}).get("name", "")
        for r in sch["rows"]:
            if r["kind"] != "moe_tournament":
                continue
            gen_limit = TOURNAMENT_GENERATION_TARGETS.get(name, TOURNAMENT_GENERATION_TARGET_DEFAULT)
            note = "" if name in TOURNAMENT_GENERATION_TARGETS else f"no target for {name or 'this model'}: tiny_moe's limit shown"
            add(f"shipped tournament generation / plain sampling ({sch['batch_size']} x {sch['new_tokens']})", r["ratio_generation_over_plain"],
                gen_limit, False, note)
            add(f"shipped tournament calibrated detection (R={sch['reference_keys']}, half watermarked) / full-logits forward",
                r["ratio_detect_over_forward_full_logits"], CALIBRATED_TARGETS.get(name, CALIBRATED_TARGET_DEFAULT), False, note)
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
    quant = result.get("quantization")
    if quant:
        for family, f in quant["families"].items():
            row = f["variants"].get("nf4/bitsandbytes")
            add(f"bitsandbytes NF4 experts / bf16 experts, micro {family}", None if row is None else row["expert_fraction_of_bf16"],
                QUANTIZED_EXPERTS_TARGET, False, "" if row else f"bitsandbytes unavailable: {quant['bitsandbytes_unavailable']}")
    mem = result.get("memory")
    if mem:
        add("watermark tensors / model parameters", mem["watermark_fraction_of_model"], TARGETS["watermark_memory_fraction"], False)
    return rows

