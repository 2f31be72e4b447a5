"""Write a watermark-stealing attacker's corpus: N responses of one model, watermarked by one scheme, or plain.

    python scripts/stealing_corpora.py --model tiny_moe --point tournament_m20_b8_ctx2 --count 4000   # the shipped design
    python scripts/stealing_corpora.py --model tiny_moe --point synthid_n3_k20 --count 4000
    python scripts/stealing_corpora.py --model tiny_moe --name plain --count 4000          # the attacker's own model
    python scripts/stealing_corpora.py --model tiny_moe --name my_design \\
        --watermark '{"kind": "synthid", "synthid": {"ngram_len": 3}}' --count 4000

Responses answer :func:`moewm.evaluation.stealing_corpus.attacker_prompts` in order and are appended batch by
batch to ``OUT/<model>/<name>.jsonl`` (a rerun continues where a stopped run ended; a larger --count extends
the corpus). ``--point`` takes a design of ``conf/tradeoff`` by name (its watermark, extractor and encoder; the
corpus is named after it, so the study's rows and the trade-off sweep's points share their names); ``--watermark``
is a JSON of WatermarkConfig fields over the shipped design; ``--name plain`` generates without a watermark. The key is ``WatermarkKey(--secret, --seed)``: a study key, never a real one,
and only its fingerprint is written. One torch thread by default, so two corpora run side by side on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moewm.app.compose import tradeoff_point
from moewm.config import ExtractorConfig, EncoderConfig, GenerationConfig, ModelConfig, WatermarkConfig
from moewm.engine.generation import encode_prompt
from moewm.engine.keys import WatermarkKey
from moewm.evaluation.stealing_corpus import CorpusRow, append_rows, attacker_prompts, batches, rows_done, write_meta
from moewm.models.loading import load_model
from moewm.schemes.registry import build_watermarker, check_watermark_config, resolve_statistic

log = logging.getLogger("stealing_corpora")
MODELS = ("tiny_moe", "tiny_olmoe")


def watermark_config(text: str | None) -> WatermarkConfig:
    fields = {} if text is None else json.loads(text)  # over WatermarkConfig(), the shipped design
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(WatermarkConfig), fields))
    cfg.validate()
    check_watermark_config(cfg, EncoderConfig())
    return resolve_statistic(cfg)  # the meta file names the statistic


def point_design(point: str) -> tuple[WatermarkConfig, ExtractorConfig, EncoderConfig]:
    """A trade-off point's watermark (statistic resolved), extractor and encoder."""
    app = tradeoff_point(point)
    check_watermark_config(app.watermark, app.encoder)
    return resolve_statistic(app.watermark), app.extractor, app.encoder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="tiny_moe")
    parser.add_argument("--point", default=None, help="a trade-off point of conf/tradeoff: the design (and the corpus's name)")
    parser.add_argument("--name", default=None, help="the corpus's name (its file name; default: --point); 'plain' generates without a watermark")
    parser.add_argument("--watermark", default=None, help="WatermarkConfig fields as JSON over the shipped design (default: the shipped design)")
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="the deployed key's seed")
    parser.add_argument("--secret", default="stealing-study-secret", help="the deployed key's secret (a study key)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="outputs/stealing/corpora")
    args = parser.parse_args(argv)
    try:
        if args.point is not None and args.watermark is not None:
            raise ValueError("--point and --watermark both name the design: give one")
        args.name = args.name or args.point
        if not args.name:
            raise ValueError("--name is required without --point ('plain' for the attacker's unwatermarked corpus)")
        if args.point is not None:
            cfg, extractor, encoder = point_design(args.point)
        else:
            cfg, extractor, encoder = watermark_config(args.watermark), ExtractorConfig(), EncoderConfig()
        attacker_prompts(args.count)
        if args.new_tokens < 1 or args.batch_size < 1:
            raise ValueError(f"--new-tokens={args.new_tokens}, --batch-size={args.batch_size}: allowed range is [1, inf)")
    except Exception as err:  # named before any weights load
        parser.error(str(err))
    plain = args.name == "plain"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    path = Path(args.out) / args.model / f"{args.name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = rows_done(path)
    if done >= args.count:
        log.info("%s already holds %d responses", path, done)
        return
    model, tokenizer = load_model(ModelConfig(name=args.model, path=f"builtin:{args.model}"))
    key = WatermarkKey(args.secret, args.seed)
    generation = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, batch_size=args.batch_size)
    prompts = [encode_prompt(tokenizer, p) for p in attacker_prompts(args.count)]
    write_meta(path, {"model": args.model, "name": args.name, "point": None if plain else args.point, "watermarked": not plain,
                      "watermark": None if plain else OmegaConf.to_container(OmegaConf.structured(cfg)),
                      "extractor": None if plain else OmegaConf.to_container(OmegaConf.structured(extractor)),
                      "encoder": None if plain else OmegaConf.to_container(OmegaConf.structured(encoder)),
                      "key_fingerprint": None if plain else key.fingerprint, "new_tokens": args.new_tokens,
                      "sampling": "temperature 1, sampling_seed + prompt index", "prompts": "moewm.evaluation.stealing_corpus.attacker_prompts"})
    start = time.perf_counter()
    with build_watermarker(cfg.kind, model, tokenizer, cfg, key, extractor=extractor, encoder=encoder,
                           cache_dir="outputs/cache/reference_keys") as wm:
        for chunk in batches(done, args.count, args.batch_size):
            batch_prompts = prompts[chunk.start : chunk.stop]
            gen = GenerationConfig(**{**generation.__dict__, "sampling_seed": generation.sampling_seed + chunk.start})
            ids = wm.generate_from_ids(batch_prompts, gen, watermark=not plain)
            append_rows(path, [CorpusRow(i, tuple(p), tuple(x)) for i, p, x in zip(chunk, batch_prompts, ids)])
            log.info("%s: %d / %d (%.0f s)", path.name, chunk.stop, args.count, time.perf_counter() - start)
    log.info("wrote %s: %d responses in %.0f s", path, args.count, time.perf_counter() - start)


if __name__ == "__main__":
    main()
