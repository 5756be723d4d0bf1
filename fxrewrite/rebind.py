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

import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import fx, nn

from .graph_copy import copy_graph
from .errors import RebindError
from .gcpause import gc_paused
from .naming import Rename, rename_path
from .result import RewriteResult
from .tensors import attribute_at, bind_tensor, named_tensors


@dataclass
class Rebound:
    module: nn.Module
    param_map: dict[str, str | None]  # new tensor name -> original tensor name


def rename_target(target: str, rename: Rename) -> str:
    """Apply a rename: a callable, or a mapping of dotted prefixes (longest prefix wins)."""
    return rename_path(target, rename)


@gc_paused
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
                           else attribute_at(result.module, old), copy)
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
    ``allow_unused=False`` every source must be used. Everything is checked before
    anything is bound: on a :class:`RebindError` the template is left as it was.
    Returns new name -> origin.
    """
    lookup = origin_of.get if isinstance(origin_of, Mapping) else origin_of
    bound: dict[str, str] = {}
    used_by: dict[str, str] = {}
    plan: list[tuple[str, torch.Tensor]] = []
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
        plan.append((name, source))
        bound[name] = origin
        used_by[origin] = name
    if not allow_unused:
        unused = sorted(set(sources) - set(used_by))
        if unused:
            raise RebindError(f"{len(unused)} source tensor(s) were not bound: {', '.join(unused[:10])}")
    for name, source in plan:
        bind_tensor(template, name, _clone(source) if copy else source)
    return bound


_CONTAINERS = frozenset((list, dict, set, OrderedDict))  # copied one level deep (exact types, as before)
_TENSOR_DICTS = frozenset(("_parameters", "_buffers"))


def clone_module(module: nn.Module, *, tensor_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 class_for: Callable[[type], type] | None = None) -> nn.Module:
    """New module objects for the whole tree of ``module``, holding the *same* parameter and
    buffer objects (or ``tensor_fn`` of each: a copy, a conversion; called once per tensor).

    What a deep copy sharing tensors gives, several times faster: each module's
    attribute dictionary is copied one level deep (its parameter, buffer, child and
    hook dictionaries, and plain lists, dicts and sets, are new containers; tensors
    and other values are shared), so changing the clone's structure or settings
    never touches ``module``. Methods bound to an original module (``m.forward =
    m.forward_fuse``) are re-bound to its clone. ``class_for`` may give a module
    another class of the same layout (a foreign class by its registered twin).

    >>> import torch
    >>> layer = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    >>> twin = clone_module(layer)
    >>> twin is layer, twin[0] is layer[0], twin[0].weight is layer[0].weight
    (False, False, True)
    """
    clones: dict[int, nn.Module] = {}
    tensors: dict[int, torch.Tensor] = {}

    def tensor(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or tensor_fn is None:
            return t
        if id(t) not in tensors:  # a tensor shared by two modules stays shared in the clone
            tensors[id(t)] = tensor_fn(t)
        return tensors[id(t)]

    def visit(m: nn.Module) -> nn.Module:
        if id(m) in clones:  # a module reachable twice stays one module
            return clones[id(m)]
        cls = class_for(type(m)) if class_for is not None else type(m)
        new = cls.__new__(cls)
        clones[id(m)] = new
        state = m.__dict__.copy()
        for key, value in state.items():  # values replaced in place: the keys (and order) stay
            kind = type(value)
            if kind in _CONTAINERS:
                if key == "_modules":
                    value = {name: None if child is None else visit(child) for name, child in value.items()}
                elif key in _TENSOR_DICTS:
                    value = {name: tensor(t) for name, t in value.items()}
                else:
                    value = kind(value)
                state[key] = value
            elif kind is types.MethodType and value.__self__ is m:
                state[key] = types.MethodType(value.__func__, new)
        new.__dict__.update(state)
        return new

    return visit(module)


def _fresh(value, copy: bool):
    if isinstance(value, nn.Module):
        return clone_module(value, tensor_fn=_clone if copy else None)
    if isinstance(value, torch.Tensor):
        return _clone(value) if copy else value
    return value


def _clone(tensor: torch.Tensor) -> torch.Tensor:
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(tensor.detach().clone(), requires_grad=tensor.requires_grad)
    return tensor.detach().clone()


def _check_exact(param_map: Mapping[str, str | None], tensors: Mapping[str, torch.Tensor]) -> None:
    if set(param_map) != set(tensors):
        missing = sorted(set(tensors) - set(param_map))
        extra = sorted(set(param_map) - set(tensors))
        raise RebindError(f"parameter map is not exact: unmapped {missing[:5]}, stale {extra[:5]}")
