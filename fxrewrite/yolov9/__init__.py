"""YOLOv9 plug-in: the YOLOv9 blocks and heads, the config builder, safe checkpoint I/O,
and the conversion of a training model (auxiliary PGI branch) into its GELAN inference model.

Importing it registers every YOLOv9 block and head with :mod:`fxrewrite.registry`,
so rule files (``plugins: [yolov9]``) can name them, registers the deployment
action ``fuse_repconv`` (:mod:`fxrewrite.yolov9.deploy`), and adds the ``convert``
and ``export`` commands to the ``fxrewrite`` CLI.
"""
from __future__ import annotations

import inspect

from torch import nn

from .. import registry
from . import blocks, heads
from .convert import Conversion, ConversionError, convert, default_rules, derive_config
from .deploy import Fusion, FusionError, deploy_rules, fuse
from .model import ConfigError, DetectionModel, SegmentationModel

for _module in (blocks, heads):
    for _name, _cls in inspect.getmembers(_module, inspect.isclass):
        if issubclass(_cls, nn.Module) and _cls.__module__ == _module.__name__:
            registry.register_module_class(_cls)


def register_cli(subparsers) -> None:
    from .cli import register
    from .export import register as register_export

    register(subparsers)
    register_export(subparsers)


__all__ = ["DetectionModel", "SegmentationModel", "ConfigError", "convert", "Conversion", "ConversionError",
           "default_rules", "derive_config", "fuse", "Fusion", "FusionError", "deploy_rules"]
