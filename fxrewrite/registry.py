"""Registries that rule files refer to by name: module classes, actions, checks, plugins.

Rule files are data: they never import code. Whatever a rule names (the class a
``replace`` builds, a Python action, a check) must have been registered from
Python first, by fxrewrite itself, by a plug-in, or by the user:

>>> import torch
>>> from fxrewrite import registry
>>> class Swish(torch.nn.Module):
...     def forward(self, x):
...         return x * torch.sigmoid(x)
>>> registry.register_module_class(Swish)
<class 'fxrewrite.registry.Swish'>
>>> registry.module_class("Swish") is Swish, registry.module_class("nn.ReLU") is torch.nn.ReLU
(True, True)

Plug-ins are packages exposed under the ``fxrewrite.plugins`` entry-point
group (YOLOv9 support is the ``yolov9`` plug-in); a rule file lists the
plug-ins it needs under ``plugins:`` and they are imported before it is checked.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

from torch import nn

_MODULE_CLASSES: dict[str, type[nn.Module]] = {}
_ACTIONS: dict[str, "ActionSpec"] = {}
_CHECKS: dict[str, "CheckSpec"] = {}
PLUGIN_GROUP = "fxrewrite.plugins"


# -- module classes ----------------------------------------------------------
def register_module_class(cls: type[nn.Module], name: str | None = None) -> type[nn.Module]:
    """Make ``cls`` available to rules under ``name`` (default: its class name). Usable as a decorator."""
    _MODULE_CLASSES[name or cls.__name__] = cls
    return cls


def module_class(name: str) -> type[nn.Module] | None:
    """The class registered as ``name``; ``nn.X`` / ``torch.nn.X`` name torch's own modules."""
    if name in _MODULE_CLASSES:
        return _MODULE_CLASSES[name]
    for prefix in ("torch.nn.", "nn."):
        if name.startswith(prefix):
            cls = getattr(nn, name[len(prefix):], None)
            if isinstance(cls, type) and issubclass(cls, nn.Module):
                return cls
    return None


def module_class_names() -> list[str]:
    return sorted(_MODULE_CLASSES)


# -- actions and checks --------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One parameter of an action or check: its accepted types and whether it is required."""

    types: tuple[type, ...]
    required: bool = False
    default: Any = None
    doc: str = ""


@dataclass(frozen=True)
class ActionSpec:
    """A registered action.

    ``fn(ctx, match, **params)`` rewrites the graph in ``ctx`` (a
    :class:`fxrewrite.engine.RewriteContext`). Per-match actions are called once
    per match of the rule's pattern; whole-graph actions (``per_match=False``)
    once per application with ``match`` set to the list of matches (empty when
    the rule has no pattern). ``params`` is ``None`` for actions that accept any
    parameters (user actions that did not declare them).
    """

    name: str
    fn: Callable[..., Any]
    params: dict[str, Param] | None = None
    per_match: bool = True
    doc: str = ""
    # True for actions that only delete nodes: every remaining node computes what it did
    # before, so shapes need not be propagated again to validate the result.
    only_deletes: bool = False


@dataclass(frozen=True)
class CheckSpec:
    """A registered check: ``fn(ctx, match, *args, **kwargs) -> str | None`` (a reason to reject, or None)."""

    name: str
    fn: Callable[..., str | None]
    doc: str = ""


def register_action(name: str, *, params: dict[str, Param] | None = None, per_match: bool = True, doc: str = "",
                    only_deletes: bool = False):
    """Decorator registering a Python action under ``name`` so rule files can use it.

    >>> from fxrewrite import register_action
    >>> @register_action("tag_node")
    ... def tag_node(ctx, match, tag="seen"):
    ...     match.root.meta["tag"] = tag
    """

    def decorate(fn):
        _ACTIONS[name] = ActionSpec(name, fn, params, per_match, doc or (fn.__doc__ or "").strip(), only_deletes)
        return fn

    return decorate


def register_check(name: str, doc: str = ""):
    """Decorator registering a check under ``name``; the function returns a rejection reason or None."""

    def decorate(fn):
        _CHECKS[name] = CheckSpec(name, fn, doc or (fn.__doc__ or "").strip())
        return fn

    return decorate


def action(name: str) -> ActionSpec | None:
    _ensure_builtins()
    return _ACTIONS.get(name)


def check(name: str) -> CheckSpec | None:
    _ensure_builtins()
    return _CHECKS.get(name)


def action_names() -> list[str]:
    _ensure_builtins()
    return sorted(_ACTIONS)


def check_names() -> list[str]:
    _ensure_builtins()
    return sorted(_CHECKS)


def _ensure_builtins() -> None:
    # The built-in actions and checks register themselves on import.
    importlib.import_module("fxrewrite.actions")
    importlib.import_module("fxrewrite.checks")


# -- plug-ins --------------------------------------------------------------------
@dataclass
class _Plugins:
    loaded: dict[str, Any] = field(default_factory=dict)


_PLUGINS = _Plugins()


def plugin_names() -> list[str]:
    return sorted(ep.name for ep in metadata.entry_points(group=PLUGIN_GROUP))


def load_plugin(name: str) -> Any:
    """Import the plug-in registered as ``name`` (its module registers classes, actions, CLI commands)."""
    if name in _PLUGINS.loaded:
        return _PLUGINS.loaded[name]
    matches = [ep for ep in metadata.entry_points(group=PLUGIN_GROUP) if ep.name == name]
    if not matches:
        raise LookupError(f"unknown plug-in {name!r}; installed plug-ins: {', '.join(plugin_names()) or 'none'}")
    module = matches[0].load()
    _PLUGINS.loaded[name] = module
    return module


def load_all_plugins() -> dict[str, Any]:
    for name in plugin_names():
        load_plugin(name)
    return dict(_PLUGINS.loaded)
