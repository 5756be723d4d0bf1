"""What tracing a YOLOv9 model needs, shared by conversion and deployment: its input channels, an
example image size, the ``forward`` flags fixed while tracing, and eval mode for the duration.

>>> import torch
>>> from fxrewrite.yolov9 import DetectionModel
>>> with torch.device("meta"):
...     model = DetectionModel("gelan-t", strides=[8, 16, 32])
>>> input_channels(model), example_size(model), fixed_flags(model)
(3, 32, {'augment': False, 'profile': False, 'visualize': False})
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..tensors import walk_modules

__all__ = ["MAX_IMAGE_SIZE", "input_channels", "example_input", "example_size", "fixed_flags", "set_eval", "restore_modes"]

#: Largest image side (``--imgsz``): a 4096 x 4096 image is already 200 MB in fp32, far beyond YOLO sizes.
MAX_IMAGE_SIZE = 4096


def input_channels(model: nn.Module) -> int:
    """The image channels the model's config says it reads (3 unless ``ch`` says otherwise)."""
    return int(model.yaml.get("ch", 3))


def example_input(model: nn.Module, size: int | tuple[int, int], batch: int = 1, *, dtype: torch.dtype | None = None,
                  device: Any = None, generator: torch.Generator | None = None) -> torch.Tensor | list[torch.Tensor]:
    """An input of ``model``: zeros (or, with ``generator``, random values in [0, 1)) of its config's ``ch``
    channels; a list of images when ``ch`` is a list (a fork whose model takes several images, one per entry)."""
    h, w = (size, size) if isinstance(size, int) else size
    ch = model.yaml.get("ch", 3)

    def image(channels: int) -> torch.Tensor:
        if generator is None:
            return torch.zeros(batch, int(channels), h, w, dtype=dtype, device=device)
        return torch.rand(batch, int(channels), h, w, generator=generator).to(dtype=dtype, device=device)

    return [image(c) for c in ch] if isinstance(ch, (list, tuple)) else image(ch)


def example_size(model: nn.Module) -> int:
    """The smallest image every level of the model accepts: the largest stride (32 for P5 models).

    Shapes are propagated on it during a rewrite; small keeps that cheap (even in fp16 on a CPU).
    """
    stride = getattr(model, "stride", None)
    return int(torch.as_tensor(stride).max().item()) if stride is not None else 32


def fixed_flags(model: nn.Module) -> dict[str, Any]:
    """Keyword flags of ``forward`` (augment, profile, visualize) fixed to False while tracing."""
    params = inspect.signature(model.forward).parameters
    return {name: False for name in ("augment", "profile", "visualize") if name in params}


def set_eval(model: nn.Module) -> dict[nn.Module, bool]:
    """Put every module of ``model`` in eval mode, as ``model.eval()`` does; returns the modes
    :func:`restore_modes` puts back (every module's, when any was training; a loaded checkpoint
    is in eval mode already: nothing to do, and an empty dict)."""
    modules = walk_modules(model)
    if not any(m.training for m in modules):
        return {}
    modes = {m: m.training for m in modules}
    _eval(model)
    return modes


def _eval(model: nn.Module) -> None:
    """``model.eval()`` without a call of torch's ``train`` per module (a thousand, in a detector):
    modules are visited in the order ``train`` visits them; one whose ``train`` is its own (its
    class's or set on it), or a model whose ``eval`` is, is switched through it, and decides for
    its submodules, as in ``model.eval()``; the others get the flag torch's ``train`` would set."""
    if _own(model, "eval", nn.Module.eval):
        model.eval()
        return
    stack = [model]
    while stack:
        m = stack.pop()
        if _own(m, "train", nn.Module.train):
            m.train(False)  # a block may do more there than set its flag
            continue
        if m.training:
            m.training = False
        stack.extend(reversed(dict.fromkeys(c for c in m._modules.values() if c is not None)))  # as children()


def _own(module: nn.Module, method: str, torchs: Any) -> bool:
    return method in vars(module) or getattr(type(module), method) is not torchs


def restore_modes(model: nn.Module, modes: dict[nn.Module, bool]) -> None:
    """Undo :func:`set_eval` (the user's model is left as it was given: also a module a block's own
    ``train`` switched the other way)."""
    for m, training in modes.items():
        if m.training != training:
            m.training = training
