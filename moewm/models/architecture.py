"""A model without its weights: where its config comes from, the model built on the meta device, and the checks against it.

A config comes from a shipped model (``builtin:``: tiny_moe, tiny_olmoe), a hub name / local checkpoint, or the
architecture numbers recorded in ``conf/model/*.yaml`` (no download). From it we build the model on
the meta device (shapes and dtypes, no memory), so :func:`check_model_extractor` checks a
configuration against the real layer counts before anything is loaded, and :mod:`moewm.models.memory`
estimates memory from the real parameter inventory. :mod:`moewm.models.loading` loads the weights on top of this.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from moewm.config import ConfigError, ExtractorConfig, ModelConfig
from moewm.models.footprint import weights_dtype
from moewm.engine.routing import FeatureLayout, NotAnMoEModelError, check_extractor, feature_layout

BUILTIN_PREFIX = "builtin:"
ASSETS = Path(__file__).resolve().parent.parent / "assets"


class WeightsUnavailableError(RuntimeError):
    """The weights (or tokenizer) cannot be found locally and the hub cannot be reached."""


def resolve_path(path: str) -> str:
    """``builtin:NAME`` -> the folder shipped in the package; anything else is returned unchanged."""
    if path.startswith(BUILTIN_PREFIX):
        folder = ASSETS / path[len(BUILTIN_PREFIX) :]
        if not (folder / "config.json").exists():
            raise WeightsUnavailableError(
                f"model.path={path!r}: the shipped model is missing at {folder} "
                f"(rebuild it with scripts/build_tiny_moe.py --model {folder.name})"
            )
        return str(folder)
    return path


def architecture_config(cfg: ModelConfig) -> PretrainedConfig:
    """A transformers config from the architecture numbers recorded in the model's YAML (no download)."""
    arch = dict(cfg.architecture)
    model_type = arch.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"model.architecture.model_type: missing for model {cfg.name!r}")
    try:
        return AutoConfig.for_model(model_type, **arch)
    except ValueError as err:
        raise ConfigError(f"model.architecture.model_type={model_type!r} (model {cfg.name!r}): {err}") from None


def load_config(cfg: ModelConfig) -> PretrainedConfig:
    """The model's transformers config: recorded architecture if any, else the checkpoint's config.json."""
    if cfg.random_init or (cfg.architecture and not _is_local(cfg.path)):
        return architecture_config(cfg)
    try:
        return AutoConfig.from_pretrained(resolve_path(cfg.path), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise weights_unavailable(cfg, err) from None


def _is_local(path: str) -> bool:
    return path.startswith(BUILTIN_PREFIX) or os.path.isdir(path)


def weights_unavailable(cfg: ModelConfig, err: Exception) -> WeightsUnavailableError:
    """The error for a checkpoint (or tokenizer) that is neither local nor reachable, with what to do about it."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    hint = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else "it is not in the local cache and the hub could not be reached"
    first = (str(err).splitlines() or [""])[0][:200]
    return WeightsUnavailableError(
        f"model {cfg.name!r}: weights for {cfg.path!r} are not available: {hint}. Download the checkpoint "
        f"(huggingface-cli download {cfg.path}) and point model.path at it, or use model.random_init=true "
        f"for a random-weight model of the same architecture. ({type(err).__name__}: {first})"
    )


def meta_from_config(cfg: ModelConfig, config: PretrainedConfig) -> nn.Module:
    """``config``'s model on the meta device, in the dtype its weights would load in."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=weights_dtype(cfg, config), trust_remote_code=cfg.trust_remote_code)


def meta_model(cfg: ModelConfig) -> tuple[nn.Module, PretrainedConfig]:
    """The model built on the meta device (shapes and dtypes, no memory, no weights) and its config."""
    config = load_config(cfg)
    model = meta_from_config(cfg, config)
    if not getattr(model.config, "_name_or_path", ""):
        model.config._name_or_path = cfg.path  # error messages name the checkpoint
    return model, config


def model_layout(cfg: ModelConfig, kind: Optional[str] = None) -> FeatureLayout:
    """Layer count and feature width for an extractor kind (default: router for MoE, hidden for dense), no weights."""
    kind = kind or ("router" if cfg.is_moe else "hidden")
    model, _ = meta_model(cfg)
    return feature_layout(model, kind)


def dense_router_error(model_cfg: ModelConfig) -> NotAnMoEModelError:
    """The error for extractor=router on a dense model, naming the fix."""
    return NotAnMoEModelError(
        f"model {model_cfg.name!r} ({model_cfg.path}) is a dense model (model.is_moe=false): extractor.kind=router "
        "needs the routers of a Mixture-of-Experts model. Use extractor=hidden for the dense comparison."
    )


def check_model_extractor(model_cfg: ModelConfig, extractor_cfg: ExtractorConfig) -> FeatureLayout:
    """Check the extractor against the model before loading it: dense models need extractor=hidden; layer range and k.

    Raises :class:`moewm.engine.routing.NotAnMoEModelError` / :class:`moewm.config.ConfigError` naming the key and
    the allowed range; returns the model's :class:`FeatureLayout` for the extractor's kind.
    """
    extractor_cfg.validate()
    if extractor_cfg.kind == "router" and not model_cfg.is_moe:
        raise dense_router_error(model_cfg)
    layout = model_layout(model_cfg, extractor_cfg.kind)
    check_extractor(extractor_cfg, layout)
    return layout
