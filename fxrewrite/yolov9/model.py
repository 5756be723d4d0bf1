"""YOLOv9 model containers and the YAML layer-table builder.

A model config is a mapping with ``nc`` (classes), ``depth_multiple``,
``width_multiple``, optionally ``anchors``, ``activation``, ``ch`` and
``inplace``, and two layer tables ``backbone`` and ``head``.  Each layer is
``[from, number, module, args]``:

* ``from``: index of the input layer (``-1`` = previous layer, other negative
  values count back from the current layer) or a list of such indices;
* ``number``: repeat count (the module is stacked ``number`` times, after
  scaling by ``depth_multiple``);
* ``module``: a name from the block table (see :func:`register_block`);
* ``args``: constructor arguments; the builder adds/adjusts channel
  arguments according to the block's *role*.

The builder reproduces the channel bookkeeping of the reference YOLOv9
parser (so checkpoints line up key for key) but never evaluates config text
as Python: module names go through an explicit table and string arguments
through a small symbol table.  Bad configs raise :class:`ConfigError`.

The model classes keep the reference attribute names (``yaml``,
``yaml_file``, ``model``, ``save``, ``names``, ``inplace``, ``stride``) and
each layer carries ``i`` (index), ``f`` (from), ``type`` (qualified class
name) and ``np`` (parameter count).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import blocks
from .config import CONFIG_DIR, load_config, resolve_config_path

__all__ = [
    "ConfigError",
    "ROLES",
    "MAX_PARAMETERS",
    "MAX_CHANNELS",
    "MAX_REPEATS",
    "register_block",
    "unregister_block",
    "registered_blocks",
    "make_divisible",
    "parse_model",
    "initialize_weights",
    "BaseModel",
    "DetectionModel",
    "SegmentationModel",
    "Model",
]

LOGGER = logging.getLogger(__name__)

#: Refuse configs whose model would exceed this many parameters (checked on
#: the meta device before any real memory is allocated).
MAX_PARAMETERS = 2_000_000_000
#: Largest channel count accepted for a single layer output.
MAX_CHANNELS = 65_536
#: Largest repeat count accepted for a layer (after depth scaling).
MAX_REPEATS = 1_000

#: Input resolution of the dry run that measures the head strides (2x the
#: largest stride of the shipped models, as in the reference).
STRIDE_PROBE_SIZE = 256


class ConfigError(ValueError):
    """A model config cannot be built.

    The message names the config file (when the config came from one), the
    layer index (when a single layer is at fault) and the problem.
    """

    def __init__(self, problem: str, *, source: str | None = None, layer: int | None = None):
        self.problem = problem
        self.source = source
        self.layer = layer
        where = []
        if source:
            where.append(str(source))
        if layer is not None:
            where.append(f"layer {layer}")
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)


# ==========================================================================
# Block table
# ==========================================================================
#: How the builder treats a block's channels and arguments:
ROLES = {
    "same": "output channels = channels of the (first) input; args passed as written",
    "scaled": "args[0] is the output channel count, scaled by width_multiple and rounded up to a "
    "multiple of 8; the input channel count is prepended: cls(c_in, c_out, *args[1:])",
    "scaled_repeated": "like 'scaled', and the repeat count is passed as third argument instead of stacking copies",
    "concat": "output channels = sum of the inputs' channels",
    "cblinear": "args[0] is a list of output channel counts (not width-scaled); cls(c_in, channel_list, *args[1:])",
    "cbfuse": "output channels = channels of the last input",
    "batchnorm": "constructed as cls(c_in)",
    "detect": "a detection head: the list of input channel counts is appended to args",
    "segment": "a segmentation head: like 'detect', and args[2] (prototype width) is width-scaled",
}
_HEAD_ROLES = ("detect", "segment")


@dataclass
class _BlockEntry:
    """A block table row; ``target`` is a class or a lazy ``"module:attr"`` reference."""

    target: type | str
    role: str

    def resolve(self) -> type:
        if isinstance(self.target, str):
            module_name, attr = self.target.split(":")
            self.target = getattr(importlib.import_module(module_name), attr)
        return self.target


_BLOCKS: dict[str, _BlockEntry] = {}


def register_block(cls: type, name: str | None = None, *, role: str = "same", replace: bool = False) -> type:
    """Make ``cls`` usable as ``module`` in layer tables under ``name`` (default: class name).

    ``role`` tells the builder how to derive channels and constructor
    arguments (see :data:`ROLES`).  Re-registering an existing name with a
    different class requires ``replace=True``.  Returns ``cls``, so the bare
    form ``@register_block`` works as a class decorator (role "same").
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_block expects an nn.Module subclass, got {cls!r}")
    name = name or cls.__name__
    existing = _BLOCKS.get(name)
    if existing is not None and not replace and existing.target is not cls:
        raise ValueError(f"block name {name!r} is already registered; pass replace=True to override it")
    _BLOCKS[name] = _BlockEntry(cls, role)
    return cls


def unregister_block(name: str) -> None:
    """Remove a block name from the table (e.g. a plug-in cleaning up after itself)."""
    if name not in _BLOCKS:
        raise KeyError(f"no block registered under {name!r}")
    del _BLOCKS[name]


def registered_blocks() -> dict[str, str]:
    """Block names usable in configs, mapped to their role."""
    return {name: entry.role for name, entry in sorted(_BLOCKS.items())}


def _register_defaults() -> None:
    scaled = [blocks.Conv, blocks.AConv, blocks.ADown, blocks.ELAN1, blocks.RepNCSPELAN4, blocks.SPPELAN]
    for cls in scaled:
        register_block(cls, role="scaled")
    register_block(blocks.Concat, role="concat")
    register_block(blocks.CBLinear, role="cblinear")
    register_block(blocks.CBFuse, role="cbfuse")
    # Inner blocks are accepted like the reference accepts them: no channel
    # bookkeeping, the config spells out every argument.
    for cls in (blocks.Silence, blocks.SP, blocks.RepConvN, blocks.RepNBottleneck, blocks.RepNCSP):
        register_block(cls, role="same")
    torch_layers = {
        "Upsample": "same",
        "Identity": "same",
        "MaxPool2d": "same",
        "ZeroPad2d": "same",
        "BatchNorm2d": "batchnorm",
        "ConvTranspose2d": "scaled",
    }
    for attr, role in torch_layers.items():
        for prefix in ("nn.", "torch.nn."):
            register_block(getattr(nn, attr), f"{prefix}{attr}", role=role)
    # Heads live in a sibling module; import it only when a config uses one.
    heads = {
        "Detect": "detect",
        "DDetect": "detect",
        "DualDetect": "detect",
        "DualDDetect": "detect",
        "TripleDetect": "detect",
        "TripleDDetect": "detect",
        "Segment": "segment",
        "DSegment": "segment",
        "DualDSegment": "segment",
    }
    for head_name, role in heads.items():
        _BLOCKS[head_name] = _BlockEntry(f"{__package__}.heads:{head_name}", role)


_register_defaults()


def _registered_role(module: nn.Module) -> str | None:
    """Role under which the class of ``module`` is registered (None if unregistered)."""
    cls = type(module)
    for entry in _BLOCKS.values():
        target = entry.target
        if isinstance(target, str):  # not imported yet: only a class of the same name can be it
            if target.rpartition(":")[2] != cls.__name__:
                continue
            target = entry.resolve()
        if target is cls:
            return entry.role
    return None


def _lookup_block(module: Any, source: str | None, layer: int) -> tuple[str, type, str]:
    """Resolve a layer's ``module`` field to (display name, class, role)."""
    if isinstance(module, str):
        entry = _BLOCKS.get(module)
        if entry is None:
            raise ConfigError(
                f"unknown module {module!r}. Known modules: {', '.join(sorted(_BLOCKS))}. "
                f"Register your own with fxrewrite.yolov9.model.register_block(YourClass, name={module!r}, role=...)",
                source=source,
                layer=layer,
            )
        return module, entry.resolve(), entry.role
    if isinstance(module, type):
        # A class object in a config built in Python: accept it if registered.
        for entry in _BLOCKS.values():
            if entry.target is module or (isinstance(entry.target, str) and entry.resolve() is module):
                return module.__name__, module, entry.role
        raise ConfigError(
            f"module class {module.__qualname__} is not registered. "
            "Register it with fxrewrite.yolov9.model.register_block(cls, role=...)",
            source=source,
            layer=layer,
        )
    raise ConfigError(f"module must be a block name, got {module!r}", source=source, layer=layer)


# ==========================================================================
# Config values
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
class _LayerPlan:
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
        module.np = sum(p.numel() for p in module.parameters())
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


def _plan_layers(d: Mapping[str, Any], input_channels: int, source: str | None) -> list[_LayerPlan]:
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
    plans: list[_LayerPlan] = []
    for i, entry in enumerate(tables):
        if not isinstance(entry, (list, tuple)) or len(entry) != 4:
            raise ConfigError(
                f"malformed layer entry {entry!r}: expected [from, number, module, args]", source=source, layer=i
            )
        f, n, module, args = entry
        name, cls, role = _lookup_block(module, source, i)
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
        elif role in _HEAD_ROLES:
            if role == "segment":
                if len(args) < 3:
                    raise ConfigError(f"{name} needs [nc, masks, prototypes] arguments", source=source, layer=i)
                _check_channels(args[2], "prototype channel count", source, i)
                args[2] = _scaled_channels(args[2], gw, "prototype channel count", source, i)
            args.append([input_channels_of(j) for j in sources])
            out = None  # heads produce predictions, not a feature map
        else:  # "same"
            out = input_channels_of(sources[0], single=False)
        plans.append(_LayerPlan(i, f, repeats, name, cls, role, args, out, stack))
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
    plans = _plan_layers(copy.deepcopy(dict(d)), ch[-1], source)
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


# ==========================================================================
# Models
# ==========================================================================
def _flag_set(value: Any) -> bool:
    """True for a truthy option; False for unset options and for torch.fx proxies (tracing)."""
    if value is None or value is False or isinstance(value, torch.fx.Proxy):
        return False
    return bool(value)


def _first_feature_list(output: Any) -> list[torch.Tensor]:
    """Locate the per-level feature maps in a head's training-mode output.

    Heads return the list of feature maps (single heads), a list of such
    lists (dual/triple heads, first = the one the strides refer to), or a
    tuple whose first item is one of those (segmentation heads).  Follow the
    first item until a list of 4-d tensors is reached.
    """
    while isinstance(output, (list, tuple)) and output and isinstance(output[0], (list, tuple)):
        output = output[0]
    if (
        isinstance(output, (list, tuple))
        and output
        and all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in output)
    ):
        return list(output)
    raise RuntimeError("cannot locate per-level feature maps in the head output; pass strides= explicitly")


#: Head attributes holding bookkeeping tensors that must follow the model
#: across .to()/.half() while keeping their values (see BaseModel._apply).
_HEAD_TENSORS = ("stride", "anchors", "strides")


class BaseModel(nn.Module):
    """Sequential layer graph: layer ``i`` reads the outputs named by its ``f``."""

    def forward(self, x, profile=False, visualize=False):
        return self._forward_once(x, profile, visualize)

    def _forward_once(self, x, profile=False, visualize=False):
        if _flag_set(profile) or _flag_set(visualize):
            raise NotImplementedError("layer profiling / feature visualisation is not available in fxrewrite")
        outputs: list[Any] = []  # outputs[j] is kept only if a later layer reads layer j
        for layer in self.model:
            if layer.f != -1:
                if isinstance(layer.f, int):
                    x = outputs[layer.f]
                else:
                    x = [x if j == -1 else outputs[j] for j in layer.f]
            x = layer(x)
            outputs.append(x if layer.i in self.save else None)
        return x

    def fuse(self):
        """Fold BatchNorms into convolutions and merge RepConvN branches, for inference."""
        for module in self.model.modules():
            if isinstance(module, blocks.RepConvN) and hasattr(module, "conv1"):
                module.fuse_convs()
                module.forward = module.forward_fuse
            if isinstance(module, blocks.Conv) and hasattr(module, "bn"):
                module.conv = blocks.fuse_conv_bn(module.conv, module.bn)
                del module.bn
                module.forward = module.forward_fuse
        return self

    def info(self) -> dict[str, int]:
        """Layer, parameter and trainable-parameter counts (also logged)."""
        summary = {
            "layers": len(list(self.modules())),
            "parameters": sum(p.numel() for p in self.parameters()),
            "gradients": sum(p.numel() for p in self.parameters() if p.requires_grad),
        }
        LOGGER.info("%s summary: %s", type(self).__name__, summary)
        return summary

    def _apply(self, fn, recurse=True):
        # The head keeps its strides (and cached anchors) as plain tensor
        # attributes, which nn.Module does not move.  Move them along, but
        # keep their *values*: fn may create uninitialised storage (to_empty)
        # or a meta tensor, and the stride is not learnable state that a
        # later load_state_dict would restore.
        head = self.model[-1] if len(getattr(self, "model", ())) else None
        kept = {}
        if head is not None:
            kept = {name: getattr(head, name) for name in _HEAD_TENSORS if isinstance(getattr(head, name, None), torch.Tensor)}
        result = super()._apply(fn, recurse)
        for name, old in kept.items():
            setattr(head, name, _moved_keeping_values(fn, old))
        return result


@torch.no_grad()
def _moved_keeping_values(fn: Callable[[torch.Tensor], torch.Tensor], old: torch.Tensor) -> torch.Tensor:
    new = fn(old)
    if new is old:
        return old
    if new.device.type == "meta" and old.device.type != "meta":
        return old  # never trade known values for a meta placeholder
    if old.device.type != "meta" and new.shape == old.shape:
        new.copy_(old)  # fn may have produced uninitialised memory (to_empty)
    return new


@contextlib.contextmanager
def _batchnorms_bypassed(model: nn.Module):
    """Temporarily make every BatchNorm an identity.

    Only used for the shape-only stride dry run: BatchNorm never changes
    shapes, and on the meta device it runs through slow Python
    decompositions (it dominated the dry run's cost).  Skipping it also
    guarantees that no running statistics are touched.
    """
    bypassed = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module in bypassed:
        module.forward = _identity
    try:
        yield
    finally:
        for module in bypassed:
            del module.forward


def _identity(x):
    return x


class DetectionModel(BaseModel):
    """YOLOv9 / GELAN model built from a config.

    ``cfg`` is a shipped config name (``"yolov9-c"``), a YAML path, or a
    config mapping (copied, never modified).  ``nc`` overrides the class
    count.  ``strides`` gives the head strides (e.g. ``[8, 16, 32]``) and
    skips the dry run that would otherwise measure them; the dry run itself
    runs on the meta device, so it is cheap and leaves every parameter and
    BatchNorm buffer untouched.  The whole model can be built under
    ``with torch.device("meta"):``.
    """

    def __init__(self, cfg="yolov9-c", ch=3, nc=None, anchors=None, *, strides=None):
        super().__init__()
        source = None
        if isinstance(cfg, Mapping):
            self.yaml = copy.deepcopy(dict(cfg))
        elif isinstance(cfg, (str, os.PathLike)):
            try:
                path = resolve_config_path(cfg)
            except FileNotFoundError as error:
                raise ConfigError(str(error)) from None
            self.yaml_file = path.name
            # Shipped configs are named by file name, user files by the path given.
            source = path.name if path.parent == CONFIG_DIR else str(cfg)
            self.yaml = load_config(path)
        else:
            raise TypeError(f"cfg must be a config name, a path or a mapping, got {type(cfg).__name__}")

        # As in the reference, an input channel count written in the config wins.
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc and nc != self.yaml.get("nc"):
            LOGGER.info("overriding config nc=%s with nc=%s", self.yaml.get("nc"), nc)
            self.yaml["nc"] = nc
        if anchors:
            self.yaml["anchors"] = round(anchors)
        self.model, self.save = parse_model(self.yaml, ch=[ch], source=source)
        self.names = [str(i) for i in range(self.yaml["nc"])]
        self.inplace = self.yaml.get("inplace", True)

        head = self.model[-1]
        if _registered_role(head) in _HEAD_ROLES:
            head.inplace = self.inplace
            if strides is None:
                strides = self._measure_strides(ch)
            stride = torch.tensor([float(s) for s in strides], device="cpu")
            expected = getattr(head, "nl", len(stride))
            if len(stride) != expected:
                raise ValueError(f"got {len(stride)} strides for a head with {expected} levels")
            head.stride = stride
            self.stride = head.stride
            if hasattr(head, "bias_init"):
                head.bias_init()
        initialize_weights(self)

    @classmethod
    def from_layers(cls, config: Mapping[str, Any], layers: Sequence[nn.Module]) -> "DetectionModel":
        """A model around ``layers`` that ``config`` describes, without building or initialising anything.

        Used to assemble a converted model from existing layers (their tensors and settings are
        kept as they are); each layer must already carry its ``i`` and ``f``, and the head its
        ``stride``. ``config`` is copied.
        """
        model = cls.__new__(cls)
        BaseModel.__init__(model)
        model.yaml = copy.deepcopy(dict(config))
        model.yaml.setdefault("ch", 3)
        model.model = nn.Sequential(*layers)
        model.save = save_indices([layer.f for layer in layers])
        model.names = [str(i) for i in range(model.yaml["nc"])]
        model.inplace = model.yaml.get("inplace", True)
        head = model.model[-1]
        if _registered_role(head) in _HEAD_ROLES:
            head.inplace = model.inplace
            if isinstance(getattr(head, "stride", None), torch.Tensor):
                model.stride = head.stride
        return model

    def _measure_strides(self, ch: int) -> list[float]:
        """Run a zero image through a meta-device copy of the state and compare feature sizes."""
        size = STRIDE_PROBE_SIZE
        state = {name: torch.empty_like(t, device="meta") for name, t in self.named_parameters()}
        state.update({name: torch.empty_like(t, device="meta") for name, t in self.named_buffers()})
        image = torch.zeros(1, ch, size, size, device="meta")
        was_training = self.training
        self.train()  # heads return raw feature maps in training mode
        try:
            with torch.no_grad(), _batchnorms_bypassed(self):
                output = torch.func.functional_call(self, state, (image,))
        finally:
            self.train(was_training)
        return [size / feature.shape[-2] for feature in _first_feature_list(output)]

    def forward(self, x, augment=False, profile=False, visualize=False):
        if _flag_set(augment):
            raise NotImplementedError("test-time augmentation is not available in fxrewrite")
        return self._forward_once(x, profile, visualize)


class SegmentationModel(DetectionModel):
    """DetectionModel whose head also predicts instance masks."""

    def __init__(self, cfg="yolov9-c-dseg", ch=3, nc=None, anchors=None, *, strides=None):
        super().__init__(cfg, ch, nc, anchors, strides=strides)


#: Reference alias.
Model = DetectionModel
