"""Registries: the names rule files can use (actions, checks, module classes) and plug-ins.

Rule files are data: they never import code. Whatever a rule names (the class a
``replace`` builds, a Python action, a check) must have been registered from
Python first, by fxrewrite itself, by a plug-in, or by the user.

A :class:`Registry` maps names to :class:`ActionSpec`, :class:`CheckSpec` and
module classes; a lookup it cannot answer goes to its parent. Three levels exist:

* :data:`BUILTINS`: fxrewrite's own actions and checks (``fxrewrite.actions``,
  ``fxrewrite.checks`` register into it when ``fxrewrite`` is imported);
* :data:`DEFAULT` (parent: the built-ins): plug-ins and users;
* :func:`scoped`: a child registry for a ``with`` block (tests, experiments); what is
  registered inside is gone after it.

A name registered twice is an error (:class:`RegistrationError`) unless
``replace=True``; registering the same object again under the same name is a no-op.
A :class:`~fxrewrite.rules.RuleSet` is checked against one registry (the current one
when it is built, or the one it is given) and keeps the actions and checks it was
checked with, so it runs what was checked.

>>> import torch
>>> from fxrewrite import registry
>>> class Swish(torch.nn.Module):
...     def forward(self, x):
...         return x * torch.sigmoid(x)
>>> with registry.scoped():
...     _ = registry.register_module_class(Swish)
...     registry.module_class("Swish") is Swish, registry.module_class("nn.ReLU") is torch.nn.ReLU
(True, True)
>>> registry.module_class("Swish") is None      # the scope is gone
True

Plug-ins are packages exposed under the ``fxrewrite.plugins`` entry-point
group (YOLOv9 support is the ``yolov9`` plug-in); a rule file lists the
plug-ins it needs under ``plugins:`` and they are imported (into :data:`DEFAULT`)
before it is checked.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterator, Mapping

from torch import nn

from .errors import FxRewriteError

PLUGIN_GROUP = "fxrewrite.plugins"


class RegistrationError(FxRewriteError, ValueError):
    """A name is registered twice (pass ``replace=True`` to replace it)."""


# -- what is registered --------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One parameter of an action: its accepted types (in the rule file) and whether it is required.

    * ``default``: passed to the action when the rule does not give the parameter
      (``None``: nothing is passed, the function's own default applies); a ``$reference``
      default (``"$root"``) is resolved like a given value;
    * ``alias_of``: this parameter is an older spelling of another one (``params`` of
      ``replace`` is ``rename``); the action receives it under the other name;
    * ``parse``: ``parse(value, registry)`` turns the rule file's value into what the action
      receives, once, when the rule set is checked (``replace``'s ``with``: a class name ->
      the class), raising ``ValueError`` with the problem to refuse the value.
    """

    types: tuple[type, ...]
    required: bool = False
    default: Any = None
    doc: str = ""
    alias_of: str | None = None
    parse: Callable[[Any, "Registry"], Any] | None = None


# Computes a value an action provides to its own arguments (``$kept_inputs`` of ``replace``):
# ``provider(ctx, match, args)`` with ``args`` the action's arguments that do not refer to it.
Provider = Callable[..., Any]


@dataclass(frozen=True)
class ActionSpec:
    """A registered action.

    ``fn(ctx, match, **args)`` rewrites the graph through ``ctx`` (a
    :class:`fxrewrite.context.RewriteContext`); ``$references`` in the rule's arguments
    are resolved before the call (a capture becomes its node, ``$x.attr`` the value).
    Per-match actions are called once per match of the rule's pattern; whole-graph
    actions (``per_match=False``) once per pass with ``match`` set to the list of
    matches (empty when the rule has no pattern). ``params`` is ``None`` for actions
    that accept any arguments (user actions that did not declare them). ``provides``
    names values the action computes for its own arguments (``$kept_inputs``).
    """

    name: str
    fn: Callable[..., Any]
    params: dict[str, Param] | None = None
    per_match: bool = True
    doc: str = ""
    # True for actions that only delete nodes: every remaining node computes what it did
    # before, so shapes need not be propagated again to validate the result.
    only_deletes: bool = False
    provides: Mapping[str, Provider] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckSpec:
    """A registered check: ``fn(ctx, match, *args, **kwargs) -> str | None`` (a reason to reject, or None)."""

    name: str
    fn: Callable[..., str | None]
    doc: str = ""


# -- registries ------------------------------------------------------------------------------
class Registry:
    """Actions, checks and module classes by name; lookups that miss go to ``parent``."""

    def __init__(self, name: str, parent: "Registry | None" = None):
        self.name = name
        self.parent = parent
        self._actions: dict[str, ActionSpec] = {}
        self._checks: dict[str, CheckSpec] = {}
        self._classes: dict[str, type[nn.Module]] = {}

    def __repr__(self) -> str:
        chain, r = [], self
        while r is not None:
            chain.append(r.name)
            r = r.parent
        return f"<Registry {' -> '.join(chain)}>"

    # -- adding ---------------------------------------------------------------------------
    def add_action(self, spec: ActionSpec, *, replace: bool = False) -> ActionSpec:
        self._add(self._actions, self.action(spec.name), spec, replace, f"action {spec.name!r}", spec.fn)
        return spec

    def add_check(self, spec: CheckSpec, *, replace: bool = False) -> CheckSpec:
        self._add(self._checks, self.check(spec.name), spec, replace, f"check {spec.name!r}", spec.fn)
        return spec

    def add_module_class(self, cls: type[nn.Module], name: str | None = None, *,
                         replace: bool = False) -> type[nn.Module]:
        name = name or cls.__name__
        self._add(self._classes, self._class(name), cls, replace, f"module class {name!r}", cls, name)
        return cls

    def _add(self, table: dict, existing: Any, value: Any, replace: bool, what: str, obj: Any,
             name: str | None = None) -> None:
        if existing is not None and not replace:
            if _equal(existing, value):
                return  # the same thing again: nothing to do
            old = existing.fn if hasattr(existing, "fn") else existing
            raise RegistrationError(f"{what} is already registered (as {_describe(old)}, not {_describe(obj)}); "
                                    f"pass replace=True to replace it")
        table[name if name is not None else value.name] = value

    # -- looking up -----------------------------------------------------------------------
    def action(self, name: str) -> ActionSpec | None:
        found = self._actions.get(name)
        return found if found is not None or self.parent is None else self.parent.action(name)

    def check(self, name: str) -> CheckSpec | None:
        found = self._checks.get(name)
        return found if found is not None or self.parent is None else self.parent.check(name)

    def _class(self, name: str) -> type[nn.Module] | None:
        found = self._classes.get(name)
        return found if found is not None or self.parent is None else self.parent._class(name)

    def module_class(self, name: str) -> type[nn.Module] | None:
        """The class registered as ``name``; ``nn.X`` / ``torch.nn.X`` name torch's own modules."""
        found = self._class(name)
        if found is not None:
            return found
        for prefix in ("torch.nn.", "nn."):
            if name.startswith(prefix):
                cls = getattr(nn, name[len(prefix):], None)
                if isinstance(cls, type) and issubclass(cls, nn.Module):
                    return cls
        return None

    def action_names(self) -> list[str]:
        return sorted(self._all("_actions"))

    def check_names(self) -> list[str]:
        return sorted(self._all("_checks"))

    def module_class_names(self) -> list[str]:
        return sorted(self._all("_classes"))

    def _all(self, table: str) -> set[str]:
        names: set[str] = set()
        r: Registry | None = self
        while r is not None:
            names.update(getattr(r, table))
            r = r.parent
        return names


def _equal(a: Any, b: Any) -> bool:
    try:
        return a == b
    except Exception:
        return False


def _describe(obj: Any) -> str:
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}.{name}" if module and name else repr(obj)


#: fxrewrite's own actions and checks.
BUILTINS = Registry("built-in")
#: Plug-ins and users register here (unless inside :func:`scoped`).
DEFAULT = Registry("default", parent=BUILTINS)
_CURRENT: contextvars.ContextVar[Registry] = contextvars.ContextVar("fxrewrite_registry", default=DEFAULT)


def current() -> Registry:
    """The registry registrations go to and rule sets are checked against: :data:`DEFAULT`, or the
    innermost :func:`scoped` registry."""
    return _CURRENT.get()


@contextlib.contextmanager
def using(registry: Registry) -> Iterator[Registry]:
    """Make ``registry`` the current one for a ``with`` block."""
    token = _CURRENT.set(registry)
    try:
        yield registry
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def scoped(name: str = "scope") -> Iterator[Registry]:
    """A child of the current registry, current for a ``with`` block: what is registered inside is
    visible inside (and to rule sets built inside) and gone after it.

    Registrations made while a module is *imported* inside the block go to the scope too;
    plug-ins named by rule files are always loaded into :data:`DEFAULT`.
    """
    with using(Registry(name, parent=current())) as registry:
        yield registry


# -- registering (decorators) ------------------------------------------------------------------
def register_action(name: str, *, params: dict[str, Param] | None = None, per_match: bool = True, doc: str = "",
                    only_deletes: bool = False, provides: Mapping[str, Provider] | None = None,
                    replace: bool = False, registry: Registry | None = None):
    """Decorator registering a Python action under ``name`` so rule files can use it.

    The function is ``fn(ctx, match, **args)`` (see :class:`ActionSpec`); it is returned
    unchanged. ``registry``: where (default: the current one, see :func:`current`).

    >>> from fxrewrite import register_action, registry
    >>> with registry.scoped():
    ...     @register_action("tag_node")
    ...     def tag_node(ctx, match, tag="seen"):
    ...         ctx.note(f"{match.root.name}: {tag}")
    ...     registry.action("tag_node").fn is tag_node
    True
    """

    def decorate(fn):
        spec = ActionSpec(name, fn, params, per_match, doc or (fn.__doc__ or "").strip(), only_deletes,
                          dict(provides or {}))
        (registry or current()).add_action(spec, replace=replace)
        return fn

    return decorate


def register_check(name: str, doc: str = "", *, replace: bool = False, registry: Registry | None = None):
    """Decorator registering a check under ``name``; the function returns a rejection reason or None."""

    def decorate(fn):
        (registry or current()).add_check(CheckSpec(name, fn, doc or (fn.__doc__ or "").strip()), replace=replace)
        return fn

    return decorate


def register_module_class(cls: type[nn.Module], name: str | None = None, *, replace: bool = False,
                          registry: Registry | None = None) -> type[nn.Module]:
    """Make ``cls`` available to rules under ``name`` (default: its class name). Usable as a decorator."""
    return (registry or current()).add_module_class(cls, name, replace=replace)


# -- lookups in the current registry ---------------------------------------------------------
def action(name: str) -> ActionSpec | None:
    return current().action(name)


def check(name: str) -> CheckSpec | None:
    return current().check(name)


def module_class(name: str) -> type[nn.Module] | None:
    """The class registered as ``name``; ``nn.X`` / ``torch.nn.X`` name torch's own modules."""
    return current().module_class(name)


def action_names() -> list[str]:
    return current().action_names()


def check_names() -> list[str]:
    return current().check_names()


def module_class_names() -> list[str]:
    return current().module_class_names()


# -- plug-ins --------------------------------------------------------------------------------
_LOADED_PLUGINS: dict[str, Any] = {}


def plugin_names() -> list[str]:
    return sorted(ep.name for ep in metadata.entry_points(group=PLUGIN_GROUP))


def load_plugin(name: str) -> Any:
    """Import the plug-in registered as ``name`` (its module registers classes, actions, CLI commands
    into :data:`DEFAULT`, also when called inside :func:`scoped`)."""
    if name in _LOADED_PLUGINS:
        return _LOADED_PLUGINS[name]
    matches = [ep for ep in metadata.entry_points(group=PLUGIN_GROUP) if ep.name == name]
    if not matches:
        raise LookupError(f"unknown plug-in {name!r}; installed plug-ins: {', '.join(plugin_names()) or 'none'}")
    with using(DEFAULT):
        module = matches[0].load()
    _LOADED_PLUGINS[name] = module
    return module


def load_all_plugins() -> dict[str, Any]:
    for name in plugin_names():
        load_plugin(name)
    return dict(_LOADED_PLUGINS)


__all__ = ["Param", "ActionSpec", "CheckSpec", "Registry", "RegistrationError", "BUILTINS", "DEFAULT", "current",
           "using", "scoped", "register_action", "register_check", "register_module_class", "action", "check",
           "module_class", "action_names", "check_names", "module_class_names", "plugin_names", "load_plugin",
           "load_all_plugins", "PLUGIN_GROUP"]
