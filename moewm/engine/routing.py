"""Capture per-position routing (or hidden-state) features with forward hooks, for any transformers MoE family.

transformers declares, for every MoE model, which module class emits router logits
(``_can_record_outputs["router_logits"]``); its own ``output_router_logits`` machinery hooks the same
modules. We hook them ourselves instead of asking for ``output_router_logits=True``, because that
flag also makes the model compute the load-balancing loss at every decoding step (see BENCHMARKS.md),
and we never touch ``model.forward``. The hooks keep a reference to the last forward's outputs of the
selected layers only; turning them into features happens on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from moewm.config import ConfigError, ExtractorConfig


class NotAnMoEModelError(ConfigError):
    """The router extractor was asked for on a model without MoE routers."""


@dataclass(frozen=True)
class FeatureLayout:
    """What the hooks found: how many layers can be sliced and how wide each layer's feature is."""

    num_layers: int
    width: int  # experts per layer (router) or hidden size (hidden)
    kind: str

    @property
    def layer_word(self) -> str:
        return "MoE layers" if self.kind == "router" else "decoder layers"


def _recorders(model: nn.Module, key: str) -> list[Any]:
    """transformers' own declaration of which modules emit ``key`` (router_logits / hidden_states)."""
    for module in model.modules():
        spec = getattr(type(module), "_can_record_outputs", None) or getattr(module, "_can_record_outputs", None)
        if isinstance(spec, dict) and key in spec:
            found = spec[key]
            return list(found) if isinstance(found, (list, tuple)) else [found]
    return []


def _resolve(model: nn.Module, recorder: Any) -> tuple[list[nn.Module], int]:
    target_class = getattr(recorder, "target_class", recorder)
    layer_name = getattr(recorder, "layer_name", None)
    index = getattr(recorder, "index", 0) or 0
    modules = [
        module
        for name, module in model.named_modules()
        if isinstance(module, target_class) and (layer_name is None or name.endswith(layer_name) or layer_name in name)
    ]
    return modules, index


def find_router_modules(model: nn.Module) -> tuple[list[nn.Module], int]:
    """The router modules in layer order and the index of the logits in their output tuple."""
    for recorder in _recorders(model, "router_logits"):
        modules, index = _resolve(model, recorder)
        if modules:
            return modules, index
    return [], 0


def find_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers in order (their first output is the hidden state)."""
    for recorder in _recorders(model, "hidden_states"):
        modules, _ = _resolve(model, recorder)
        if modules:
            return modules
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return list(layers) if layers is not None else []


def _router_width(module: nn.Module, config: Any) -> int:
    for attr in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    for attr in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise NotAnMoEModelError(f"cannot tell how many experts the router {type(module).__name__} has")


def model_label(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or type(model).__name__
    return f"{name} ({getattr(config, 'model_type', '?')}, {type(model).__name__})"


def feature_layout(model: nn.Module, kind: str) -> FeatureLayout:
    """Count the sliceable layers of ``model`` for an extractor kind; works on the meta device too."""
    if kind == "router":
        routers, _ = find_router_modules(model)
        if not routers:
            raise NotAnMoEModelError(
                f"model {model_label(model)} has no MoE router layers: the router extractor needs a "
                "Mixture-of-Experts model. For a dense model use extractor=hidden (the dense comparison)."
            )
        return FeatureLayout(len(routers), _router_width(routers[0], model.config), "router")
    layers = find_decoder_layers(model)
    if not layers:
        raise ConfigError(f"model {model_label(model)}: found no decoder layers to hook for extractor=hidden")
    return FeatureLayout(len(layers), int(model.config.hidden_size), "hidden")


def check_extractor(cfg: ExtractorConfig, layout: FeatureLayout) -> tuple[int, int]:
    """Validate the layer slice and k against a model's layout; returns the resolved [start, end)."""
    cfg.validate()
    end = layout.num_layers if cfg.end_layer_idx is None else cfg.end_layer_idx
    if cfg.start_layer_idx >= layout.num_layers:
        raise ConfigError(
            f"extractor.start_layer_idx={cfg.start_layer_idx}: allowed range is [0, {layout.num_layers - 1}] "
            f"(the model has {layout.num_layers} {layout.layer_word})"
        )
    if end > layout.num_layers:
        raise ConfigError(
            f"extractor.end_layer_idx={end}: allowed range is [{cfg.start_layer_idx + 1}, {layout.num_layers}] "
            f"(the model has {layout.num_layers} {layout.layer_word}; the end is exclusive)"
        )
    if cfg.use_top_k and layout.kind == "router" and cfg.k > layout.width:
        raise ConfigError(f"extractor.k={cfg.k}: allowed range is [1, {layout.width}] (experts per layer)")
    return cfg.start_layer_idx, end


class FeatureCapture:
    """Forward hooks on a slice of layers; ``features`` turns the last forward's outputs into vectors.

    A feature vector is, per position, the concatenation over the selected layers of the router's
    softmax probabilities (optionally only the top-k, others zero), or of the hidden states.
    """

    def __init__(self, model: nn.Module, cfg: ExtractorConfig) -> None:
        self.cfg = cfg
        self.layout = feature_layout(model, cfg.kind)
        self.start, self.end = check_extractor(cfg, self.layout)
        if cfg.kind == "router":
            modules, self._index = find_router_modules(model)
        else:
            modules, self._index = find_decoder_layers(model), 0
        self._modules = modules[self.start : self.end]
        self._outputs: list[torch.Tensor | None] = [None] * len(self._modules)
        self._handles: list[Any] = []
        self.attach()

    @property
    def dim(self) -> int:
        return (self.end - self.start) * self.layout.width

    def attach(self) -> None:
        if self._handles:
            return
        for slot, module in enumerate(self._modules):
            self._handles.append(module.register_forward_hook(self._make_hook(slot)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs = [None] * len(self._modules)

    def _make_hook(self, slot: int) -> Callable[..., None]:
        index = self._index

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self._outputs[slot] = output[index] if isinstance(output, (tuple, list)) else output

        return hook

    def clear(self) -> None:
        self._outputs = [None] * len(self._modules)

    def features(self, batch_size: int, positions: slice | None = None) -> torch.Tensor:
        """Features of the last forward, shape (batch, seq, dim), float32, on the model's device.

        ``positions`` selects sequence positions before the (cheap) softmax / top-k work, so a
        decoding step only transforms the rows it needs.
        """
        if any(out is None for out in self._outputs):
            raise RuntimeError("no forward pass has been captured yet (is the capture attached to this model?)")
        width = self.layout.width
        parts = []
        for out in self._outputs:
            x = out.reshape(batch_size, -1, width)  # type: ignore[union-attr]
            if positions is not None:
                x = x[:, positions]
            parts.append(x.float())
        stacked = torch.stack(parts, dim=2)  # (B, S, L, width)
        if self.cfg.kind == "router":
            stacked = torch.softmax(stacked, dim=-1)
            if self.cfg.use_top_k:
                top = torch.topk(stacked, self.cfg.k, dim=-1)
                stacked = torch.zeros_like(stacked).scatter_(-1, top.indices, top.values)
        return stacked.flatten(2)

    def __enter__(self) -> "FeatureCapture":
        self.attach()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()
