"""YOLOv9 plug-in: the YOLOv9 blocks and heads, the config builder, safe checkpoint I/O,
and the conversion of a training model (auxiliary PGI branch) into its GELAN inference model.

Importing it registers every YOLOv9 block and head with :mod:`fxrewrite.registry`,
so rule files (``plugins: [yolov9]``) can name them, registers the deployment
action ``fuse_repconv`` (:mod:`fxrewrite.yolov9.deploy`) and the action
``measure_strides`` (:mod:`fxrewrite.yolov9.actions`), and adds the ``convert``
and ``export`` commands to the ``fxrewrite`` CLI.
"""
from __future__ import annotations

import inspect

from torch import nn

from .. import registry
from . import actions, blocks, heads  # noqa: F401  (actions: registration)
from .convert import Conversion, ConversionError, convert, default_rules, derive_config
from .deploy import Fusion, FusionError, deploy_rules, fuse
from .model import ConfigError, DetectionModel, SegmentationModel

for _module in (blocks, heads):
    for _name, _cls in inspect.getmembers(_module, inspect.isclass):
        if issubclass(_cls, nn.Module) and _cls.__module__ == _module.__name__:
            registry.register_module_class(_cls)


def register_block(cls: type, official_name: str | None = None, *, name: str | None = None,
                   role: str = "same") -> type:
    """Teach fxrewrite a custom YOLOv9 block, everywhere it needs to know it.

    * config files name it ``name`` (default: the class name); ``role`` tells the
      builder how to derive its channels (see :data:`fxrewrite.yolov9.model.ROLES`);
    * checkpoints pickle it as ``official_name`` (default ``models.common.<ClassName>``),
      so :func:`~fxrewrite.yolov9.checkpoint.load_checkpoint` accepts it and saving writes it;
    * rule files may name it (``replace: {with: ...}``).

    >>> import torch
    >>> class Scale(torch.nn.Module):
    ...     def __init__(self, c1):
    ...         super().__init__()
    ...         self.w = torch.nn.Parameter(torch.ones(1, c1, 1, 1))
    ...     def forward(self, x):
    ...         return x * self.w
    >>> register_block(Scale) is Scale
    True
    """
    from . import classes, model

    model.register_block(cls, name, role=role, replace=True)
    classes.register_block(cls, official_name or f"models.common.{cls.__name__}")
    registry.register_module_class(cls, name)
    return cls


def register_cli(subparsers) -> None:
    from .cli import register
    from .export import register as register_export

    register(subparsers)
    register_export(subparsers)


__all__ = ["register_block", "DetectionModel", "SegmentationModel", "ConfigError", "convert", "Conversion", "ConversionError",
           "default_rules", "derive_config", "fuse", "Fusion", "FusionError", "deploy_rules"]
