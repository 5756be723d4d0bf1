"""Naming and binding of parameters and buffers inside module hierarchies."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


def named_tensors(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``module`` with its qualified name (shared ones under each name)."""
    dot = f"{prefix}." if prefix else ""
    for name, param in module.named_parameters(remove_duplicate=False):
        yield dot + name, param
    for name, buf in module.named_buffers(remove_duplicate=False):
        yield dot + name, buf


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
