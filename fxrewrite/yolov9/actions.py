"""Actions of the YOLOv9 plug-in that rule files can name (``plugins: [yolov9]``).

* ``measure_strides``: set a detection head's per-level ``stride`` from the
  propagated shapes (image size / feature-map size of each input), the way the
  model builder measures them. A head that a rule rebuilt on fewer levels (see
  ``rules/examples/drop-p5.yaml``) starts with zero strides; ``copy_attrs``
  cannot help, since the old head's strides are one per *old* level.

>>> import torch, fxrewrite
>>> from fxrewrite.yolov9 import DetectionModel
>>> from fxrewrite.yolov9.convert import trace_and_rewrite
>>> torch.manual_seed(0) and None
>>> rules = fxrewrite.load_rules('''
... plugins: [yolov9]
... rules:
...   - name: head-on-p3-p4
...     pattern: {module_class: DDetect, capture: head}
...     action: replace
...     args: {with: DDetect, inputs: [0, 1], init: {nc: $head.nc, ch: $kept_inputs.channels}}
...   - name: strides
...     pattern: {module_class: DDetect}
...     action: measure_strides
... ''')
>>> result = trace_and_rewrite(DetectionModel("gelan-t").eval(), rules)
>>> result.module.get_submodule("model.22").stride
tensor([ 8., 16.])
"""
from __future__ import annotations

import torch

from torch import fx

from ..context import RewriteContext
from ..modules import copy_module, sources_with
from ..pattern import Match, input_nodes
from ..registry import Param, register_action
from ..shapes import shape_of

# The anchor cache of a head: rebuilt from ``stride`` on the next call once these are gone.
_ANCHOR_CACHE = ("shape", "anchors", "strides")


def measured_strides(ctx: RewriteContext, head: fx.Node) -> list[float]:
    """Image height / feature-map height for each input of the ``head`` node, from propagated shapes."""
    images = [n for n in ctx.graph.nodes if n.op == "placeholder" and _is_4d(shape_of(n))]
    if not images:
        ctx.refuse("measure_strides needs propagated shapes: trace with an example image")
    height = shape_of(images[0])[2]
    strides = []
    for level in input_nodes(head):
        shape = shape_of(level)
        if not _is_4d(shape) or height % shape[2]:
            ctx.refuse(f"cannot measure the stride of {head.name}'s input {level.name}: "
                       f"image height {height}, feature map {shape}")
        strides.append(float(height // shape[2]))
    return strides


@register_action("measure_strides", params={
    "node": Param((str,), default="$root", doc="capture of the head (default: the pattern's root)"),
}, doc="Set a detection head's per-level stride to image size / feature-map size, from propagated shapes.")
def measure_strides(ctx: RewriteContext, match: Match, *, node: fx.Node) -> None:
    head = ctx.module(node)
    strides = measured_strides(ctx, node)
    old = getattr(head, "stride", None)
    if len(strides) != getattr(head, "nl", len(strides)):
        ctx.refuse(f"{node.name} has {head.nl} levels but {len(strides)} inputs")
    reference = old if isinstance(old, torch.Tensor) and not old.is_meta else torch.zeros(0)
    stride = torch.tensor(strides, dtype=reference.dtype if reference.is_floating_point() else torch.float32,
                          device=reference.device)
    if isinstance(old, torch.Tensor) and not old.is_meta and torch.equal(old, stride):
        return  # already right: no change, so a fixed-point rule settles
    new = copy_module(head)  # never change a module in place: the input model shares it
    for attr in _ANCHOR_CACHE:
        new.__dict__.pop(attr, None)  # back to the class defaults: rebuilt with the new strides
    new.stride = stride
    ctx.set_module(node, new, sources_with(new, {}))


def _is_4d(shape) -> bool:
    return isinstance(shape, tuple) and len(shape) == 4 and all(isinstance(d, int) for d in shape)


__all__ = ["measure_strides", "measured_strides"]
