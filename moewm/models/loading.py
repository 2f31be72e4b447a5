"""Load a model and tokenizer from a ModelConfig: the shipped tiny_moe, a hub name / local directory, or random init.

Every path ends in ``from_pretrained`` or ``from_config`` of the transformers Auto classes, so the
code that loads tiny_moe is the code that loads Qwen1.5-MoE or Mixtral from a hub snapshot. Where a
config comes from, the meta-device model and the checks before loading live in
:mod:`moewm.models.architecture`; the ``memory.device_map`` / ``max_memory`` checks in :mod:`moewm.models.placement`.
With ``memory.quantization`` int8 / nf4 the loaded model goes through
:func:`moewm.models.quantize.quantize_model` (experts included) before it is placed.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from moewm.models.architecture import (  # noqa: F401  (WeightsUnavailableError: what load_model raises)
    WeightsUnavailableError,
    architecture_config,
    check_weights_reachable,
    meta_from_config,
    resolve_path,
    weights_unavailable,
)
from moewm.config import ConfigError, MemoryConfig, ModelConfig
from moewm.models.footprint import model_nbytes
from moewm.models.placement import check_memory, max_memory_for_accelerate
from moewm.models.quantize import check_backend, quantize_model

log = logging.getLogger(__name__)


def torch_dtype(name: str) -> Any:
    return "auto" if name == "auto" else getattr(torch, name)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={name!r}: no CUDA device is available here (use model.device=auto or cpu)")
    return device


def load_tokenizer(cfg: ModelConfig, fallback_vocab: Optional[int] = None) -> Any:
    """The checkpoint's tokenizer; a random-init model without a local tokenizer gets a byte-level one.

    With ``random_init`` only local folders and the hub cache are looked at (no network, no retries):
    random weights need no download, not even of a tokenizer.
    """
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.random_init:
        kwargs["local_files_only"] = True
    try:
        tok = AutoTokenizer.from_pretrained(resolve_path(cfg.path), **kwargs)
    except (OSError, ValueError) as err:
        if not cfg.random_init:
            raise weights_unavailable(cfg, err) from None
        from moewm.models.micro import byte_tokenizer

        log.warning("model %s: tokenizer of %s unavailable; using a byte-level tokenizer for random weights", cfg.name, cfg.path)
        tok = byte_tokenizer()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def _effective_device_map(memory: MemoryConfig) -> Optional[str]:
    """``memory.device_map``, or None where it cannot apply (no CUDA: everything stays on the CPU)."""
    dm = memory.device_map
    if dm is None:
        return None
    if str(dm).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"memory.device_map={dm!r}: no CUDA device is available here (use null, auto or cpu)")
    return str(dm)


def _accelerate_max_memory(memory: MemoryConfig) -> Optional[dict[Any, int]]:
    limits = max_memory_for_accelerate(memory)
    gpus = torch.cuda.device_count()
    missing = [k for k in limits if isinstance(k, int) and k >= gpus]
    if missing:
        log.warning("memory.max_memory names GPU(s) %s but this machine has %d; ignoring them", missing, gpus)
        limits = {k: v for k, v in limits.items() if k not in missing}
    return limits or None


def _dispatch(model: nn.Module, memory: MemoryConfig, device_map: str) -> nn.Module:
    """Place an already built (and possibly quantized) model by accelerate: GPU first, the rest offloaded to the CPU."""
    if device_map in ("cpu",) or device_map.startswith("cuda"):
        return model.to(device_map)
    from accelerate import dispatch_model, infer_auto_device_map

    max_memory = _accelerate_max_memory(memory)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    placement = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if any(v == "disk" for v in placement.values()):
        raise ConfigError("memory.max_memory: the model does not fit GPU + CPU memory (disk offload is not supported): raise the cpu limit")
    if set(placement.values()) <= {"cpu"}:
        return model.to("cpu")
    log.info("memory.device_map=%s: %s", device_map, _placement_summary(placement))
    return dispatch_model(model, device_map=placement)


def _placement_summary(placement: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for dev in placement.values():
        counts[str(dev)] = counts.get(str(dev), 0) + 1
    return ", ".join(f"{n} modules on {d}" for d, n in sorted(counts.items()))


def _random_init_device(cfg: ModelConfig, memory: MemoryConfig, device: torch.device, config: PretrainedConfig) -> torch.device:
    """Build random weights directly on the GPU when they fit there (much faster than the CPU), else on the CPU."""
    if device.type != "cuda" or memory.device_map:
        return torch.device("cpu")
    need = model_nbytes(meta_from_config(cfg, config))
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < 0.9 * free else torch.device("cpu")


def load_model(cfg: ModelConfig, memory: Optional[MemoryConfig] = None) -> tuple[torch.nn.Module, Any]:
    """Model (eval mode, on its device, quantized per the memory profile) and tokenizer."""
    cfg.validate()
    memory = memory or MemoryConfig()
    check_memory(memory)
    device = pick_device(cfg.device)
    check_backend(memory, device)  # memory.backend=bitsandbytes without a working bitsandbytes fails here, before weights load
    dtype = torch_dtype(cfg.dtype)
    quantize = memory.quantization != "none"
    device_map = _effective_device_map(memory)
    check_weights_reachable(cfg)  # not cached and no hub: fail in seconds, before the hub client's retries
    tokenizer = load_tokenizer(cfg)  # first: a missing checkpoint fails before any weights are read
    if cfg.random_init:
        config = architecture_config(cfg)
        build_on = _random_init_device(cfg, memory, device, config)
        log.info("model %s: building %s with random weights on %s (no download)", cfg.name, config.model_type, build_on)
        with torch.device(build_on):
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype if dtype != "auto" else None, trust_remote_code=cfg.trust_remote_code
            )
    else:
        path = resolve_path(cfg.path)
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
        if device_map and not quantize:  # quantized models are placed after quantization (below)
            kwargs["device_map"] = device_map
            max_memory = _accelerate_max_memory(memory)
            if max_memory:
                kwargs["max_memory"] = max_memory
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as err:
            raise weights_unavailable(cfg, err) from None
    if quantize:
        quantize_model(model, memory, device=None if device_map else device)
    if getattr(model, "hf_device_map", None):
        pass  # placed by from_pretrained
    elif device_map:
        model = _dispatch(model, memory, device_map)
    else:
        model = model.to(device)
    model.eval()
    return model, tokenizer
