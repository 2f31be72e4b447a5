"""Load a model and tokenizer from a ModelConfig: the shipped tiny_moe, a hub name / local directory, or random init.

Every path ends in ``from_pretrained`` or ``from_config`` of the transformers Auto classes, so the
code that loads tiny_moe is the code that loads Qwen1.5-MoE or Mixtral from a hub snapshot.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from moewm.config import ConfigError, MemoryConfig, ModelConfig

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
ASSETS = Path(__file__).resolve().parent / "assets"


class WeightsUnavailableError(RuntimeError):
    """The weights (or tokenizer) cannot be found locally and the hub cannot be reached."""


def resolve_path(path: str) -> str:
    """``builtin:NAME`` -> the folder shipped in the package; anything else is returned unchanged."""
    if path.startswith(BUILTIN_PREFIX):
        folder = ASSETS / path[len(BUILTIN_PREFIX) :]
        if not (folder / "config.json").exists():
            raise WeightsUnavailableError(
                f"model.path={path!r}: the shipped model is missing at {folder} (rebuild it with scripts/build_tiny_moe.py)"
            )
        return str(folder)
    return path


def torch_dtype(name: str) -> Any:
    return "auto" if name == "auto" else getattr(torch, name)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def architecture_config(cfg: ModelConfig) -> PretrainedConfig:
    """A transformers config from the architecture numbers recorded in the model's YAML (no download)."""
    arch = dict(cfg.architecture)
    model_type = arch.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"model.architecture.model_type: missing for model {cfg.name!r}")
    return AutoConfig.for_model(model_type, **arch)


def load_config(cfg: ModelConfig) -> PretrainedConfig:
    """The model's transformers config: recorded architecture if any, else the checkpoint's config.json."""
    if cfg.random_init or (cfg.architecture and not _is_local(cfg.path)):
        return architecture_config(cfg)
    try:
        return AutoConfig.from_pretrained(resolve_path(cfg.path), trust_remote_code=cfg.trust_remote_code)
    except OSError as err:
        raise _unavailable(cfg, err) from None


def _is_local(path: str) -> bool:
    return path.startswith(BUILTIN_PREFIX) or os.path.isdir(path)


def _unavailable(cfg: ModelConfig, err: Exception) -> WeightsUnavailableError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    hint = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else "it is not in the local cache and the hub could not be reached"
    return WeightsUnavailableError(
        f"model {cfg.name!r}: weights for {cfg.path!r} are not available: {hint}. Download the checkpoint "
        f"(huggingface-cli download {cfg.path}) and point model.path at it, or use model.random_init=true "
        f"for a random-weight model of the same architecture. ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    )


def load_tokenizer(cfg: ModelConfig, fallback_vocab: Optional[int] = None) -> Any:
    """The checkpoint's tokenizer; a random-init model without a local tokenizer gets a byte-level one."""
    try:
        tok = AutoTokenizer.from_pretrained(resolve_path(cfg.path), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        if not cfg.random_init:
            raise _unavailable(cfg, err) from None
        from moewm.testing import byte_tokenizer

        log.warning("model %s: tokenizer of %s unavailable; using a byte-level tokenizer for random weights", cfg.name, cfg.path)
        tok = byte_tokenizer()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(cfg: ModelConfig, memory: Optional[MemoryConfig] = None) -> tuple[torch.nn.Module, Any]:
    """Model (eval mode, on its device) and tokenizer for a model config and memory profile."""
    cfg.validate()
    memory = memory or MemoryConfig()
    memory.validate()
    device = pick_device(cfg.device)
    dtype = torch_dtype(cfg.dtype)
    if cfg.random_init:
        config = architecture_config(cfg)
        log.info("model %s: building %s with random weights (no download)", cfg.name, config.model_type)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype if dtype != "auto" else None)
    else:
        path = resolve_path(cfg.path)
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
        if memory.device_map:
            kwargs["device_map"] = memory.device_map
            if memory.max_memory:
                kwargs["max_memory"] = dict(memory.max_memory)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as err:
            raise _unavailable(cfg, err) from None
    if not getattr(model, "hf_device_map", None):
        model = model.to(device)
    model.eval()
    tokenizer = load_tokenizer(cfg)
    return model, tokenizer
