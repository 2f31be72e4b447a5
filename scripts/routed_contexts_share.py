"""How much of a model's own text a routed_contexts table covers (watermark.tournament.routed_contexts).

The table is built from the shipped human corpora (moewm.schemes.common_contexts); an attacker learns from the
model's answers. This reads an answer corpus of scripts/stealing_corpora.py (the model's plain answers by default)
and prints the share of answer positions whose two tokens before are routed, and how many of the contexts that the
answers repeat most the table holds:

    python scripts/routed_contexts_share.py --model tiny_moe --count 16384
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moewm import ModelConfig, load_model
from moewm.engine.tournament import tokens_hash
from moewm.schemes.common_contexts import common_contexts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_moe", help="embedded model whose tokenizer builds the table")
    parser.add_argument("--count", type=int, default=16384, help="routed_contexts: the table's size")
    parser.add_argument("--corpus", default=None, help="answer corpus (.jsonl of stealing_corpora.py); default: outputs/stealing/corpora/MODEL/plain.jsonl")
    parser.add_argument("--top", type=int, default=1000, help="how many of the answers' most frequent contexts to look up")
    args = parser.parse_args()
    path = Path(args.corpus or f"outputs/stealing/corpora/{args.model}/plain.jsonl")
    if not path.is_file():
        raise SystemExit(f"--corpus {path}: no such file (scripts/stealing_corpora.py --model {args.model} --name plain writes it)")
    _, tokenizer = load_model(ModelConfig(name=args.model))
    table = common_contexts(tokenizer, 2, args.count)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    pairs = torch.cat([torch.tensor(r["prompt_ids"][-2:] + r["ids"]).unfold(0, 2, 1)[: len(r["ids"])] for r in rows])
    hashed = tokens_hash(pairs)
    contexts, counts = torch.unique(hashed, return_counts=True)
    frequent = torch.argsort(counts, descending=True, stable=True)[: args.top]
    print(f"{args.model}, routed_contexts={args.count}, {path} ({len(rows)} answers, {pairs.shape[0]} positions):")
    print(f"  positions routed: {float(torch.isin(hashed, table).double().mean()):.3f}")
    print(f"  of the answers' {len(frequent)} most frequent contexts (holding {float(counts[frequent].sum() / counts.sum()):.3f} "
          f"of the positions), routed: {float(torch.isin(contexts[frequent], table).double().mean()):.3f}")


if __name__ == "__main__":
    main()
