"""Perplexity under an oracle model other than the generator (``eval.oracle_model``).

A watermark's quality cost judged by the generator itself is biased toward the generator's own
preferences; an independent oracle (a larger LM) is the usual judge. ``eval.oracle_model`` names a
model config (``conf/model/<name>.yaml``, e.g. ``qwen_dense``); the name is checked when the config
is validated, before any weights load. An oracle whose tokenizer is the generator's (the same backend:
vocabulary, merges, normalisation, special tokens; the shipped tiny_moe and tiny_olmoe) scores the
generator's token ids themselves; any other re-tokenizes the decoded prompt and text with its own
tokenizer. Either way it scores the text given the prompt. Null (the default): no oracle; every job then
says ``perplexity_judge = generator:<model>`` and reports only the generator's perplexity. Offline,
the two shipped models judge each other (``model=tiny_moe eval.oracle_model=tiny_olmoe`` and back).

Metrics: ``perplexity_judge``; with an oracle also ``ppl_oracle_wm_mean``, ``ppl_oracle_unwm_mean`` and
``perplexity_judge_input`` (``generator_ids`` or ``reencoded_text``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from moewm.config import ConfigError, ModelConfig

MODEL_CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf" / "model"
_ORACLES: dict[str, tuple[Any, Any]] = {}


def available_models() -> list[str]:
    """Model config names an oracle may be (the stems of conf/model/*.yaml)."""
    return sorted(p.stem for p in MODEL_CONF_DIR.glob("*.yaml"))


def oracle_config(name: str) -> ModelConfig:
    """The ModelConfig of ``conf/model/<name>.yaml``; a ConfigError naming eval.oracle_model otherwise."""
    from omegaconf import OmegaConf

    allowed = available_models()
    if name not in allowed:
        raise ConfigError(f"eval.oracle_model={name!r}: allowed values are {allowed} (conf/model/*.yaml), or null for no oracle")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(MODEL_CONF_DIR / f"{name}.yaml"))
    cfg: ModelConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    cfg.validate()
    return cfg


def check_oracle(name: Optional[str]) -> None:
    """Validation of ``eval.oracle_model`` (no weights)."""
    if name is not None:
        oracle_config(name)


def load_oracle(name: str, memory: Any = None) -> tuple[Any, Any]:
    """The oracle model and tokenizer, loaded once per process (one oracle in memory at a time)."""
    if name not in _ORACLES:
        from moewm.models.loading import load_model

        _ORACLES.clear()
        _ORACLES[name] = load_model(oracle_config(name), memory)
    return _ORACLES[name]


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers give every text the same ids: the same class and the same serialized backend."""
    if a is b:
        return True
    ba, bb = getattr(a, "backend_tokenizer", None), getattr(b, "backend_tokenizer", None)
    if ba is None or bb is None or type(a) is not type(b):
        return False
    return ba.to_str() == bb.to_str()


def oracle_perplexity(model: Any, tokenizer: Any, prompts: list[str], texts: list[str], batch_size: int) -> Any:
    """Per text, perplexity under ``model`` of ``texts[i]`` given ``prompts[i]`` (NaN for an empty text)."""
    from moewm.engine.padding import pad_id
    from moewm.evaluation.quality import perplexity
    from moewm.engine.generation import encode_prompt

    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    text_ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return perplexity(model, prompt_ids, text_ids, batch_size, pad_id(tokenizer))


def oracle_metrics(ctx: Any, ev: Any) -> dict[str, Any]:
    """``perplexity_judge`` and, with ``eval.oracle_model`` set, the oracle's mean perplexities."""
    from moewm.engine import stats

    name = getattr(ev, "oracle_model", None)
    generator = getattr(getattr(ctx.cfg, "model", None), "name", "model")  # library callers may pass a bare context
    if name is None or name == generator:
        return {"perplexity_judge": f"generator:{generator}"}
    model, tok = load_oracle(name, ctx.cfg.memory)
    batch = ctx.cfg.generation.batch_size
    if same_tokenizer(ctx.tokenizer, tok):  # the very ids generated: no decode / encode round trip to change them
        from moewm.engine.padding import pad_id
        from moewm.evaluation.quality import perplexity

        wm = perplexity(model, ctx.prompt_ids, ctx.wm_ids, batch, pad_id(tok))
        plain = perplexity(model, ctx.prompt_ids, ctx.plain_ids, batch, pad_id(tok))
        source = "generator_ids"
    else:
        decode = ctx.tokenizer.decode
        prompts = [decode(p, skip_special_tokens=True) for p in ctx.prompt_ids]
        wm = oracle_perplexity(model, tok, prompts, [decode(x, skip_special_tokens=True) for x in ctx.wm_ids], batch)
        plain = oracle_perplexity(model, tok, prompts, [decode(x, skip_special_tokens=True) for x in ctx.plain_ids], batch)
        source = "reencoded_text"
    return {"perplexity_judge": f"oracle:{name}", "perplexity_judge_input": source,
            "ppl_oracle_wm_mean": stats.nan_safe_mean(wm), "ppl_oracle_unwm_mean": stats.nan_safe_mean(plain)}
