"""Memory estimator: what a model + memory profile + experiment size needs, without loading weights.

The model is built on the meta device by :func:`moewm.models.architecture.meta_model` (from ``model.architecture``
or the checkpoint's config.json), so the parameter inventory is the real one, family by family; quantized
sizes come from the same plan (:func:`moewm.models.quantize.plan_quantization`) and byte formula
(:func:`moewm.models.quantize.quantized_nbytes`) that :func:`moewm.models.quantize.quantize_model` uses, so the
weights line matches the measured footprint. KV cache, the watermark's own tensors and a (rough)
activation allowance are added; the total is compared to ``memory.budget_gib`` and, if it does not
fit, a profile or CPU-offload setting that would is suggested.

``python -m moewm mode=estimate model=qwen_moe memory=ultra_low`` calls :func:`estimate_from_app_config`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from moewm.models.architecture import dense_router_error, meta_model
from moewm.config import ConfigError, EncoderConfig, ExtractorConfig, MemoryConfig, ModelConfig
from moewm.models.footprint import weights_dtype
from moewm.models.placement import DEVICE_MAPS, check_memory, max_memory_for_accelerate
from moewm.models.quantize import QuantizedExperts, fused_experts_layout, is_gate_name, plan_quantization, quantized_nbytes, resolve_backend
from moewm.engine.routing import check_extractor, feature_layout, find_router_modules

GIB = 1024**3
GB = 1000**3

PROFILE_ORDER = ("default", "low", "ultra_low")


def _load_profiles() -> dict[str, dict[str, dict[str, Any]]]:
    """The shipped memory profiles, read from their one home, conf/memory/*.yaml (the app's config group).

    A profile file carries only what differs from :class:`MemoryConfig`'s defaults; its ``memory`` section here
    is complete, as the app composes it (the dataclass defaults, then the file). Besides the ``memory`` group, a
    profile may shrink the experiment (ultra_low sets extractor/encoder/generation).
    """
    from omegaconf import OmegaConf

    folder = Path(__file__).resolve().parent.parent.parent / "conf" / "memory"
    profiles = {}
    for name in PROFILE_ORDER:
        data = OmegaConf.to_container(OmegaConf.load(folder / f"{name}.yaml"), resolve=True)
        assert isinstance(data, dict)
        data["memory"] = {**asdict(MemoryConfig()), **(data.get("memory") or {})}
        profiles[name] = data
    return profiles


PROFILES: dict[str, dict[str, dict[str, Any]]] = _load_profiles()
_STRENGTH = {"none": 0, "int8": 1, "nf4": 2}

# Fixed allowance for what torch does not count as tensors: CUDA context, cuBLAS workspaces, allocator slack.
RUNTIME_ALLOWANCE = 0.5 * GIB

CATEGORIES = (
    "embeddings",
    "attention",
    "experts",
    "shared experts",
    "router gates",
    "dense MLP",
    "norms",
    "LM head",
    "other (buffers)",
)

# -- helpers that accept dataclasses, dicts or OmegaConf nodes ----------------------------------------


def _plain(value: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return value


def _as(cls: type, obj: Any) -> Any:
    """A ``cls`` dataclass from a dataclass, a dict or an OmegaConf node (unknown keys are refused)."""
    if isinstance(obj, cls):
        return obj
    obj = _plain(obj)
    names = {f.name for f in fields(cls)}
    if isinstance(obj, dict):
        unknown = set(obj) - names
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)}; allowed keys are {sorted(names)}")
        return cls(**{k: _plain(v) for k, v in obj.items()})
    return cls(**{n: _plain(getattr(obj, n)) for n in names if hasattr(obj, n)})


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def _under(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def categorize(model: nn.Module) -> dict[str, str]:
    """Parameter / buffer name -> one of :data:`CATEGORIES` (works on meta, real and quantized models)."""
    routers = {id(m) for m in find_router_modules(model)[0]}
    router_names, expert_names = set(), set()
    for name, module in model.named_modules():
        if id(module) in routers:
            router_names.add(name)
        elif isinstance(module, QuantizedExperts) or fused_experts_layout(module) is not None:
            expert_names.add(name)
    modules = dict(model.named_modules())
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out: dict[str, str] = {}
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in named:
        owner_name = _owner(name)
        owner = modules.get(owner_name)
        lowered = name.lower()
        if _under(owner_name, router_names):
            cat = "router gates"
        elif _under(owner_name, expert_names):
            cat = "experts"
        elif owner is not None and owner is embed:
            cat = "embeddings"
        elif owner is not None and owner is head:
            cat = "LM head"
        elif owner is not None and "norm" in type(owner).__name__.lower():
            cat = "norms"
        elif any(is_gate_name(p) for p in _prefixes(owner_name)):
            cat = "router gates"
        elif "shared_expert" in lowered:
            cat = "shared experts"
        elif "attn" in lowered or "attention" in lowered:
            cat = "attention"
        elif any(part in lowered for part in (".mlp.", "feed_forward", ".ffn.")):
            cat = "dense MLP"
        else:
            cat = "other (buffers)"
        out[name] = cat
    return out


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def breakdown(model: nn.Module) -> dict[str, dict[str, int]]:
    """Measured bytes (and tensor elements) per category of a loaded (possibly quantized) model."""
    cats = categorize(model)
    seen: set[int] = set()
    out = {c: {"params": 0, "bytes": 0} for c in CATEGORIES}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[cats[name]]["params"] += tensor.numel()
        out[cats[name]]["bytes"] += tensor.numel() * tensor.element_size()
    return out


# -- the estimate -------------------------------------------------------------------------------------


@dataclass
class Part:
    name: str
    params: int
    nbytes: int
    stored_as: str

    @property
    def gib(self) -> float:
        return self.nbytes / GIB


@dataclass
class MemoryEstimate:
    """Bytes by part for one model, memory profile and experiment size; ``table()`` renders Markdown."""

    model: str
    path: str
    profile: str
    quantization: str
    double_quant: bool
    model_dtype: str
    compute_dtype: str
    budget_gib: float
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    num_bits: int
    pool_size: int
    feature_dim: int
    weights: list[Part]
    kv_cache_bytes: int
    watermark_bytes: int
    activation_bytes: int
    runtime_bytes: int
    quantized_note: str
    backend: str = "moewm"  # who stores the quantized weights (memory.backend, auto resolved on this machine)
    recommendation: str = ""
    suggestion: dict[str, Any] = field(default_factory=dict)
    # memory.device_map=auto with memory.max_memory: weights beyond the GPU limit live in CPU RAM
    offload_gpu_limit: Optional[int] = None
    offload_cpu_limit: Optional[int] = None

    @property
    def weight_bytes(self) -> int:
        return sum(p.nbytes for p in self.weights)

    @property
    def total_params(self) -> int:
        return sum(p.params for p in self.weights if p.name != "other (buffers)")

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.watermark_bytes + self.activation_bytes + self.runtime_bytes

    @property
    def offloaded_bytes(self) -> int:
        """Weights that accelerate places in CPU RAM under the max_memory GPU limit."""
        if self.offload_gpu_limit is None:
            return 0
        return max(0, self.weight_bytes - self.offload_gpu_limit)

    @property
    def device_bytes(self) -> int:
        """What the GPU (the budget) has to hold: everything but the offloaded weights."""
        return self.total_bytes - self.offloaded_bytes

    @property
    def fits(self) -> bool:
        cpu_ok = self.offload_cpu_limit is None or self.offloaded_bytes <= self.offload_cpu_limit
        return self.device_bytes <= self.budget_gib * GIB and cpu_ok

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["weights"] = {p.name: {"params": p.params, "bytes": p.nbytes, "stored_as": p.stored_as} for p in self.weights}
        out.update(
            weight_bytes=self.weight_bytes,
            total_params=self.total_params,
            total_bytes=self.total_bytes,
            total_gib=self.total_bytes / GIB,
            offloaded_bytes=self.offloaded_bytes,
            device_bytes=self.device_bytes,
            fits=self.fits,
        )
        return out

    def table(self) -> str:
        def gib(n: int) -> str:
            return f"{n / GIB:.2f}"

        def gb(n: int) -> str:
            return f"{n / GB:.2f}"

        q = self.quantization + (" (double quant)" if self.double_quant and self.quantization == "nf4" else "")
        q += f", {self.backend} backend" if self.quantization != "none" else ""
        lines = [
            f"**{self.model}** (`{self.path}`), memory={self.profile}: weights {q}, model dtype {self.model_dtype}, "
            f"compute dtype {self.compute_dtype}",
            "",
            "| part | parameters | stored as | GB | GiB |",
            "|---|---:|---|---:|---:|",
        ]
        for p in self.weights:
            if p.params == 0 and p.nbytes == 0 and not p.stored_as.startswith("tied"):
                continue
            lines.append(f"| {p.name} | {_count(p.params)} | {p.stored_as} | {gb(p.nbytes)} | {gib(p.nbytes)} |")
        lines.append(f"| **weights** | **{_count(self.total_params)}** | | **{gb(self.weight_bytes)}** | **{gib(self.weight_bytes)}** |")
        tokens = self.prompt_tokens + self.new_tokens
        lines += [
            f"| KV cache: {self.batch_size} x ({self.prompt_tokens} + {self.new_tokens}) tokens | | {self.model_dtype} | "
            f"{gb(self.kv_cache_bytes)} | {gib(self.kv_cache_bytes)} |",
            f"| watermark encoder: D={self.feature_dim}, {self.num_bits} bits x pool {self.pool_size} | | float32 / int64 | "
            f"{gb(self.watermark_bytes)} | {gib(self.watermark_bytes)} |",
            f"| activations, approx. (batch {self.batch_size} x {tokens} tokens{', dequantization scratch' if self.quantization != 'none' else ''}) | | {self.model_dtype} | "
            f"{gb(self.activation_bytes)} | {gib(self.activation_bytes)} |",
            f"| runtime allowance (CUDA context, allocator) | | | {gb(self.runtime_bytes)} | {gib(self.runtime_bytes)} |",
            f"| **total** | | | **{gb(self.total_bytes)}** | **{gib(self.total_bytes)}** |",
        ]
        if self.offload_gpu_limit is not None:
            cpu = "" if self.offload_cpu_limit is None else f" (limit {self.offload_cpu_limit / GIB:.2f} GiB)"
            lines.append(
                f"| offloaded to CPU RAM (memory.max_memory GPU limit {self.offload_gpu_limit / GIB:.2f} GiB){cpu} | | | "
                f"-{gb(self.offloaded_bytes)} | -{gib(self.offloaded_bytes)} |"
            )
            lines.append(f"| **on the GPU** | | | **{gb(self.device_bytes)}** | **{gib(self.device_bytes)}** |")
        lines += [
            "",
            f"Budget {self.budget_gib:g} GiB: {'fits' if self.fits else 'does NOT fit'}. {self.quantized_note}",
        ]
        if self.recommendation:
            lines += ["", self.recommendation]
        return "\n".join(lines)


def _count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} K"
    return str(n)


def _quantized_note(memory: MemoryConfig, parts: list[Part]) -> str:
    if memory.quantization == "none":
        return "Nothing is quantized."
    scheme = memory.quantization
    quantized = [p.name for p in parts if scheme in p.stored_as.split(" + ")]
    kept = [p.name for p in parts if p.params and scheme not in p.stored_as.split(" + ") and p.name != "other (buffers)"]
    partly = [p.name for p in parts if scheme in p.stored_as.split(" + ") and " + " in p.stored_as]
    note = f"Quantized to {scheme}: {', '.join(quantized) or 'nothing'}"
    if partly:
        note += f" (biases of {', '.join(partly)} stay in the model dtype)"
    note += f". Kept in the model dtype: {', '.join(kept) or 'nothing'}"
    if not memory.quantize_experts:
        note += " (experts too: memory.quantize_experts=false)"
    return note + ". Router gates are never quantized: the watermark key is computed from them."


def _kv_bytes(config: Any, batch: int, tokens: int, dtype_bytes: int) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(getattr(text, "num_attention_heads"))
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    layers = int(text.num_hidden_layers)
    return 2 * layers * batch * tokens * kv_heads * head_dim * dtype_bytes


def _watermark_bytes(feature_dim: int, num_bits: int, pool_size: int, vocab: int) -> int:
    """Upper bound of :meth:`moewm.engine.lsh.LSHEncoder.nbytes` (pool tokens u <= min(V, bits * pool))."""
    u = min(vocab, num_bits * pool_size)
    return feature_dim * num_bits * 4 + feature_dim * 4 + num_bits * pool_size * 8 + u * 8 + num_bits * u * 4 + vocab * 8


def _activation_bytes(config: Any, batch: int, prompt: int, new: int, dtype_bytes: int, sel_layers: int, width: int, feature_dim: int) -> int:
    """A rough peak: prefill working set, eager attention scores, logits (last token, or a detection block), captured routing, detection features."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    inter = max(
        int(getattr(text, "intermediate_size", 0) or 0),
        int(getattr(text, "shared_expert_intermediate_size", 0) or 0),
        int(getattr(text, "moe_intermediate_size", 0) or 0),
    )
    seq = prompt + new
    working = batch * seq * (6 * hidden + 3 * inter) * dtype_bytes
    scores = batch * heads * seq * seq * dtype_bytes
    # Last-token logits while generating; while detecting with the model null, the blocks of next-token
    # distributions (logits, probabilities, pool columns) that the detector uses on a GPU.
    from moewm.engine.capture import head_block

    vocab = int(text.vocab_size)
    logits = 3 * max(batch, head_block(vocab, torch.device("cuda"))) * vocab * 4
    routing = sel_layers * batch * seq * width * (dtype_bytes + 4) + batch * seq * feature_dim * 4
    return working + scores + logits + routing


def estimate(
    model_cfg: Any,
    memory_cfg: Any = None,
    *,
    batch_size: int = 8,
    prompt_tokens: int = 48,
    new_tokens: int = 64,
    num_bits: int = 32,
    pool_size: int = 64,
    pools: str = EncoderConfig.pools,
    feature_dim: Optional[int] = None,
    extractor: Any = None,
    suggest: bool = True,
    _meta: Optional[tuple[nn.Module, Any]] = None,
    _lenient: bool = False,
) -> MemoryEstimate:
    """Estimate memory for ``model_cfg`` under ``memory_cfg`` without loading weights.

    ``feature_dim`` defaults to what ``extractor`` (default: all layers, router for MoE models, hidden
    otherwise) gives on this model. With ``suggest`` a profile or offload setting that fits is proposed
    when this one does not.
    """
    model_cfg = _as(ModelConfig, model_cfg)
    memory = _as(MemoryConfig, memory_cfg if memory_cfg is not None else MemoryConfig())
    check_memory(memory)
    for key, value, low in (("generation.batch_size", batch_size, 1), ("data.max_prompt_tokens", prompt_tokens, 1),
                            ("generation.max_new_tokens", new_tokens, 1), ("encoder.num_bits", num_bits, 1),
                            ("encoder.pool_size", pool_size, 1)):
        if int(value) < low:
            raise ConfigError(f"{key}={value}: must be >= {low}")
    meta, config = _meta if _meta is not None else meta_model(model_cfg)
    dtype = weights_dtype(model_cfg, config)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()

    # weights, category by category, at the profile's precision
    cats = categorize(meta)
    quantized: dict[str, tuple[int, ...]] = {}
    transposed: set[str] = set()
    backend = memory.backend if memory.backend != "auto" or memory.quantization == "none" else resolve_backend(memory, "cpu")
    scratch = 0  # one dequantized matrix (a Linear weight or one expert's) in the compute dtype, twice
    if memory.quantization != "none":
        compute_bytes = torch.tensor([], dtype=getattr(torch, memory.compute_dtype)).element_size()
        for item in plan_quantization(meta, memory).items:
            names = ("weight",) if item.kind == "linear" else _expert_param_names(meta, item.name)
            flipped = item.kind == "experts" and bool(getattr(meta.get_submodule(item.name), "is_transposed", False))
            for pname, shape in zip(names, item.shapes):
                quantized[f"{item.name}.{pname}"] = shape
                if flipped:
                    transposed.add(f"{item.name}.{pname}")
                scratch = max(scratch, 2 * shape[-1] * shape[-2] * compute_bytes)
    params = {c: 0 for c in CATEGORIES}
    nbytes = {c: 0 for c in CATEGORIES}
    stored: dict[str, set[str]] = {c: set() for c in CATEGORIES}
    for name, tensor in list(meta.named_parameters()) + list(meta.named_buffers()):
        cat = cats[name]
        params[cat] += tensor.numel()
        if name in quantized:
            nbytes[cat] += quantized_nbytes(quantized[name], memory.quantization, memory.double_quant, backend=backend,
                                            transposed=name in transposed)
            stored[cat].add(memory.quantization)
        else:
            nbytes[cat] += tensor.numel() * tensor.element_size()
            stored[cat].add(str(tensor.dtype).replace("torch.", ""))
    parts = [Part(c, params[c], nbytes[c], " + ".join(sorted(stored[c])) or "-") for c in CATEGORIES]
    head, embed = meta.get_output_embeddings(), meta.get_input_embeddings()
    if head is not None and embed is not None and head.weight is embed.weight:
        parts[CATEGORIES.index("LM head")].stored_as = "tied to the embeddings"

    # the extractor decides the feature width
    kind = getattr(extractor, "kind", None) or ("router" if model_cfg.is_moe else "hidden")
    if kind == "router" and not model_cfg.is_moe:
        raise dense_router_error(model_cfg)
    layout = feature_layout(meta, kind)
    ext = _as(ExtractorConfig, extractor) if extractor is not None else ExtractorConfig(kind=kind)
    start = int(ext.start_layer_idx)
    end = layout.num_layers if ext.end_layer_idx is None else int(ext.end_layer_idx)
    if extractor is not None:
        try:
            start, end = check_extractor(ext, layout)
        except ConfigError:
            if not _lenient:  # the experiment as configured cannot run on this model
                raise
            # a suggested profile's layer range may exceed a small model: size it on the layers that exist
            start, end = min(start, layout.num_layers - 1), min(end, layout.num_layers)
    sel = max(1, end - start)
    dim = int(feature_dim) if feature_dim is not None else sel * layout.width
    vocab = int(getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size"))

    est = MemoryEstimate(
        model=model_cfg.name,
        path=model_cfg.path,
        profile=memory.name,
        quantization=memory.quantization,
        double_quant=bool(memory.double_quant),
        model_dtype=str(dtype).replace("torch.", ""),
        compute_dtype=memory.compute_dtype,
        budget_gib=float(memory.budget_gib),
        batch_size=int(batch_size),
        prompt_tokens=int(prompt_tokens),
        new_tokens=int(new_tokens),
        num_bits=int(num_bits),
        pool_size=int(pool_size),
        feature_dim=dim,
        weights=parts,
        kv_cache_bytes=_kv_bytes(config, int(batch_size), int(prompt_tokens) + int(new_tokens), dtype_bytes),
        # a partition's pools hold every token once: num_bits pools of vocab / num_bits
        watermark_bytes=_watermark_bytes(dim, int(num_bits), -(-vocab // int(num_bits)) if pools in ("partition", "random_partition") else int(pool_size), vocab)
        + (vocab * 8 if pools in ("partition", "random_partition") else 0),  # a partition also maps each token to its one pool
        activation_bytes=scratch + _activation_bytes(config, int(batch_size), int(prompt_tokens), int(new_tokens), dtype_bytes, sel, layout.width, dim),
        runtime_bytes=int(RUNTIME_ALLOWANCE),
        quantized_note=_quantized_note(memory, parts),
        backend=backend if memory.quantization != "none" else "none",
    )
    if memory.device_map in DEVICE_MAPS and memory.max_memory:
        limits = max_memory_for_accelerate(memory)
        gpu = sum(v for k, v in limits.items() if isinstance(k, int))
        est.offload_gpu_limit = gpu if gpu else None
        est.offload_cpu_limit = limits.get("cpu")
    if suggest and not est.fits:
        _suggest(est, model_cfg, memory, (meta, config), batch_size, prompt_tokens, new_tokens, num_bits, pool_size, extractor)
    return est


def _expert_param_names(meta: nn.Module, name: str) -> tuple[str, str]:
    layout = fused_experts_layout(meta.get_submodule(name))
    assert layout is not None
    return layout


def profile_memory(name: str, budget_gib: Optional[float] = None) -> MemoryConfig:
    """The ``memory`` part of a shipped profile (optionally with another budget)."""
    if name not in PROFILES:
        raise ConfigError(f"memory={name!r}: allowed profiles are {', '.join(PROFILE_ORDER)}")
    mem = MemoryConfig(**PROFILES[name]["memory"])
    return replace(mem, budget_gib=budget_gib) if budget_gib is not None else mem


def _suggest(est: MemoryEstimate, model_cfg: ModelConfig, memory: MemoryConfig, meta: Any, batch: int, prompt: int, new: int,
             num_bits: int, pool_size: int, extractor: Any) -> None:
    budget = float(memory.budget_gib)
    current = _STRENGTH[memory.quantization]
    strongest = est
    for name in PROFILE_ORDER:
        prof = PROFILES[name]
        if _STRENGTH[prof["memory"]["quantization"]] <= current:
            continue
        ext = dict(_plain(asdict(_as(ExtractorConfig, extractor))) if extractor is not None else {})
        ext.update(prof.get("extractor", {}))
        enc = prof.get("encoder", {})
        gen = prof.get("generation", {})
        alt = estimate(
            model_cfg, profile_memory(name, budget), batch_size=batch, prompt_tokens=prompt,
            new_tokens=gen.get("max_new_tokens", new), num_bits=enc.get("num_bits", num_bits),
            pool_size=enc.get("pool_size", pool_size), extractor=ExtractorConfig(**ext) if ext else None,
            suggest=False, _meta=meta, _lenient=True,
        )
        strongest = alt
        if alt.fits:
            extra = " (it also shrinks the experiment: " + ", ".join(
                f"{g}.{k}={v}" for g in ("extractor", "encoder", "generation") for k, v in prof.get(g, {}).items()
            ) + ")" if len(prof) > 1 else ""
            est.recommendation = (
                f"**Suggestion:** `memory={name}` ({prof['memory']['quantization']} weights) needs "
                f"{alt.total_bytes / GIB:.2f} GiB and fits the {budget:g} GiB budget{extra}."
            )
            est.suggestion = {"profile": name, "total_gib": round(alt.total_bytes / GIB, 3)}
            return
    # nothing fits on the device alone: keep what fits on the GPU, offload the rest of the weights to the CPU
    non_weights = strongest.total_bytes - strongest.weight_bytes
    gpu_weights = budget * GIB - non_weights - 0.05 * budget * GIB  # 5 % headroom for accelerate's placement
    if gpu_weights <= 0.1 * GIB:
        est.recommendation = (
            f"**Suggestion:** even the activations, KV cache and runtime need {non_weights / GIB:.2f} GiB of the "
            f"{budget:g} GiB budget: lower generation.batch_size, data.max_prompt_tokens or generation.max_new_tokens."
        )
        est.suggestion = {"reduce": ["generation.batch_size", "data.max_prompt_tokens", "generation.max_new_tokens"]}
        return
    gpu_gib = math.floor(gpu_weights / GIB * 10) / 10
    cpu_gib = math.ceil((strongest.weight_bytes - gpu_gib * GIB) / GIB * 1.15 + 1)
    name = strongest.profile if strongest is not est else None  # None: the current settings are already the smallest
    profile = f"memory={name} " if name else ""
    est.recommendation = (
        f"**Suggestion:** no profile fits {budget:g} GiB on the GPU alone; offload part of the weights to the CPU "
        f"(slower: offloaded layers are copied to the GPU at every forward): `{profile}memory.device_map=auto "
        f"++memory.max_memory={{gpu:{gpu_gib:g}GiB,cpu:{cpu_gib}GiB}}`."
    )
    est.suggestion = {"profile": name or memory.name, "device_map": "auto",
                      "max_memory": {"gpu": f"{gpu_gib:g}GiB", "cpu": f"{cpu_gib}GiB"}}


def estimate_from_app_config(cfg: Any) -> MemoryEstimate:
    """:func:`estimate` for the Hydra app's config (``model``, ``memory``, ``generation``, ``data``, ``encoder``, ``extractor``)."""
    generation = getattr(cfg, "generation", None)
    data = getattr(cfg, "data", None)
    encoder = getattr(cfg, "encoder", None)
    extractor = getattr(cfg, "extractor", None)
    ext = None
    if extractor is not None:
        ext = ExtractorConfig(
            kind=str(getattr(extractor, "kind", "router")),
            start_layer_idx=int(getattr(extractor, "start_layer_idx", 0)),
            end_layer_idx=None if getattr(extractor, "end_layer_idx", None) is None else int(extractor.end_layer_idx),
            use_top_k=bool(getattr(extractor, "use_top_k", False)),
            k=int(getattr(extractor, "k", 2)),
        )
    return estimate(
        cfg.model,
        cfg.memory,
        batch_size=int(getattr(generation, "batch_size", 8)),
        prompt_tokens=int(getattr(data, "max_prompt_tokens", 48)),
        new_tokens=int(getattr(generation, "max_new_tokens", 64)),
        num_bits=int(getattr(encoder, "num_bits", 32)),
        pool_size=int(getattr(encoder, "pool_size", 64)),
        pools=str(getattr(encoder, "pools", EncoderConfig.pools)),
        extractor=ext,
    )
