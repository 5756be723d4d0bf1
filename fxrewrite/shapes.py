"""Shape propagation: record the output shape and dtype of every node.

A thin layer over :class:`torch.fx.passes.shape_prop.ShapeProp` that runs
without autograd, keeps the example inputs on the GraphModule (so a rewrite can
propagate again and detect a shape mismatch it introduced) and offers simple
accessors.

>>> import torch, fxrewrite
>>> gm = fxrewrite.trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), torch.zeros(1, 3, 16, 16))
>>> [shape_of(n) for n in gm.graph.nodes]
[(1, 3, 16, 16), (1, 8, 14, 14), (1, 8, 14, 14)]
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata, _extract_tensor_metadata

from .errors import FxRewriteError

EXAMPLE_INPUTS_META = "fxrewrite.example_inputs"


class ShapePropagationError(FxRewriteError, RuntimeError):
    """A node failed while running the graph on the example inputs.

    ``node`` is its name; the message gives the error's type and first line, and
    ``__cause__`` is the error itself.
    """

    def __init__(self, node: fx.Node, cause: BaseException):
        self.node = node.name
        first = str(cause).strip().splitlines()
        super().__init__(f"node {node.name} failed: {type(cause).__name__}" + (f": {first[0]}" if first else ""))


class _ShapeProp(ShapeProp):
    """ShapeProp without its failure path, which prints a traceback to stderr and raises an
    error whose message is the failing node's whole metadata; this one raises
    :class:`ShapePropagationError` instead. (No fake mode: fxrewrite runs real inputs.)"""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.extra_traceback = False  # do not append the node and a traceback to the message

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = fx.Interpreter.run_node(self, n)
        except Exception as exc:
            raise ShapePropagationError(n, exc) from exc
        found = []

        def extract(obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                found.append(True)
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def propagate_shapes(gm: fx.GraphModule, *example_inputs: Any) -> Any:
    """Run ``gm`` on ``example_inputs`` and store ``tensor_meta`` on every node; return the output.

    A node that fails raises :class:`ShapePropagationError` naming it.
    """
    with torch.no_grad():
        out = _ShapeProp(gm).propagate(*example_inputs)
    gm.meta[EXAMPLE_INPUTS_META] = example_inputs
    return out


def example_inputs(gm: fx.GraphModule) -> tuple | None:
    """The example inputs shapes were last propagated with, if any."""
    return getattr(gm, "meta", {}).get(EXAMPLE_INPUTS_META)


def shape_tree(node: fx.Node) -> Any:
    """The node's output shapes as nested tuples/lists (``None`` where unknown)."""
    return _simplify(node.meta.get("tensor_meta"))


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The node's output shape when it is a single tensor, else ``None``."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def dtype_of(node: fx.Node) -> torch.dtype | None:
    meta = node.meta.get("tensor_meta")
    return meta.dtype if isinstance(meta, TensorMetadata) else None


def _simplify(meta: Any) -> Any:
    if isinstance(meta, TensorMetadata):
        return tuple(meta.shape)
    if isinstance(meta, (list, tuple)):
        return type(meta)(_simplify(m) for m in meta)
    if isinstance(meta, dict):
        return {k: _simplify(v) for k, v in meta.items()}
    return None
