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

import contextlib
from typing import Any

import torch
from torch.utils._pytree import tree_leaves
from torch import fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata, _extract_tensor_metadata

from .conv_shapes import convolutions_by_shape
from .errors import FxRewriteError
from .tensors import attribute_at, buffers_of

EXAMPLE_INPUTS_META = "fxrewrite.example_inputs"
# The value of every node from the last propagation, kept (when small) so that a rewrite can
# re-check shapes by recomputing only the nodes a rule changed and those downstream of them.
VALUES_META = "fxrewrite.example_values"
VALUES_LIMIT_BYTES = 64 * 2**20
# Whether the last propagation computed convolutions by shape alone (a rewrite propagates the same way).
SHAPES_ONLY_META = "fxrewrite.shapes_only"


class ShapePropagationError(FxRewriteError, RuntimeError):
    """A node failed while running the graph on the example inputs.

    ``node`` is its name; the message gives the error's type and first line, and
    ``__cause__`` is the error itself.
    """

    def __init__(self, node: fx.Node, cause: BaseException):
        self.node = node.name
        first = str(cause).strip().splitlines()
        super().__init__(f"node {node.name} failed: {type(cause).__name__}" + (f": {first[0]}" if first else ""))


_NO_MODULES = torch.nn.Module()


class _ShapeProp(ShapeProp):
    """ShapeProp without its failure path, which prints a traceback to stderr and raises an
    error whose message is the failing node's whole metadata; this one raises
    :class:`ShapePropagationError` instead. (No fake mode: fxrewrite runs real inputs.)"""

    def __init__(self, gm: fx.GraphModule):
        # fx's Interpreter starts by listing every submodule of ``gm`` (a walk of the whole model, here
        # for nothing: modules are fetched by target), once per propagation, and a rewrite propagates
        # after every rule. So it is given an empty module and the graph, and ``gm`` after.
        # (ShapeProp's own __init__ only adds its fake-tensor mode, which run_node below never uses.)
        fx.Interpreter.__init__(self, _NO_MODULES, graph=gm.graph)
        self.module = self.real_module = gm
        self.fake_module = self.fake_mode = None
        self.extra_traceback = False  # do not append the node and a traceback to the message
        self.values: dict[str, Any] | None = {}  # node name -> value, while under VALUES_LIMIT_BYTES
        self._bytes = 0

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple, dict]:
        # Plain lists, as the generated code passes them: a layer may assign into the list it is
        # given (the official DDetect does `x[i] = ...`), which fx's immutable_list refuses.
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return tuple(_mutable(a) for a in args), {k: _mutable(v) for k, v in kwargs.items()}

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = fx.Interpreter.run_node(self, n)
        except Exception as exc:
            raise ShapePropagationError(n, exc) from exc
        self._keep(n, result)
        found = []

        def extract(obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                found.append(True)
                return tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result

    def _keep(self, n: fx.Node, result: Any) -> None:
        if self.values is None:
            return
        tensors = [t for t in tree_leaves(result) if isinstance(t, torch.Tensor)]
        self._bytes += sum(t.numel() * t.element_size() for t in tensors)
        if self._bytes > VALUES_LIMIT_BYTES:
            self.values = None  # too big to keep: later checks propagate the whole graph again
        else:
            self.values[n.name] = result


_MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """``TensorMetadata`` of a tensor, as torch.fx's ``ShapeProp`` records it.

    For a plain dense tensor it is read with the C-implemented ``is_contiguous``: torch's
    ``_extract_tensor_metadata`` asks its symbolic-shape helpers, whose first call imports
    sympy (a second or more, for values it only needs with symbolic shapes). Anything else
    (sparse, quantized, fake or other subclass tensors) goes to torch's own function.
    """
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter or t.layout != torch.strided \
            or t.is_quantized:
        return _extract_tensor_metadata(t)
    memory_format = next((f for f in _MEMORY_FORMATS if t.is_contiguous(memory_format=f)), None)
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), memory_format, False, {})


def _mutable(value: Any) -> Any:
    return [_mutable(v) for v in value] if isinstance(value, list) else value


def propagate_shapes(gm: fx.GraphModule, *example_inputs: Any, known: dict[str, Any] | None = None,
                     shapes_only: bool = False) -> Any:
    """Run ``gm`` on ``example_inputs`` and store ``tensor_meta`` on every node; return the output.

    A node that fails raises :class:`ShapePropagationError` naming it. ``known``
    (node name -> value) gives nodes whose value is not recomputed. The values of
    all nodes are kept in ``gm.meta`` when they are small (see ``VALUES_META``).

    With ``shapes_only``, convolutions are not computed
    (:func:`fxrewrite.conv_shapes.convolutions_by_shape`): their outputs are zeros of the
    right shape, so the values (and the returned output) are not the model's, and neither
    are the shapes of operations whose output shape depends on values (``nonzero``,
    masking); for the layers of a CNN every shape and dtype is the same. Whether it was
    used is recorded in ``gm.meta`` (a rewrite re-checks the same way).

    Running the graph leaves the modules' buffers as they were: a BatchNorm in
    training mode would otherwise update its running statistics, and the modules
    are usually the caller's (a trace or a rewrite shares them).
    """
    env = {n: known[n.name] for n in gm.graph.nodes if known and n.name in known and n.op != "output"}
    saved = [(b, b.clone()) for b in _buffers_reached(gm, env)]
    prop = _ShapeProp(gm)
    threads = torch.get_num_threads()
    try:
        # One intra-op thread: the example inputs are small, so hundreds of tiny kernels would spend
        # more time handing work to other threads than computing (measured on yolov9-e: 0.3 s with
        # one thread, 1.5-4.5 s with two on a busy 2-core machine). Shapes do not depend on it.
        torch.set_num_threads(1)
        with torch.no_grad(), (convolutions_by_shape() if shapes_only else contextlib.nullcontext()):
            out = prop.run(*example_inputs, initial_env=env or None)
    finally:
        torch.set_num_threads(threads)
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
    gm.meta[EXAMPLE_INPUTS_META] = example_inputs
    gm.meta[SHAPES_ONLY_META] = shapes_only
    if prop.values is not None:
        prop.values.update({name: value for name, value in (known or {}).items() if name not in prop.values})
    gm.meta[VALUES_META] = prop.values
    return out


def _buffers_reached(gm: fx.GraphModule, env: dict[fx.Node, Any]) -> list[torch.Tensor]:
    """Every buffer the nodes that will run (those not in ``env``) can change: the buffers of the
    modules they call, and every buffer the graph reads as an attribute (known or not: a known
    attribute's value *is* the buffer, which a node that runs may change in place). When most
    nodes are known (a rewrite re-checking what it changed), that is a few modules'. (A known
    value that is a view of a buffer made inside a module is not followed.)"""
    if not env:
        return buffers_of(gm)
    found: dict[int, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op == "call_module" and node not in env):
            target = attribute_at(gm, node.target, None)  # a missing one: running it says so
            if isinstance(target, torch.nn.Module):
                found.update((id(b), b) for b in buffers_of(target))
            elif isinstance(target, torch.Tensor) and not isinstance(target, torch.nn.Parameter):
                found[id(target)] = target
    return list(found.values())


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
