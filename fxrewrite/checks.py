"""Built-in checks. A check runs after a pattern matched and may reject the match with a reason.

Registered in :data:`fxrewrite.registry.BUILTINS` when this module is imported
(``fxrewrite/__init__.py`` does). Two are the check spelling of a pattern key, with
the same meaning through the same helper, for when a rejection should be logged
with its reason: ``max_users`` is ``num_users: {max: count}`` and ``attr_equals``
is ``attrs: {name: value}``.

In a rule file, ``checks:`` is a list of one-key mappings, ``{check_name: arguments}``
(a list for positional arguments, a mapping for keyword arguments, or one value):

.. code-block:: yaml

    checks:
      - same_shape: [$identity, $x]      # a pass-through: output shape equals input shape
      - max_users: {node: $x, count: 1}

A rejected match is recorded in the rule's log with the check's reason and the
node is left alone.
"""
from __future__ import annotations

from torch import fx

from .naming import class_matches, same_value
from .pattern import Count, input_nodes
from .registry import BUILTINS, register_check
from .shapes import shape_tree


@register_check("same_shape", registry=BUILTINS)
def same_shape(ctx, match, a: fx.Node, b: fx.Node) -> str | None:
    """The two nodes' propagated output shapes are equal (needs a trace with example inputs)."""
    sa, sb = shape_tree(a), shape_tree(b)
    if sa is None or sb is None:
        missing = a.name if sa is None else b.name
        return f"no shape recorded for {missing}; trace with example inputs"
    if sa != sb:
        return f"{a.name} has shape {sa} but {b.name} has shape {sb}"
    return None


@register_check("passthrough", registry=BUILTINS)
def passthrough(ctx, match, node: fx.Node | None = None) -> str | None:
    """The node has one input and (when shapes are known) the same output shape as it."""
    node = node or match.root
    inputs = input_nodes(node)
    if len(inputs) != 1:
        return f"{node.name} has {len(inputs)} inputs, not 1"
    si, so = shape_tree(inputs[0]), shape_tree(node)
    if si is not None and so is not None and si != so:
        return f"{node.name} changes the shape {si} -> {so}"
    return None


@register_check("max_users", registry=BUILTINS)
def max_users(ctx, match, node: fx.Node | None = None, count: int = 1) -> str | None:
    """The node's value is used by at most ``count`` nodes (the pattern key ``num_users: {max: count}``)."""
    node = node or match.root
    if not Count(max=count).accepts(len(node.users)):
        return f"{node.name} is used by {len(node.users)} nodes ({', '.join(u.name for u in node.users)}), more than {count}"
    return None


@register_check("not_output", registry=BUILTINS)
def not_output(ctx, match, node: fx.Node | None = None) -> str | None:
    """The node does not feed the graph's output directly."""
    node = node or match.root
    if any(u.op == "output" for u in node.users):
        return f"{node.name} is an output of the model"
    return None


@register_check("attr_equals", registry=BUILTINS)
def attr_equals(ctx, match, node: fx.Node, name: str, value) -> str | None:
    """The node's module has attribute ``name`` equal to ``value`` (the pattern key ``attrs: {name: value}``)."""
    module = ctx.modules.get(node.target) if node.op == "call_module" else None
    actual = getattr(module, name, "<missing>")
    if not same_value(actual, value):
        return f"{node.name}.{name} is {actual!r}, not {value!r}"
    return None


@register_check("has_submodule", registry=BUILTINS)
def has_submodule(ctx, match, node: fx.Node | None = None, name: str = "", cls: str | None = None) -> str | None:
    """The node's module has a submodule at dotted path ``name`` (of class ``cls``, a glob over its class
    name or qualified name, when given).

    Lets a rule skip what it already rewrote, e.g. a block whose BatchNorm was folded.
    """
    node = node or match.root
    module = ctx.modules.get(node.target) if node.op == "call_module" else None
    if module is None:
        return f"{node.name} does not call a module"
    try:
        sub = module.get_submodule(name)
    except AttributeError:
        return f"{node.name} ({type(module).__name__}) has no submodule {name!r}"
    if cls is not None and not class_matches(sub, cls):
        return f"{node.name}.{name} is a {type(sub).__name__}, not {cls}"
    return None
