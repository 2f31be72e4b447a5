"""The timing harness: interleaved repeats with medians and per-round ratios, peak memory, fixed inputs, the machine."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from transformers import LogitsProcessorList

from moewm.config import GenerationConfig
from moewm.engine.capture import detection_batches
from moewm.engine.generation import usable_tokens
from moewm.engine.padding import pad_id, pad_rows

log = logging.getLogger(__name__)

# -- timing -----------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
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
        sync(device)
        t0 = time.perf_counter()
        for fn in fns.values():
            fn()
        sync(device)
        round_s = time.perf_counter() - t0
    if budget_s is not None and round_s > 0:
        repeats = min(repeats, int(budget_s // round_s))
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(max(1, repeats)):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotated: no method always runs first
            fn = fns[name]
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
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


def forward_batches_fn(model: torch.nn.Module, rows: Sequence[Sequence[int]], pad: int, batch_size: int,
                       max_tokens: Optional[int]) -> tuple[Callable[[], Any], list[int]]:
    """Full-logits forwards over the padded batches the capture makes of ``rows`` (longest first, at most
    ``batch_size`` rows and ``max_tokens`` padded tokens each: :func:`moewm.engine.capture.detection_batches`);
    returns the callable and the batch sizes."""
    order = np.argsort([-len(r) for r in rows], kind="stable")
    spans = detection_batches([len(rows[i]) for i in order], batch_size, max_tokens)
    fns = [forward_fn(model, [rows[i] for i in order[s:e]], pad, full_logits=True) for s, e in spans]

    def run() -> None:
        for fn in fns:
            fn()

    return run, [e - s for s, e in spans]


def mean_of(values: Any) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()) if arr.size else float("nan")


def finite_mean(values: Any) -> float:
    vals = [float(v) for v in values if math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def finite_std(values: Any) -> float:
    vals = [float(v) for v in values if math.isfinite(float(v))]
    if len(vals) < 2:
        return float("nan")
    mean = sum(vals) / len(vals)
    return math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def max_rss() -> Optional[int]:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except (ImportError, AttributeError):
        return None


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows: every recorded timing names its machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu_model(),
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


def loadavg() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None

