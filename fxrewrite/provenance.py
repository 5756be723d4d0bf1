"""Provenance: where every node of a rewritten graph came from.

Each node carries a :class:`Provenance` in ``node.meta["provenance"]``:

* ``module`` / ``module_class``: the qualified name and class name of the original
  module the node belongs to (the called module for ``call_module`` nodes, the
  innermost enclosing module for operations traced through a module's forward);
* ``origins``: names of the nodes of the *traced* graph it derives from;
* ``rules``: the rules that created or changed it, in order.

>>> import torch, fxrewrite
>>> gm = fxrewrite.trace(torch.nn.Sequential(torch.nn.ReLU()))
>>> node = next(n for n in gm.graph.nodes if n.op == "call_module")
>>> p = node.meta["provenance"]
>>> (p.module, p.module_class, p.origins, p.rules)
('0', 'ReLU', ('_0',), ())
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import fx

META_KEY = "provenance"


@dataclass(frozen=True)
class Provenance:
    module: str
    module_class: str
    origins: tuple[str, ...]
    rules: tuple[str, ...] = ()

    def changed_by(self, rule: str) -> "Provenance":
        """The same provenance with ``rule`` appended (once) to the rules that touched it."""
        if self.rules and self.rules[-1] == rule:
            return self
        return dataclasses.replace(self, rules=self.rules + (rule,))


def provenance(node: fx.Node) -> Provenance | None:
    return node.meta.get(META_KEY)


def mark_changed(node: fx.Node, rule: str) -> None:
    """Record that ``rule`` changed ``node`` (its inputs, its module or its uses)."""
    prov = node.meta.get(META_KEY)
    if prov is not None:
        node.meta[META_KEY] = prov.changed_by(rule)


def derive(new: fx.Node, old: fx.Node, rule: str, module_class: str | None = None) -> None:
    """Give ``new`` the provenance of ``old`` (it replaces it), marked as made by ``rule``."""
    prov = old.meta.get(META_KEY)
    if prov is None:
        return
    if module_class is not None:
        prov = dataclasses.replace(prov, module_class=module_class)
    new.meta[META_KEY] = prov.changed_by(rule)
