"""Drawings of a YOLOv9 conversion: layers grouped into backbone / head / auxiliary boxes.

The boxes come from the model's config (``backbone`` vs ``head`` sections) and
from the conversion itself: the auxiliary block is exactly what the rules pruned,
so the picture shows at a glance what PGI adds and the conversion removes. In the
"after" picture every layer is labelled with its number in the converted model and
the training layer it comes from (``model.22 <- model.38``, :func:`layer_rename`).

>>> import torch
>>> from fxrewrite.yolov9 import DetectionModel, convert
>>> torch.manual_seed(0) and None
>>> conversion = convert(DetectionModel("yolov9-t").eval())
>>> drawing = draw_conversion(conversion)
>>> sorted({box for box in drawing.clusters.values() if box})  # input and output stay outside
[('auxiliary',), ('backbone',), ('head',)]
>>> layer_rename(conversion), layer_rename(conversion.result)
({'model.29': 'model.22'}, {'model.29': 'model.22'})
>>> "<B>model.22</B>" in draw_conversion(conversion, view="after").source  # model.22 <- model.29
True
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from torch import fx

from ..io import check_output
from ..draw import Drawing, draw_rewrite, write_rewrite_drawings
from ..engine import RewriteResult
from .convert import Conversion

BACKBONE, HEAD, AUXILIARY = "backbone", "head", "auxiliary"


def layer_of(node: fx.Node) -> int | None:
    """The top-level layer (``model.N``) a node belongs to, from its provenance."""
    prov = node.meta.get("provenance")
    parts = prov.module.split(".") if prov is not None else []
    return int(parts[1]) if len(parts) >= 2 and parts[0] == "model" and parts[1].isdigit() else None


def layer_clusters(result: RewriteResult, config: dict, *, layers: bool | None = None
                   ) -> dict[str, str | tuple[str, str]]:
    """Node name -> ``backbone`` / ``head`` / ``auxiliary`` for every node of the drawn graphs.

    A layer is auxiliary when the rewrite pruned every node of it; works at layer and at op granularity.
    With ``layers`` (the default at op granularity, when some layer was traced into several nodes)
    the nodes of each layer also get a box of their own inside their section's: the label is then
    ``(section, "model.N")``, and a layer drawn as one node stays directly in its section. Besides
    showing which operations make up which layer, the layer boxes keep the drawing fast: dot routes
    the long skip connections between the boxes (yolov9-e's 1,400 operations: dot takes 0.35 s with
    them, about 1 s with the section boxes only).
    """
    n_backbone = len(config["backbone"])
    status = result.node_status
    found: dict[str, int] = {}
    for graph in (result.original.graph, result.module.graph):
        for node in graph.nodes:
            layer = layer_of(node)
            if layer is not None:
                found[node.name] = layer
    kept = {layer for name, layer in found.items() if status.get(name) != "pruned"}
    sizes = Counter(found.values())
    if layers is None:
        layers = any(size > 1 for size in sizes.values())
    boxes: dict[str, str | tuple[str, str]] = {}
    for name, layer in found.items():
        section = AUXILIARY if layer not in kept else BACKBONE if layer < n_backbone else HEAD
        boxes[name] = (section, f"model.{layer}") if layers and sizes[layer] > 1 else section
    return boxes


def layer_rename(rewrite: Conversion | RewriteResult) -> dict[str, str]:
    """Old layer path -> new one (``model.29`` -> ``model.22``) for every layer the conversion renumbers:
    the ``rename`` of :func:`fxrewrite.draw.draw_rewrite`. From a conversion's ``layer_map``, or from a
    rewrite alone (the layers its graph still has, numbered in order, as the conversion numbers them)."""
    if isinstance(rewrite, Conversion):
        layer_map = rewrite.layer_map
    else:
        kept = dict.fromkeys(layer for layer in map(layer_of, rewrite.module.graph.nodes) if layer is not None)
        layer_map = dict(enumerate(kept))
    return {f"model.{old}": f"model.{new}" for new, old in layer_map.items() if new != old}


def draw_conversion(conversion: Conversion, *, view: str = "overlay", **kwargs) -> Drawing:
    """Draw a conversion (``view``: overlay, before, after, side_by_side) with YOLO boxes; in the
    "after" picture the layers carry their new number and their origin."""
    kwargs.setdefault("clusters", layer_clusters(conversion.result, conversion.source.yaml))
    kwargs.setdefault("rename", layer_rename(conversion))
    kwargs.setdefault("title", f"{conversion.head} -> {type(conversion.model.model[-1]).__name__}: "
                               f"{len(conversion.source.model)} -> {len(conversion.model.model)} layers")
    return draw_rewrite(conversion.result, view=view, **kwargs)


def write_conversion_drawings(conversion: Conversion, folder, *, force: bool = False, formats=("svg",), **kwargs):
    """Write before, after and diff drawings (``formats``: svg, png, dot) of a conversion into ``folder``;
    existing files are refused unless ``force``."""
    folder = Path(folder)
    for name in ("before", "after", "diff"):
        for fmt in formats:
            check_output(folder / f"{name}.{fmt}", force=force)
    kwargs.setdefault("clusters", layer_clusters(conversion.result, conversion.source.yaml))
    kwargs.setdefault("rename", layer_rename(conversion))
    folder.mkdir(parents=True, exist_ok=True)
    return list(write_rewrite_drawings(conversion.result, folder, formats=formats, **kwargs).values())
