"""YOLOv9 plug-in: the YOLOv9 blocks and heads, the config builder, safe checkpoint I/O,
and the conversion of a training model (auxiliary PGI branch) into its GELAN inference model.

Importing it registers every YOLOv9 block and head of the block catalogue
(:mod:`fxrewrite.yolov9.catalogue`, where a new block goes: :func:`register_block`)
with :mod:`fxrewrite.registry`,
so rule files (``plugins: [yolov9]``) can name them, registers the deployment
action ``fuse_repconv`` (:mod:`fxrewrite.yolov9.deploy`) and the action
``measure_strides`` (:mod:`fxrewrite.yolov9.actions`), and adds the ``convert``
and ``export`` commands to the ``fxrewrite`` CLI.
"""
from __future__ import annotations

from . import actions, blocks, catalogue, heads  # noqa: F401  (actions: registration)
from .catalogue import register_block
from .convert import Conversion, ConversionError, convert, default_rules, derive_config
from .deploy import Fusion, FusionError, deploy_rules, fuse
from .model import ConfigError, DetectionModel, SegmentationModel

catalogue.register_rule_classes()  # rule files may name every block and head (`with: DDetect`)


def register_cli(subparsers) -> None:
    from .cli import register
    from .export import register as register_export

    register(subparsers)
    register_export(subparsers)


__all__ = ["register_block", "DetectionModel", "SegmentationModel", "ConfigError", "convert", "Conversion", "ConversionError",
           "default_rules", "derive_config", "fuse", "Fusion", "FusionError", "deploy_rules"]
