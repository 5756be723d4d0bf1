"""Naming and binding of parameters and buffers inside module hierarchies."""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn


def named_tensors(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``module`` with its qualified name (shared ones under each name).

    The same names, tensors and order as ``named_parameters(remove_duplicate=False)`` followed by
    ``named_buffers(remove_duplicate=False)``, read from the modules' own registries in one walk:
    torch's generators walk the hierarchy once each through several generator layers, and this
    is called for every layer of a model several times per rewrite.

    >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    >>> [name for name, _ in named_tensors(m, "net")][:3], len(list(named_tensors(m)))
    (['net.0.weight', 'net.0.bias', 'net.1.weight'], 7)
    """
    modules = _named_modules(module, prefix)
    for owner, m in modules:
        for name, param in m._parameters.items():
            if param is not None:
                yield f"{owner}.{name}" if owner else name, param
    for owner, m in modules:
        for name, buf in m._buffers.items():
            if buf is not None:
                yield f"{owner}.{name}" if owner else name, buf


def _named_modules(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """``module.named_modules(prefix=prefix, remove_duplicate=False)`` as a list, without recursion
    through generators (depth-first, each module before its children, in registration order)."""
    found: list[tuple[str, nn.Module]] = []
    stack = [(prefix, module)]
    while stack:
        name, m = stack.pop()
        found.append((name, m))
        children = [(f"{name}.{key}" if name else key, child) for key, child in m._modules.items() if child is not None]
        stack.extend(reversed(children))
    return found


def walk_modules(module: nn.Module) -> list[nn.Module]:
    """``list(module.modules())``: every module of the tree of ``module`` once (a shared one where
    it is first reached), each before its children, in registration order; without going through
    torch's generator layers (a detector has a thousand modules; a conversion walks them a few times).

    >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.Sequential(torch.nn.ReLU()))
    >>> [type(x).__name__ for x in walk_modules(m)] == [type(x).__name__ for x in m.modules()]
    True
    """
    found: list[nn.Module] = []
    seen: set[int] = set()
    stack = [module]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        found.append(m)
        stack.extend(reversed([child for child in m._modules.values() if child is not None]))
    return found


def parameter_count(module: nn.Module) -> int:
    """``sum(p.numel() for p in module.parameters())`` (a parameter shared by several modules counts
    once), in one :func:`walk_modules`.

    >>> parameter_count(torch.nn.Conv2d(3, 8, 3))
    224
    """
    unique = {id(p): p for m in walk_modules(module) for p in m._parameters.values() if p is not None}
    return sum(p.numel() for p in unique.values())


def buffers_of(module: nn.Module) -> list[torch.Tensor]:
    """``list(module.buffers())`` (a buffer shared by several modules once), in one :func:`walk_modules`."""
    return list({id(b): b for m in walk_modules(module) for b in m._buffers.values() if b is not None}.values())


_MISSING = object()


def attribute_at(root: nn.Module, target: str, default: Any = _MISSING) -> Any:
    """The object at dotted path ``target`` under ``root`` (a submodule, parameter, buffer or plain
    attribute: what an fx node's ``target`` names); ``default`` where the path does not exist,
    else ``AttributeError``.

    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> attribute_at(m, "0.bias") is m[0].bias, attribute_at(m, "1.weight", None)
    (True, None)
    """
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            if default is _MISSING:
                raise AttributeError(f"{type(root).__name__} has no attribute {target!r}")
            return default
    return obj


def bind_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Make ``module``'s parameter or buffer ``name`` *be* ``tensor`` (shared, not copied).

    A parameter slot keeps a :class:`~torch.nn.Parameter`: a Parameter is bound as
    the same object; a plain tensor is wrapped without copying its storage.
    """
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=tensor.requires_grad)
        owner._parameters[leaf] = tensor
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor.detach() if isinstance(tensor, nn.Parameter) else tensor
    else:
        raise KeyError(f"{name} is neither a parameter nor a buffer of {type(module).__name__}")
