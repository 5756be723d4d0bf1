"""``replace``: swap the matched module for another class, on a subset of its inputs.

Arguments:

* ``with``: the new module's class, by registered name (``DDetect``, ``nn.ReLU``);
* ``inputs``: which inputs the new module keeps, in argument order: a list of
  indices, a slice string (``"3:"``, ``":-1"``), or ``{split: N, keep: K}`` (split
  the inputs into N equal parts and keep part K: an index from 0, negative from the
  end, or ``first`` / ``last``); ``{groups: N, keep: K}`` is the old spelling;
* ``init``: constructor keyword arguments; values may refer to the matched
  module's attributes (``$head.nc``) or to the kept inputs, which this action
  provides as ``$kept_inputs`` (``.channels``: their dimension 1, from shape
  propagation; ``.shapes``; ``.count``);
* ``rename``: tensor-name prefixes, old -> new (``{cv4: cv2}``: rename ``cv4`` to
  ``cv2``): the new module's tensor ``cv2.0.weight`` *is* the old ``cv4.0.weight``
  (shared, shape checked); a name no prefix maps keeps its own name; the longest
  matching new prefix wins, so ModuleList levels can be renumbered
  (``{cv2.1: cv2.0, cv2.2: cv2.1}``). ``params`` is its old spelling. A submodule
  whose tensors all come from one old submodule of the same class also takes its
  plain settings (a BatchNorm's ``eps`` and ``momentum``...);
* ``copy_attrs``: attributes copied from the old module (``[stride]``);
* ``strict`` (default true): every tensor of the new module must have a source.

Old tensors the new module does not take are listed in the rule log as dropped.

>>> import torch, fxrewrite
>>> from fxrewrite import Rule, Pattern
>>> gm = fxrewrite.trace(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU()), torch.zeros(1, 3))
>>> rule = Rule("relu-to-gelu", "replace", Pattern(module_class="ReLU"), args={"with": "nn.GELU"})
>>> result = fxrewrite.rewrite(gm, [rule])
>>> type(result.module.get_submodule("1")).__name__, result.node_status["_1"]
('GELU', 'replaced')
"""
from __future__ import annotations

import re
from functools import cached_property
from typing import Any

import torch
from torch import fx, nn

from ..context import Construction, RewriteContext
from ..errors import RewriteError
from ..pattern import Match, input_nodes
from ..registry import BUILTINS, Param, Registry, register_action
from ..shapes import shape_of, shape_tree
from ..tensors import bind_tensor, named_tensors


# The most tensor elements a module built by ``replace`` may hold (2**31: 8 GB in fp32); more is
# refused before anything is allocated.
MAX_NEW_ELEMENTS = 2**31


def _module_class(name: str, registry: Registry) -> type[nn.Module]:
    cls = registry.module_class(name)
    if cls is None:
        raise ValueError(f"unknown module class {name!r} in replace; register it with "
                         f"fxrewrite.register_module_class (registered: "
                         f"{', '.join(registry.module_class_names()) or 'none'})")
    return cls


class KeptInputs:
    """What ``$kept_inputs`` refers to: the inputs the new module keeps (computed only when used)."""

    def __init__(self, ctx: RewriteContext, nodes: list[fx.Node]):
        self._ctx, self.nodes = ctx, nodes

    @property
    def count(self) -> int:
        return len(self.nodes)

    @cached_property
    def shapes(self) -> list:
        return [shape_tree(n) for n in self.nodes]

    @cached_property
    def channels(self) -> list[int]:
        found = []
        for node in self.nodes:
            shape = shape_of(node)
            if shape is None or len(shape) < 2:
                self._ctx.refuse(f"$kept_inputs.channels needs propagated shapes: input {node.name} has "
                                 f"{'none' if shape is None else shape}; trace with example inputs")
            found.append(shape[1])
        return found


def kept_inputs(ctx: RewriteContext, match: Match, args: dict) -> KeptInputs:
    """The provider of ``$kept_inputs``: the inputs of ``node`` that ``inputs`` selects."""
    return KeptInputs(ctx, select_inputs(input_nodes(args["node"]), args.get("inputs"), ctx))


@register_action("replace", registry=BUILTINS, provides={"kept_inputs": kept_inputs}, params={
    "with": Param((str,), required=True, parse=_module_class, doc="registered class name of the new module"),
    "node": Param((str,), default="$root", doc="capture of the node to replace (default: the pattern's root)"),
    "inputs": Param((list, str, dict), doc="inputs to keep: indices, a slice string, or {split, keep}"),
    "init": Param((dict,), doc="constructor keyword arguments ($capture.attr, $kept_inputs.channels ...)"),
    "rename": Param((dict,), doc="tensor-name prefixes, old -> new"),
    "params": Param((dict,), alias_of="rename", doc="the old spelling of rename"),
    "copy_attrs": Param((list,), doc="attributes copied from the old module"),
    "strict": Param((bool,), default=True, doc="every tensor of the new module must have a source"),
}, doc="Swap the matched module for another class, keeping chosen inputs and re-binding tensors by name.")
def replace(ctx: RewriteContext, match: Match, *, node: fx.Node, inputs: Any = None, init: dict | None = None,
            rename: dict | None = None, copy_attrs: list | None = None, strict: bool = True,
            **kwargs: Any) -> None:
    rule = ctx.rule_name
    cls = kwargs["with"]
    old = ctx.module(node)
    kept = select_inputs(input_nodes(node), inputs, ctx)
    ctor_args = init or {}

    def construct(on_meta: bool) -> nn.Module:
        try:
            if on_meta:
                with torch.device("meta"):
                    return cls(**ctor_args)
            return cls(**ctor_args)
        except Exception as exc:
            raise RewriteError(rule, f"cannot build {cls.__name__}({_show(ctor_args)}): {exc}") from None

    def finish(new: nn.Module) -> tuple[nn.Module, dict]:
        new.train(old.training)
        sources = _bind(new, old, rename or {}, strict, rule)
        _copy_settings(new, old, sources)
        for attr in copy_attrs or ():
            if not hasattr(old, attr):
                ctx.refuse(f"cannot copy attribute {attr!r}: {type(old).__name__} has none")
            setattr(new, attr, getattr(old, attr))
        return new, sources

    # Built on the meta device first (no allocation, no initialisation): its size is checked before
    # anything real is made (a rule file's init cannot ask for a 40 GB layer). With strict binding
    # every parameter and buffer is then replaced by an old tensor, so the meta-built module is the
    # module, unless its constructor also made plain tensor attributes with values: then it is built
    # for real. A constructor that cannot run on meta is built for real (real errors, real messages).
    try:
        probe = construct(on_meta=True)
    except RewriteError:
        probe = None
    if probe is not None:
        elements = sum(t.numel() for _, t in named_tensors(probe))
        if elements > MAX_NEW_ELEMENTS:
            ctx.refuse(f"refused to build {cls.__name__}({_show(ctor_args)}): it would hold "
                       f"{elements:,} tensor elements, more than the limit of {MAX_NEW_ELEMENTS:,}")
    new = None
    if strict and probe is not None:
        new, sources = finish(probe)
        if not _materialise_empty_tensors(new, _device_of(old)):
            new = None
    if new is None:
        new, sources = finish(construct(on_meta=False))
    ctx.set_args(node, _rebuild_args(node, kept, ctx))
    ctx.set_module(node, new, sources)
    ctx.constructions[node.name] = Construction(cls, dict(ctor_args), new)


def _device_of(module: nn.Module) -> torch.device:
    return next((t.device for _, t in named_tensors(module)), torch.device("cpu"))


def _materialise_empty_tensors(module: nn.Module, device: torch.device) -> bool:
    """Replace the meta plain tensor attributes of a module built on meta (caches such as ``anchors``)
    by real ones when they are empty (no values to lose); False, touching nothing, if one holds values."""
    found = [(m, k, v) for m in module.modules() for k, v in vars(m).items()
             if isinstance(v, torch.Tensor) and v.is_meta]
    if any(v.numel() for _, _, v in found):
        return False
    for owner, key, value in found:
        setattr(owner, key, torch.empty(value.shape, dtype=value.dtype, device=device))
    return True


def select_inputs(inputs: list[fx.Node], selector: Any, ctx: RewriteContext) -> list[fx.Node]:
    """The inputs a selector keeps (see the module docstring for the selector forms)."""
    n = len(inputs)
    if selector is None:
        return list(inputs)
    if isinstance(selector, list):
        bad = [i for i in selector if not isinstance(i, int) or not -n <= i < n]
        if bad:
            ctx.refuse(f"input indices {bad} out of range for a node with {n} inputs")
        return [inputs[i] for i in selector]
    if isinstance(selector, str):
        m = re.fullmatch(r"\s*(-?\d*)\s*:\s*(-?\d*)\s*", selector)
        if not m:
            ctx.refuse(f"bad input slice {selector!r}; expected 'start:stop'")
        start, stop = (int(g) if g else None for g in m.groups())
        return inputs[start:stop]
    parts, keep = _split(selector, ctx)
    if not isinstance(parts, int) or isinstance(parts, bool) or parts <= 0 or n % parts \
            or not isinstance(keep, int) or isinstance(keep, bool) or not -parts <= keep < parts:
        ctx.refuse(f"cannot split {n} inputs into {parts} equal parts and keep part {keep}")
    size = n // parts
    keep %= parts
    return inputs[keep * size:(keep + 1) * size]


def _split(selector: dict, ctx: RewriteContext) -> tuple[Any, Any]:
    """``(parts, index)`` of ``{split: N, keep: K}`` (or the old ``{groups: N, keep: K}``)."""
    keys = set(selector)
    if keys not in ({"split", "keep"}, {"groups", "keep"}):
        ctx.refuse(f"inputs: expected {{split: N, keep: K}} (or {{groups: N, keep: K}}), not {selector!r}")
    parts, keep = selector.get("split", selector.get("groups")), selector["keep"]
    if keep in ("first", "last") and isinstance(parts, int):
        keep = 0 if keep == "first" else parts - 1
    return parts, keep


def _bind(new: nn.Module, old: nn.Module, prefixes: dict, strict: bool, rule: str) -> dict:
    """Share old tensors into ``new`` by renamed prefix; return new local name -> old local name (or None)."""
    old_tensors = dict(named_tensors(old))
    renames = sorted(((str(o), str(n)) for o, n in prefixes.items()), key=lambda p: -len(p[1]))
    sources: dict[str, str | None] = {}
    for name, tensor in named_tensors(new):
        source = _source_name(name, renames)
        if source in old_tensors:
            if old_tensors[source].shape != tensor.shape:
                raise RewriteError(rule, f"shape mismatch re-binding {type(new).__name__}.{name} "
                                         f"{tuple(tensor.shape)} <- {type(old).__name__}.{source} "
                                         f"{tuple(old_tensors[source].shape)}")
            bind_tensor(new, name, old_tensors[source])
            sources[name] = source
        elif strict:
            raise RewriteError(rule, f"{type(new).__name__}.{name} has no source: {type(old).__name__} has no "
                                     f"tensor {source} (map it with rename:, or set strict: false)")
        else:
            sources[name] = None
    return sources


# Plain values a re-bound submodule takes from the one its tensors come from (eps, momentum, padding...).
_SETTING_TYPES = (bool, int, float, str, tuple, type(None))


def _copy_settings(new: nn.Module, old: nn.Module, sources: dict) -> None:
    """Configure each submodule of ``new`` whose tensors all come from one submodule of ``old``
    of the same class like that one: a re-bound BatchNorm keeps the old ``eps`` and ``momentum``
    (a model builder may have changed them after construction), a convolution its padding.

    Only plain values (numbers, strings, booleans, tuples, None) the new submodule also has are
    copied; the replaced module itself (the root) keeps what its constructor set.
    """
    owners: dict[str, set] = {}
    for new_name, old_name in sources.items():
        owner = new_name.rpartition(".")[0]
        owners.setdefault(owner, set()).add(None if old_name is None else old_name.rpartition(".")[0])
    for owner, old_owners in owners.items():
        if not owner or len(old_owners) != 1 or None in old_owners:
            continue
        target, source = new.get_submodule(owner), old.get_submodule(next(iter(old_owners)))
        if type(target) is not type(source):
            continue
        for key, value in vars(source).items():
            if not key.startswith("_") and key != "training" and key in vars(target) \
                    and isinstance(value, _SETTING_TYPES):
                setattr(target, key, value)


def _source_name(name: str, renames: list[tuple[str, str]]) -> str:
    for old_prefix, new_prefix in renames:
        if name == new_prefix or name.startswith(new_prefix + "."):
            return old_prefix + name[len(new_prefix):]
    return name


def _rebuild_args(node: fx.Node, kept: list[fx.Node], ctx: RewriteContext) -> tuple:
    args = node.args
    if len(args) == 1 and not node.kwargs and isinstance(args[0], (list, tuple)) and \
            all(isinstance(a, fx.Node) for a in args[0]):
        return (type(args[0])(kept),)
    if not node.kwargs and all(isinstance(a, fx.Node) for a in args):
        return tuple(kept)
    ctx.refuse(f"cannot choose inputs of {node.name}: its arguments are neither one list of "
               f"values nor only values ({fx.node.map_arg(args, lambda n: n.name)!r})")


def _show(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
