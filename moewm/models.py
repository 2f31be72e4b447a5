"""Load a model and tokenizer from a ModelConfig: the shipped tiny_moe, a hub name / local directory, or random init.

Every path ends in ``from_pretrained`` or ``from_config`` of the transformers Auto classes, so the
code that loads tiny_moe is the code that loads Qwen1.5-MoE or Mixtral from a hub snapshot. The
architecture numbers recorded in ``conf/model/*.yaml`` also let us build any of them on the meta
device (no weights): :func:`meta_model`, :func:`model_layout` and :func:`check_model_extractor` check a
configuration against the real layer counts before anything is loaded, and :mod:`moewm.memory`
estimates memory from the same meta model. With ``memory.quantization`` int8 / nf4 the loaded model
goes through :func:`moewm.quantize.quantize_model` (experts included) before it is placed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from moewm.config import ConfigError, ExtractorConfig, MemoryConfig, ModelConfig
from moewm.routing import FeatureLayout, NotAnMoEModelError, check_extractor, feature_layout

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
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={name!r}: no CUDA device is available here (use model.device=auto or cpu)")
    return device


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
        raise _unavailable(cfg, err) from None


def _is_local(path: str) -> bool:
    return path.startswith(BUILTIN_PREFIX) or os.path.isdir(path)


def _unavailable(cfg: ModelConfig, err: Exception) -> WeightsUnavailableError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    hint = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else "it is not in the local cache and the hub could not be reached"
    first = (str(err).splitlines() or [""])[0][:200]
    return WeightsUnavailableError(
        f"model {cfg.name!r}: weights for {cfg.path!r} are not available: {hint}. Download the checkpoint "
        f"(huggingface-cli download {cfg.path}) and point model.path at it, or use model.random_init=true "
        f"for a random-weight model of the same architecture. ({type(err).__name__}: {first})"
    )


def _meta_dtype(cfg: ModelConfig, config: PretrainedConfig) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(found, str):
        found = getattr(torch, found, None)
    return found if isinstance(found, torch.dtype) else torch.float32


def meta_model(cfg: ModelConfig) -> tuple[nn.Module, PretrainedConfig]:
    """The model built on the meta device (shapes and dtypes, no memory, no weights) and its config."""
    config = load_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=_meta_dtype(cfg, config), trust_remote_code=cfg.trust_remote_code)
    if not getattr(model.config, "_name_or_path", ""):
        model.config._name_or_path = cfg.path  # error messages name the checkpoint
    return model, config


def model_layout(cfg: ModelConfig, kind: Optional[str] = None) -> FeatureLayout:
    """Layer count and feature width for an extractor kind (default: router for MoE, hidden for dense), no weights."""
    kind = kind or ("router" if cfg.is_moe else "hidden")
    model, _ = meta_model(cfg)
    return feature_layout(model, kind)


def dense_router_error(model_cfg: ModelConfig) -> NotAnMoEModelError:
    return NotAnMoEModelError(
        f"model {model_cfg.name!r} ({model_cfg.path}) is a dense model (model.is_moe=false): extractor.kind=router "
        "needs the routers of a Mixture-of-Experts model. Use extractor=hidden for the dense comparison."
    )


def check_model_extractor(model_cfg: ModelConfig, extractor_cfg: ExtractorConfig) -> FeatureLayout:
    """Check the extractor against the model before loading it: dense models need extractor=hidden; layer range and k.

    Raises :class:`moewm.routing.NotAnMoEModelError` / :class:`moewm.config.ConfigError` naming the key and
    the allowed range; returns the model's :class:`FeatureLayout` for the extractor's kind.
    """
    extractor_cfg.validate()
    if extractor_cfg.kind == "router" and not model_cfg.is_moe:
        raise dense_router_error(model_cfg)
    layout = model_layout(model_cfg, extractor_cfg.kind)
    check_extractor(extractor_cfg, layout)
    return layout


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
            raise _unavailable(cfg, err) from None
        from moewm.testing import byte_tokenizer

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
    from moewm.memory import max_memory_for_accelerate

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
    from moewm.memory import model_nbytes

    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config, dtype=_meta_dtype(cfg, config), trust_remote_code=cfg.trust_remote_code)
    need = model_nbytes(shell)
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < 0.9 * free else torch.device("cpu")


def load_model(cfg: ModelConfig, memory: Optional[MemoryConfig] = None) -> tuple[torch.nn.Module, Any]:
    """Model (eval mode, on its device, quantized per the memory profile) and tokenizer."""
    from moewm.memory import check_memory

    cfg.validate()
    memory = memory or MemoryConfig()
    check_memory(memory)
    device = pick_device(cfg.device)
    dtype = torch_dtype(cfg.dtype)
    quantize = memory.quantization != "none"
    device_map = _effective_device_map(memory)
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
            raise _unavailable(cfg, err) from None
    if quantize:
        from moewm.quantize import quantize_model

        quantize_model(model, memory, device=None if device_map else device)
    if getattr(model, "hf_device_map", None):
        pass  # placed by from_pretrained
    elif device_map:
        model = _dispatch(model, memory, device_map)
    else:
        model = model.to(device)
    model.eval()
    return model, tokenizer
