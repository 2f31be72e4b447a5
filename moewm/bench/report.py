"""The benchmark's Markdown report: one table per section, targets met or not."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from moewm.bench.schemes import schemes_markdown

log = logging.getLogger(__name__)

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


def _quantization_markdown(q: dict[str, Any]) -> list[str]:
    bnb = f"bitsandbytes {q['bitsandbytes_version']}" if q.get("bitsandbytes_version") else f"bitsandbytes unavailable ({q['bitsandbytes_unavailable']})"
    lines = [
        f"### Quantization backends on the micro checkpoints (memory.backend; {bnb}; decode: batch {q['batch_size']}, "
        f"{q['new_tokens']} new tokens, greedy, compute bf16; signatures: {q['signature_texts']} random texts of {q['signature_text_len']} tokens, all router layers)",
        "",
        "| family | variant | expert bytes (estimator) | bits / expert weight | experts / bf16 | model / bf16 | decode tokens/s | decode time / bf16 "
        "| 16 bits flipped vs fp32 / vs bf16 | 64-bit signatures changed vs fp32 / vs bf16 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.2f} %"

    for family, f in q["families"].items():
        for name, r in f["variants"].items():
            est = "" if r["expert_bytes_estimated"] == r["expert_bytes"] else f" (estimator {r['expert_bytes_estimated']:,})"
            lines.append(
                f"| {family} | {name} | {r['expert_bytes']:,}{est or ' (= estimator)'} | {r['expert_bits_per_weight']:.3f} | "
                f"{100 * r['expert_fraction_of_bf16']:.1f} % | {100 * r['total_fraction_of_bf16']:.1f} % | {r['decode_tokens_per_s']:.0f} | "
                f"{r['ratio_decode_time_over_bf16']:.2f} | {pct(r.get('bits16_vs_float32_bit_flip_rate'))} / {pct(r.get('bits16_vs_bf16_bit_flip_rate'))} | "
                f"{pct(r.get('bits64_vs_float32_signature_change_rate'))} / {pct(r.get('bits64_vs_bf16_signature_change_rate'))} |"
            )
        rr = f["ratio_decode_time_bitsandbytes_over_moewm"]
        if rr:
            lines += ["", f"{family}: decode time bitsandbytes / moewm (paired rounds): " + ", ".join(f"{k} {v:.2f}" for k, v in rr.items()) + "."]
        lines.append("")
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
    sch = result.get("schemes")
    if sch:
        lines += schemes_markdown(sch)
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
    quant = result.get("quantization")
    if quant:
        lines += _quantization_markdown(quant)
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

