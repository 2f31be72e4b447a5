"""How predictable the shipped design's routing blocks are from the tokens before (moewm.evaluation.routing_predictability).

    python scripts/routing_predictability.py --model tiny_moe --count 1000 [--corpus shipped] [--out benchmarks]

Reads the first --count responses of the stealing study's corpus (outputs/stealing/corpora/<model>/<corpus>.jsonl,
written by scripts/stealing_corpora.py), captures them once under the corpus's deployed key and writes
<out>/routing_predictability_<model>.{csv,md}: per block size, the collision rate of each layer's block code among
positions sharing 0, 1 or 2 tokens before.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moewm.config import EncoderConfig, ExtractorConfig, ModelConfig, WatermarkConfig
from moewm.engine.keys import WatermarkKey
from moewm.evaluation.routing_predictability import study
from moewm.evaluation.stealing_corpus import read_corpus, read_meta
from moewm.models.loading import load_model
from moewm.schemes.registry import build_watermarker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny_moe", "tiny_olmoe"), default="tiny_moe")
    parser.add_argument("--corpus", default="shipped")
    parser.add_argument("--corpora", default="outputs/stealing/corpora")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--secret", default="stealing-study-secret", help="the corpus's study secret (checked against its fingerprint)")
    parser.add_argument("--extractor", default="{}", help='ExtractorConfig fields as JSON, e.g. \'{"start_layer_idx": 6}\' (which MoE layers\' routing is hashed)')
    parser.add_argument("--out", default="benchmarks")
    args = parser.parse_args()
    path = Path(args.corpora) / args.model / f"{args.corpus}.jsonl"
    meta = read_meta(path)
    extractor = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExtractorConfig), json.loads(args.extractor)))
    extractor.validate()
    if meta.get("watermark") is None:  # plain text: the shipped design under the study key reads its routing
        meta["watermark"], meta["key_fingerprint"] = {}, WatermarkKey(args.secret, 0).fingerprint
    if meta["watermark"].get("kind", "moe_tournament") != "moe_tournament":
        parser.error(f"--corpus={args.corpus}: needs plain text or text of the routing tournament (its meta names {meta['watermark']})")
    seed = int(meta["key_fingerprint"].rsplit("/s", 1)[1])
    key = WatermarkKey(args.secret, seed)
    if key.fingerprint != meta["key_fingerprint"]:
        parser.error("--secret: its key's fingerprint does not match the corpus's")
    rows = read_corpus(path, args.count)
    torch.set_num_threads(1)
    start = time.perf_counter()
    model, tok = load_model(ModelConfig(name=args.model, path=f"builtin:{args.model}"))
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(WatermarkConfig), meta["watermark"]))
    with build_watermarker(cfg.kind, model, tok, cfg, key, extractor=extractor, encoder=EncoderConfig(),
                           cache_dir="outputs/cache/reference_keys") as wm:
        table = study(wm, [r.ids for r in rows], [r.prompt_ids for r in rows], layers=cfg.tournament.layers)
    table.insert(0, "model", args.model)
    table.insert(1, "extractor", args.extractor)
    out = Path(args.out)
    stem = f"routing_predictability_{args.model}" + ("" if args.extractor == "{}" else f"_layers{extractor.start_layer_idx}-{extractor.end_layer_idx}")
    table.to_csv(out / f"{stem}.csv", index=False)
    lines = [f"# Routing blocks predicted from the tokens before: {args.model}, {args.count} responses ({args.corpus}), extractor {args.extractor}",
             "", f"`python scripts/routing_predictability.py --model {args.model} --count {args.count} --corpus {args.corpus} --extractor '{args.extractor}'` "
             f"({time.perf_counter() - start:.0f} s). "
             "Collision rate of a layer's block code among pairs of positions sharing c tokens before (mean over 20 layers); "
             "c = 0 is any two positions (what unpredictable routing would give).", "",
             "| block bits | 2^-b | c = 0 | c = 1 | c = 2 | positions | repeated 2-token contexts (positions) |", "|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r.block_bits} | {r.random_code_rate:.4f} | {r.collision_ctx0:.3f} | {r.collision_ctx1:.3f} | {r.collision_ctx2:.3f} | "
                     f"{r.positions} | {r.repeated_contexts_ctx2} ({r.positions_in_repeated_ctx2}) |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
