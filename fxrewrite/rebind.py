"""Re-binding: materialise a rewrite as a fresh module hierarchy whose tensors are the originals.

Two entry points:

* :func:`rebind` renames the modules of a :class:`~fxrewrite.engine.RewriteResult`
  (for example to renumber layers) and returns a fresh GraphModule: new module
  objects, the *same* tensor objects (or copies with ``copy=True``), and the exact
  map new name -> original name;
* :func:`bind_tensors` fills any freshly built template module (typically built on
  the ``meta`` device, so it costs nothing) with source tensors chosen by a
  provenance function, checking shapes and that no origin is used twice.

>>> import torch, fxrewrite
>>> from fxrewrite import Rule, Pattern
>>> model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 2))
>>> result = fxrewrite.rewrite(fxrewrite.trace(model), [Rule("x", "collapse", Pattern(module_class="Identity"))])
>>> rebound = fxrewrite.rebind(result, {"1": "0"})
>>> rebound.param_map
{'0.weight': '1.weight', '0.bias': '1.bias'}
>>> rebound.module.get_parameter("0.weight") is model[1].weight
True
"""
from __future__ import annotations

import copy as copylib
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import fx, nn

from .engine import RewriteResult, copy_graph
from .errors import RebindError
from .tensors import bind_tensor, named_tensors

Rename = Mapping[str, str] | Callable[[str], str]


@dataclass
class Rebound:
    module: nn.Module
    param_map: dict[str, str | None]  # new tensor name -> original tensor name


def rename_target(target: str, rename: Rename) -> str:
    """Apply a rename: a callable, or a mapping of dotted prefixes (longest prefix wins)."""
    if callable(rename):
        return rename(target)
    best = max((p for p in rename if target == p or target.startswith(p + ".")), key=len, default=None)
    return target if best is None else rename[best] + target[len(best):]


def rebind(result: RewriteResult, rename: Rename | None = None, *, copy: bool = False) -> Rebound:
    """A fresh GraphModule equal in function to ``result.module`` with modules renamed by ``rename``.

    Module objects are new (so changing them never touches the original model);
    tensors are the original objects unless ``copy`` is true.
    """
    rename = rename or {}
    graph, _ = copy_graph(result.module.graph)
    modules: dict[str, object] = {}
    param_map: dict[str, str | None] = {}
    targets: dict[str, str] = {}
    for node in graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        old = node.target
        if old not in targets:
            new = rename_target(old, rename)
            if new in modules:
                raise RebindError(f"renaming {old} to {new} collides with another module renamed to {new}")
            targets[old] = new
            value = _fresh(result.module.get_submodule(old) if node.op == "call_module"
                           else _get(result.module, old), copy)
            modules[new] = value
            if isinstance(value, nn.Module):
                for name, _ in named_tensors(value):
                    param_map[f"{new}.{name}"] = result.param_map[f"{old}.{name}"]
            elif isinstance(value, torch.Tensor):
                param_map[new] = result.param_map[old]
        node.target = targets[old]
    gm = fx.GraphModule(modules, graph, class_name=type(result.module).__name__)
    gm.meta.update(result.module.meta)
    _check_exact(param_map, dict(named_tensors(gm)))
    return Rebound(gm, param_map)


def bind_tensors(template: nn.Module, sources: Mapping[str, torch.Tensor],
                 origin_of: Callable[[str], str | None] | Mapping[str, str], *, copy: bool = False,
                 allow_unused: bool = True) -> dict[str, str]:
    """Bind every parameter and buffer of ``template`` to ``sources[origin_of(name)]``.

    Shapes must match exactly; each source is used at most once; with
    ``allow_unused=False`` every source must be used. Returns new name -> origin.
    """
    lookup = origin_of.get if isinstance(origin_of, Mapping) else origin_of
    bound: dict[str, str] = {}
    used_by: dict[str, str] = {}
    for name, tensor in list(named_tensors(template)):
        origin = lookup(name)
        if origin is None:
            raise RebindError(f"{name}: no origin recorded for this tensor")
        if origin not in sources:
            raise RebindError(f"{name}: its origin {origin} is not among the source tensors")
        if origin in used_by:
            raise RebindError(f"{name}: its origin {origin} is already bound to {used_by[origin]}")
        source = sources[origin]
        if tuple(source.shape) != tuple(tensor.shape):
            raise RebindError(f"{name}: shape {tuple(tensor.shape)} does not match its origin {origin} "
                              f"{tuple(source.shape)}")
        bind_tensor(template, name, _clone(source) if copy else source)
        bound[name] = origin
        used_by[origin] = name
    if not allow_unused:
        unused = sorted(set(sources) - set(used_by))
        if unused:
            raise RebindError(f"{len(unused)} source tensor(s) were not bound: {', '.join(unused[:10])}")
    return bound


def _fresh(value, copy: bool):
    if isinstance(value, nn.Module):
        memo = {} if copy else {id(t): t for _, t in named_tensors(value)}
        return copylib.deepcopy(value, memo)
    if isinstance(value, torch.Tensor):
        return _clone(value) if copy else value
    return value


def _clone(tensor: torch.Tensor) -> torch.Tensor:
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(tensor.detach().clone(), requires_grad=tensor.requires_grad)
    return tensor.detach().clone()


def _get(module: nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _check_exact(param_map: Mapping[str, str | None], tensors: Mapping[str, torch.Tensor]) -> None:
    if set(param_map) != set(tensors):
        missing = sorted(set(tensors) - set(param_map))
        extra = sorted(set(param_map) - set(tensors))
        raise RebindError(f"parameter map is not exact: unmapped {missing[:5]}, stale {extra[:5]}")
