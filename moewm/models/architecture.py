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
HUB_PROBE_SECONDS = 5.0  # one request to the hub before loading: an unreachable hub fails in seconds, not after retries


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


def download_command(path: str) -> str:
    """The command of the installed huggingface_hub that downloads ``path`` into the hub cache.

    huggingface_hub 0.34 added the ``hf`` CLI and 1.0 removed ``huggingface-cli``.
    """
    try:
        from huggingface_hub import __version__ as version

        major, minor = (int(part) for part in version.split(".")[:2])
    except Exception:  # noqa: BLE001 - no hub library, or a version string we cannot read: the current CLI
        major, minor = 1, 0
    return f"hf download {path}" if (major, minor) >= (0, 34) else f"huggingface-cli download {path}"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"


def hub_cached(path: str) -> bool:
    """Is ``path``'s config.json in the local hub cache (a checkpoint fetched before)?"""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(path, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a hub name (e.g. a missing local folder): not cached
        return False


def hub_unreachable(timeout_s: float = HUB_PROBE_SECONDS) -> Optional[str]:
    """Why the hub cannot be reached (one request, no retries, ``timeout_s``), or None when it answers."""
    if hub_offline():
        return "the hub is offline (HF_HUB_OFFLINE=1)"
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        get_session().head(f"{constants.ENDPOINT}/api/models", timeout=timeout_s)
    except Exception as err:  # noqa: BLE001 - any failure to get an answer is "unreachable"
        first = (str(err).splitlines() or [""])[0][:160]
        return f"it is not in the local hub cache and the hub could not be reached ({type(err).__name__}: {first})"
    return None


def check_weights_reachable(cfg: ModelConfig) -> None:
    """Raise :class:`WeightsUnavailableError` at once when ``cfg``'s checkpoint is neither local, nor cached, nor
    downloadable now: one probe of the hub with a short timeout instead of the hub client's retries on every file."""
    if cfg.random_init or _is_local(cfg.path):
        return
    if hub_cached(cfg.path):
        return
    reason = hub_unreachable()
    if reason is not None:
        raise WeightsUnavailableError(_unavailable_text(cfg, reason))


def _unavailable_text(cfg: ModelConfig, reason: str) -> str:
    return (
        f"model {cfg.name!r}: weights for {cfg.path!r} are not available: {reason}. Download the checkpoint on a machine "
        f"with network access ({download_command(cfg.path)}; it lands in the hub cache, so the same command line then runs), "
        f"or point model.path at a local copy, or use model.random_init=true for a random-weight model of the same architecture."
    )


def weights_unavailable(cfg: ModelConfig, err: Exception) -> WeightsUnavailableError:
    """The error for a checkpoint (or tokenizer) that is neither local nor reachable, with what to do about it."""
    hint = "the hub is offline (HF_HUB_OFFLINE=1)" if hub_offline() else "it is not in the local cache and the hub could not be reached"
    first = (str(err).splitlines() or [""])[0][:200]
    return WeightsUnavailableError(f"{_unavailable_text(cfg, hint)} ({type(err).__name__}: {first})")


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
