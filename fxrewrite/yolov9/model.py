"""The YOLOv9 model classes: :class:`DetectionModel` and :class:`SegmentationModel` around the
layers the config planner builds, and :func:`model_class_for` (which of them a head belongs in).

The model classes keep the reference attribute names (``yaml``,
``yaml_file``, ``model``, ``save``, ``names``, ``inplace``, ``stride``) and
each layer carries ``i`` (index), ``f`` (from), ``type`` (qualified class
name) and ``np`` (parameter count). Building a model from a config is the planner's
(:mod:`fxrewrite.yolov9.planner`); which names a config may use is the catalogue's
(:mod:`fxrewrite.yolov9.catalogue`). Both are re-exported here under their old names.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import blocks, catalogue
from .catalogue import HEAD_ROLES, ROLES, register_block, registered_blocks, unregister_block
from .config import CONFIG_DIR, ConfigError, load_config, resolve_config_path
from .planner import (MAX_CHANNELS, MAX_PARAMETERS, MAX_REPEATS, activations_in_place, initialize_weights,
                      make_divisible, parse_model, save_indices)

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
    "activations_in_place",
    "save_indices",
    "BaseModel",
    "DetectionModel",
    "SegmentationModel",
    "Model",
    "model_class_for",
]

LOGGER = logging.getLogger(__name__)

#: Input resolution of the dry run that measures the head strides (2x the
#: largest stride of the shipped models, as in the reference).
STRIDE_PROBE_SIZE = 256


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
        if catalogue.role_of(type(head)) in HEAD_ROLES:
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
        if catalogue.role_of(type(head)) in HEAD_ROLES:
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


def model_class_for(head: type | str | None) -> type[DetectionModel]:
    """The model class a model whose last layer is ``head`` belongs in (the one place that decides):
    :class:`SegmentationModel` for a head of role ``segment`` in the catalogue, else
    :class:`DetectionModel`. ``head`` is the head's class (ours or the official code's twin) or
    its config name."""
    if isinstance(head, str):
        row = catalogue.block(head)
        role = row.role if row is not None else None
    else:
        role = catalogue.role_of(head) if isinstance(head, type) else None
    return SegmentationModel if role == "segment" else DetectionModel


def runs_layer_loop(model: nn.Module) -> bool:
    """Whether ``model`` computes with fxrewrite's own layer loop (:meth:`BaseModel._forward_once`
    reached through fxrewrite's ``forward``): it reads each layer's ``f`` and ``i`` and calls the
    layer, never looking inside it, so a layer-level trace may seal the layers
    (``fxrewrite.trace(..., sealed_leaves=True)``). A fork's or the official code's class, or a
    ``forward`` replaced on the object, is traced in full."""
    cls = type(model)
    return (cls.forward in (BaseModel.forward, DetectionModel.forward)
            and cls._forward_once is BaseModel._forward_once
            and not {"forward", "_forward_once"} & vars(model).keys())
