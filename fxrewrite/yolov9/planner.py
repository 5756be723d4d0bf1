"""The config planner: a YOLOv9 layer table -> validated constructor calls, and the layers built from them.

A model config is a mapping with ``nc`` (classes), ``depth_multiple``,
``width_multiple``, optionally ``anchors``, ``activation``, ``ch`` and
``inplace``, and two layer tables ``backbone`` and ``head``.  Each layer is
``[from, number, module, args]``:

* ``from``: index of the input layer (``-1`` = previous layer, other negative
  values count back from the current layer) or a list of such indices;
* ``number``: repeat count (the module is stacked ``number`` times, after
  scaling by ``depth_multiple``);
* ``module``: a name from the block catalogue (:mod:`fxrewrite.yolov9.catalogue`);
* ``args``: constructor arguments; the planner adds/adjusts channel
  arguments according to the block's *role* (:data:`~fxrewrite.yolov9.catalogue.ROLES`).

The planner reproduces the channel bookkeeping of the reference YOLOv9
parser (so checkpoints line up key for key) but never evaluates config text
as Python: module names go through the catalogue and string arguments
through a small symbol table.  Bad configs raise :class:`ConfigError`.
Each built layer carries ``i`` (index), ``f`` (from), ``type`` (qualified class
name) and ``np`` (parameter count). The model classes are in :mod:`fxrewrite.yolov9.model`.
"""

from __future__ import annotations

import ast
import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..tensors import parameter_count
from . import blocks, catalogue
from .config import ConfigError

__all__ = [
    "MAX_PARAMETERS",
    "MAX_CHANNELS",
    "MAX_REPEATS",
    "LayerPlan",
    "lookup_block",
    "make_divisible",
    "plan_layers",
    "parse_model",
    "save_indices",
    "initialize_weights",
    "activations_in_place",
]

LOGGER = logging.getLogger(__name__)

#: Refuse configs whose model would exceed this many parameters (checked on
#: the meta device before any real memory is allocated).
MAX_PARAMETERS = 2_000_000_000
#: Largest channel count accepted for a single layer output.
MAX_CHANNELS = 65_536
#: Largest repeat count accepted for a layer (after depth scaling).
MAX_REPEATS = 1_000


def lookup_block(module: Any, source: str | None, layer: int) -> tuple[str, type, str]:
    """Resolve a layer's ``module`` field to (display name, class, role) through the catalogue."""
    if isinstance(module, str):
        row = catalogue.block(module)
        if row is None or row.role is None:
            known = ", ".join(catalogue.registered_blocks())
            raise ConfigError(
                f"unknown module {module!r}. Known modules: {known}. "
                f"Register your own with fxrewrite.yolov9.register_block(YourClass, name={module!r}, role=...)",
                source=source,
                layer=layer,
            )
        return module, row.resolve(), row.role
    if isinstance(module, type):
        # A class object in a config built in Python: accept it if registered.
        names = catalogue.names_of(module)
        if names:
            return module.__name__, module, catalogue.block(names[0]).role
        raise ConfigError(
            f"module class {module.__qualname__} is not registered. "
            "Register it with fxrewrite.yolov9.register_block(cls, role=...)",
            source=source,
            layer=layer,
        )
    raise ConfigError(f"module must be a block name, got {module!r}", source=source, layer=layer)


# ==========================================================================
# ==========================================================================
def make_divisible(x: float, divisor: int) -> int:
    """Smallest multiple of ``divisor`` that is >= ``x``."""
    return math.ceil(x / divisor) * divisor


def _resolve_argument(value: Any, symbols: Mapping[str, Any]) -> Any:
    """Interpret a string argument without ``eval``: a known symbol, a Python literal, or the string itself."""
    if not isinstance(value, str):
        return value
    if value in symbols:
        return symbols[value]
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value  # e.g. 'nearest' stays a plain string


_ACTIVATIONS = ("SiLU", "ReLU", "ReLU6", "LeakyReLU", "Hardswish", "GELU", "Mish", "ELU", "Sigmoid", "Tanh", "Identity")


def _activation_factory(spec: str, source: str | None) -> Callable[[], nn.Module]:
    """Parse an ``activation`` entry such as ``"nn.LeakyReLU(0.1)"`` into a factory of fresh modules."""
    try:
        node = ast.parse(spec.strip(), mode="eval").body
        call_args: list[Any] = []
        call_kwargs: dict[str, Any] = {}
        if isinstance(node, ast.Call):
            call_args = [ast.literal_eval(arg) for arg in node.args]
            call_kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            node = node.func
        name = ast.unparse(node)
    except (SyntaxError, ValueError) as error:
        raise ConfigError(f"cannot parse activation {spec!r}: {error}", source=source) from None
    short = name.removeprefix("torch.").removeprefix("nn.")
    if short not in _ACTIVATIONS:
        raise ConfigError(
            f"unsupported activation {spec!r}; use one of {', '.join('nn.' + a for a in _ACTIVATIONS)}", source=source
        )
    cls = getattr(nn, short)
    try:
        cls(*call_args, **call_kwargs)  # fail now, not in the middle of the build
    except TypeError as error:
        raise ConfigError(f"bad arguments in activation {spec!r}: {error}", source=source) from None
    return lambda: cls(*call_args, **call_kwargs)


# ==========================================================================
# Layer planning (validation and channel bookkeeping, no allocation)
# ==========================================================================
@dataclass
class LayerPlan:
    """Everything needed to instantiate one layer."""

    index: int
    source: int | list[int]  # the layer's 'from'
    repeats: int  # after depth scaling
    name: str
    cls: type
    role: str
    args: list[Any]
    out_channels: Any  # int, a list (CBLinear) or None (heads)
    stack: bool = field(default=True)  # False when the block consumes the repeat count itself

    def instantiate(self) -> nn.Module:
        if self.stack and self.repeats > 1:
            module: nn.Module = nn.Sequential(*(self.cls(*self.args) for _ in range(self.repeats)))
        else:
            module = self.cls(*self.args)
        module.i, module.f = self.index, self.source
        module.type = f"{self.cls.__module__}.{self.cls.__qualname__}"
        module.np = parameter_count(module)
        return module


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_channels(value: Any, what: str, source: str | None, layer: int) -> None:
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}", source=source, layer=layer)
    if value > MAX_CHANNELS:
        raise ConfigError(f"{what} {value} exceeds the limit of {MAX_CHANNELS} channels", source=source, layer=layer)


def _scaled_channels(value: int, gw: float, what: str, source: str | None, layer: int) -> int:
    """``value`` scaled by width_multiple and rounded up to a multiple of 8, refused above the channel limit."""
    scaled = value * gw
    if not scaled <= MAX_CHANNELS:  # also inf
        raise ConfigError(f"{what} {value} x width_multiple {gw} exceeds the limit of {MAX_CHANNELS} channels",
                          source=source, layer=layer)
    return make_divisible(scaled, 8)


def plan_layers(d: Mapping[str, Any], input_channels: int, source: str | None) -> list[LayerPlan]:
    """Validate the layer tables of ``d`` and compute constructor arguments and channels."""
    for key in ("nc", "depth_multiple", "width_multiple", "backbone", "head"):
        if key not in d:
            raise ConfigError(f"missing top-level key {key!r}", source=source)
    nc, gd, gw = d["nc"], d["depth_multiple"], d["width_multiple"]
    if not _is_int(nc) or nc < 1:
        raise ConfigError(f"nc must be a positive integer, got {nc!r}", source=source)
    for key, value in (("depth_multiple", gd), ("width_multiple", gw)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ConfigError(f"{key} must be a positive number, got {value!r}", source=source)
    if not all(isinstance(d[key], list) for key in ("backbone", "head")):
        raise ConfigError("'backbone' and 'head' must be lists of layers", source=source)
    tables = d["backbone"] + d["head"]
    if not tables:
        raise ConfigError("the config has no layers", source=source)

    # The reference exempts a channel count equal to "anchors * (nc + 5)" (the
    # output width of old anchor-based heads) from width scaling; kept so
    # that such configs build identically.
    anchors = d.get("anchors")
    anchor_outputs = None
    if _is_int(anchors):
        anchor_outputs = anchors * (nc + 5)
    elif isinstance(anchors, list) and anchors and isinstance(anchors[0], list):
        anchor_outputs = len(anchors[0]) // 2 * (nc + 5)

    symbols = {"nc": nc, "None": None, "True": True, "False": False}
    channels: list[Any] = [input_channels]  # channels[j] = output channels of layer j (input image before layer 0)
    plans: list[LayerPlan] = []
    for i, entry in enumerate(tables):
        if not isinstance(entry, (list, tuple)) or len(entry) != 4:
            raise ConfigError(
                f"malformed layer entry {entry!r}: expected [from, number, module, args]", source=source, layer=i
            )
        f, n, module, args = entry
        name, cls, role = lookup_block(module, source, i)
        sources = _validate_from(f, i, source)
        if not _is_int(n) or n < 1:
            raise ConfigError(f"repeat count must be a positive integer, got {n!r}", source=source, layer=i)
        if not isinstance(args, (list, tuple)):
            raise ConfigError(f"args must be a list, got {args!r}", source=source, layer=i)
        args = [_resolve_argument(a, symbols) for a in args]
        try:
            repeats = max(round(n * gd), 1) if n > 1 else n
        except OverflowError:  # n * depth_multiple is infinite
            repeats = math.inf
        if repeats > MAX_REPEATS:
            raise ConfigError(f"repeat count {repeats} exceeds the limit of {MAX_REPEATS}", source=source, layer=i)

        def input_channels_of(j: int, single: bool = True) -> Any:
            value = channels[j]
            if single and not _is_int(value):
                raise ConfigError(
                    f"{name} needs a tensor input, but layer {j % i} produces "
                    f"{'split CBLinear outputs' if isinstance(value, list) else 'no feature map'}",
                    source=source,
                    layer=i,
                )
            return value

        stack = True
        if role in ("scaled", "scaled_repeated"):
            if isinstance(f, list):
                raise ConfigError(f"{name} takes a single input, but 'from' is a list {f}", source=source, layer=i)
            c_in = input_channels_of(f)
            if not args:
                raise ConfigError(f"{name} needs its output channel count as first argument", source=source, layer=i)
            c_out = args[0]
            _check_channels(c_out, "output channel count", source, i)
            if c_out != anchor_outputs:
                c_out = _scaled_channels(c_out, gw, "output channel count", source, i)
            _check_channels(c_out, f"output channel count (after width_multiple {gw})", source, i)
            args = [c_in, c_out, *args[1:]]
            if role == "scaled_repeated":
                args.insert(2, repeats)
                stack = False
            out = c_out
        elif role == "batchnorm":
            out = input_channels_of(sources[0])
            args = [out]
        elif role == "concat":
            out = sum(input_channels_of(j) for j in sources)
        elif role == "cblinear":
            if not args or not isinstance(args[0], list) or not args[0]:
                raise ConfigError(f"{name} needs a list of output channel counts as first argument", source=source, layer=i)
            for c in args[0]:
                _check_channels(c, "CBLinear output channel count", source, i)
            # The routed channel counts are used as written (no width scaling),
            # as in the reference.
            out = list(args[0])
            args = [input_channels_of(sources[0]), out, *args[1:]]
        elif role == "cbfuse":
            out = input_channels_of(sources[-1])
        elif role in catalogue.HEAD_ROLES:
            if role == "segment":
                if len(args) < 3:
                    raise ConfigError(f"{name} needs [nc, masks, prototypes] arguments", source=source, layer=i)
                _check_channels(args[2], "prototype channel count", source, i)
                args[2] = _scaled_channels(args[2], gw, "prototype channel count", source, i)
            args.append([input_channels_of(j) for j in sources])
            out = None  # heads produce predictions, not a feature map
        else:  # "same"
            out = input_channels_of(sources[0], single=False)
        plans.append(LayerPlan(i, f, repeats, name, cls, role, args, out, stack))
        if i == 0:
            channels = []
        channels.append(out)
    return plans


def _validate_from(f: Any, i: int, source: str | None) -> list[int]:
    """Check a layer's 'from' field and return it as a list."""
    sources = f if isinstance(f, list) else [f]
    if not sources or not all(_is_int(j) for j in sources):
        raise ConfigError(f"'from' must be an integer or a list of integers, got {f!r}", source=source, layer=i)
    for j in sources:
        # -1 is always valid (previous layer, or the image for layer 0);
        # otherwise j must name an earlier layer, directly or counted back.
        if j != -1 and not (-i <= j < i):
            allowed = f"layers 0..{i - 1} or offsets -1..-{i}" if i > 0 else "only -1 (the input image)"
            raise ConfigError(f"'from' index {j} is out of range (allowed: {allowed})", source=source, layer=i)
    return sources


def _default_device_is_meta() -> bool:
    return torch.get_default_device().type == "meta"


def parse_model(
    d: Mapping[str, Any],
    ch: Sequence[int],
    *,
    source: str | None = None,
    max_parameters: int = MAX_PARAMETERS,
) -> tuple[nn.Sequential, list[int]]:
    """Build the layers described by config ``d``; returns ``(layers, save)``.

    ``ch`` is ``[input_channels]`` (reference signature).  ``save`` lists,
    sorted and with repetitions, the layer indices whose outputs later layers
    read.  The parameter count is checked against ``max_parameters`` on the
    meta device first, so absurd configs are refused before allocation.
    ``d`` is not modified.
    """
    plans = plan_layers(copy.deepcopy(dict(d)), ch[-1], source)
    activation = d.get("activation")
    factory = _activation_factory(activation, source) if activation else nn.SiLU

    with blocks.default_activation(factory):
        meta_layers = []
        total = 0
        with torch.device("meta"):
            for plan in plans:
                try:
                    layer = plan.instantiate()
                except (TypeError, ValueError, RuntimeError, IndexError, KeyError, AssertionError) as error:
                    if isinstance(error, ConfigError):
                        raise
                    shown = ", ".join(repr(a) for a in plan.args)
                    raise ConfigError(
                        f"cannot construct {plan.name}({shown}): {error}", source=source, layer=plan.index
                    ) from error
                total += layer.np
                if total > max_parameters:
                    raise ConfigError(
                        f"the model would exceed {max_parameters:,} parameters ({total:,} up to this layer); "
                        "check width_multiple and the channel arguments",
                        source=source,
                        layer=plan.index,
                    )
                meta_layers.append(layer)
        layers = meta_layers if _default_device_is_meta() else [plan.instantiate() for plan in plans]

    for plan, layer in zip(plans, layers):
        LOGGER.debug("%3d %18s %3d %10d  %-40s %s", plan.index, plan.source, plan.repeats, layer.np, layer.type, plan.args)
    return nn.Sequential(*layers), save_indices([plan.source for plan in plans])


def save_indices(sources: Sequence[int | list[int]]) -> list[int]:
    """The layers whose outputs later layers read, given each layer's ``from``: sorted, with
    repetitions, as the reference's ``save`` list."""
    save: list[int] = []
    for index, source in enumerate(sources):
        for j in source if isinstance(source, list) else [source]:
            if j != -1:
                save.append(j % index)
    return sorted(save)


def initialize_weights(model: nn.Module) -> None:
    """Reference training defaults: BatchNorm eps 1e-3 / momentum 0.03, in-place activations.

    Convolution weights keep PyTorch's default initialisation.
    """
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.eps = 1e-3
            module.momentum = 0.03
    activations_in_place(model)


def activations_in_place(model: nn.Module) -> None:
    """The reference builder's activation setting: every activation works in place."""
    for module in model.modules():
        if type(module) in (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU):
            module.inplace = True
