"""Would a fused kernel bring the shipped tournament's generation to 1.10x plain on tiny_moe? A measured answer.

The whole-vocabulary tournament (:func:`moewm.engine.tournament_sampling.whole_vocabulary_log_ratios`) written as one
numba loop per row (layer codes, bins, the group's layers, the log multipliers: one pass each, no (B, V) temporaries),
swapped in for the torch path inside the real decoding loop. Plain sampling, the shipped torch path and the fused
path run interleaved, round after round, in one process (16 prompts x 64 new tokens, pure sampling, one thread): the
bench's generation setting. Prints each round's seconds, the medians and both ratios, and checks that the fused path
samples the same texts as the torch path (same seed per round).

A probe, not a feature: numba (with llvmlite, about 200 MB) is not a dependency of moewm.
    pip install numba && python scripts/fused_sampling_probe.py [--rounds 6]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time

import numpy as np
import torch

try:
    from numba import njit
except ImportError:  # the probe's one extra dependency, named
    sys.exit("scripts/fused_sampling_probe.py needs numba, which moewm does not depend on: pip install numba")

import moewm.engine.tournament as tournament
from moewm import ModelConfig, WatermarkConfig, WatermarkKey, build_watermarker, load_model
from moewm.config import GenerationConfig
from moewm.engine.tournament_sampling import GROUP_BITS, Workspace


@njit(cache=False, boundscheck=False)
def _fused(mass, hashes, ctx, active, out, codes, group_bits):  # pragma: no cover - compiled
    b, v = mass.shape
    m = ctx.shape[1]
    hu = hashes.astype(np.uint64) & np.uint64(0xFFFFFFFF)
    for r in range(b):
        row = mass[r]
        total = 0.0
        for x in range(v):
            total += row[x]
        total = max(total, 1e-300)
        start = 0
        while start < m:
            stop = min(m, start + group_bits)
            k = stop - start
            nb = 1 << k
            codes[:] = 0
            for j in range(k):
                c = np.uint64(ctx[r, start + j]) & np.uint64(0xFFFFFFFF)
                for x in range(v):  # bit 31 of context x token hash mod 2^32: the g-value (as the torch path)
                    codes[x] |= np.int64(((c * hu[x]) >> np.uint64(31)) & np.uint64(1)) << j
            bins = np.zeros(nb)
            for x in range(v):
                bins[codes[x]] += row[x]
            cur = bins / total
            for j in range(k):
                if not active[r, start + j]:
                    continue
                played = 0.0
                for i in range(nb):
                    if (i >> j) & 1:
                        played += cur[i]
                for i in range(nb):
                    cur[i] *= max(((i >> j) & 1) + 1.0 - played, 0.0)
            w = np.ones(nb)
            for i in range(nb):
                if bins[i] > 0:
                    w[i] = cur[i] * total / bins[i]
            lw = np.log(w)
            for x in range(v):
                out[r, x] = lw[codes[x]] if start == 0 else out[r, x] + lw[codes[x]]
            if stop < m:
                for x in range(v):
                    row[x] *= w[codes[x]]
            start = stop


def fused_log_ratios(mass: torch.Tensor, hashed32: torch.Tensor, contexts32: torch.Tensor, active, work: Workspace) -> torch.Tensor:
    """Drop-in for ``whole_vocabulary_log_ratios`` (CPU, float64 masses)."""
    b, v = mass.shape
    out = work.buffer("log_ratio", (b, v), torch.float64, mass.device)
    codes = work.buffer("fused_codes", (v,), torch.long, mass.device)
    act = np.ones(tuple(contexts32.shape), dtype=np.bool_) if active is None else active.cpu().numpy()
    _fused(mass.numpy(), hashed32.reshape(-1).numpy(), contexts32.numpy(), act, out.numpy(), codes.numpy(), GROUP_BITS)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shipped = tournament.whole_vocabulary_log_ratios
    model, tok = load_model(ModelConfig())
    wm = build_watermarker("moe_tournament", model, tok, WatermarkConfig(), WatermarkKey("fused-sampling-probe"))
    prompts = torch.randint(100, 8000, (16, 16), generator=torch.Generator().manual_seed(0)).tolist()
    gen = GenerationConfig(max_new_tokens=64, min_new_tokens=64, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, batch_size=16)
    paths = {"plain": (shipped, False), "torch": (shipped, True), "fused": (fused_log_ratios, True)}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for rnd in range(args.rounds + 1):  # round 0 warms up (and compiles the kernel)
        digests = {}
        for name, (fn, marked) in paths.items():
            tournament.whole_vocabulary_log_ratios = fn
            torch.manual_seed(rnd)
            t0 = time.perf_counter()
            texts = wm.generate_from_ids(prompts, gen, watermark=marked)
            seconds = time.perf_counter() - t0
            digests[name] = hashlib.sha1(repr(texts).encode()).hexdigest()[:12]
            if rnd:
                times[name].append(seconds)
        tournament.whole_vocabulary_log_ratios = shipped
        same = digests["torch"] == digests["fused"]
        print(f"round {rnd}{' (warm-up)' if not rnd else ''}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items() if rnd)
              + f" texts torch = fused: {same}")
        if not same:
            sys.exit("the fused path sampled other texts than the torch path")
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"medians over {args.rounds} rounds: " + ", ".join(f"{n} {s:.3f} s" for n, s in med.items()))
    print(f"generation / plain: torch {med['torch'] / med['plain']:.3f}, fused {med['fused'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
