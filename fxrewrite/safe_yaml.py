"""Loading untrusted YAML with bounded cost.

``yaml.safe_load`` constructs no arbitrary objects, but it is not bounded:

* aliases let a few lines stand for a structure of exponential size ("billion
  laughs"); PyYAML shares the repeated objects, so loading is cheap, but anything
  that walks the result (copying it, printing it in an error message, dumping it)
  expands it;
* deep nesting (``[[[[...``) makes PyYAML's scanner quadratic and its composer and
  constructor recurse until ``RecursionError``;
* an alias may refer to the node that contains it (a recursive structure).

:func:`guarded_load` refuses all of these with :class:`YamlTooLarge` (a
``yaml.YAMLError`` carrying the position): nesting is checked while composing,
so it stops early, and the alias-expanded size and depth of the composed
document are measured (linear in its distinct nodes) before anything is
constructed. Rule files and model configs are both read through it.
"""
from __future__ import annotations

from typing import Any

import yaml

__all__ = ["MAX_TEXT_CHARS", "MAX_DEPTH", "MAX_EXPANDED_SIZE", "YamlTooLarge", "GuardedLoader", "guarded_load",
           "check_expanded_size"]

#: Real rule files and model configs are a few kilobytes, a dozen levels deep: far below every limit.
MAX_TEXT_CHARS = 1_000_000  # characters of YAML text (checked by the callers, which know the file)
MAX_DEPTH = 64  # nesting of lists and mappings, aliases expanded
MAX_EXPANDED_SIZE = 1_000_000  # nodes plus scalar characters, aliases expanded (a text without aliases
#                                stays below its length, so every text under MAX_TEXT_CHARS without aliases passes)


class YamlTooLarge(yaml.YAMLError):
    """The document is refused: too deep, too large once aliases are expanded, or recursive."""

    def __init__(self, problem: str, mark: yaml.Mark | None):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark

    @property
    def line(self) -> int | None:
        return self.problem_mark.line + 1 if self.problem_mark is not None else None


class GuardedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose composition stops as soon as the text nests deeper than :data:`MAX_DEPTH`."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlTooLarge(f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def check_expanded_size(root: yaml.Node) -> None:
    """Refuse a composed document whose alias-expanded form is too large, too deep or recursive.

    Each distinct node is measured once, however many times aliases repeat it.
    """
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, expanded depth)
    open_nodes: set[int] = set()  # entered, not finished: the ancestors of the node at hand
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if isinstance(node, yaml.ScalarNode):
            measured[key] = (1 + len(node.value), 0)
            continue
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
        if finished:
            open_nodes.discard(key)
            size = 1 + sum(measured[id(c)][0] for c in children)
            depth = 1 + max((measured[id(c)][1] for c in children), default=0)
            if size > MAX_EXPANDED_SIZE:
                raise YamlTooLarge(f"the document expands to more than {MAX_EXPANDED_SIZE:,} nodes and characters "
                                   "(aliases repeated too often?)", node.start_mark)
            if depth > MAX_DEPTH:
                raise YamlTooLarge(f"nested more than {MAX_DEPTH} levels deep (aliases expanded)", node.start_mark)
            measured[key] = (size, depth)
            continue
        if key in measured:
            continue
        if key in open_nodes:
            raise YamlTooLarge("an alias refers to a node that contains it (a recursive structure)", node.start_mark)
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in measured)


def guarded_load(text: str, loader: type[GuardedLoader] = GuardedLoader) -> Any:
    """``yaml.load(text, loader)`` after the composed document passed the checks above.

    Raises :class:`YamlTooLarge`, another ``yaml.YAMLError`` for invalid YAML, or
    ``ValueError`` / ``OverflowError`` for a scalar PyYAML resolves but cannot build
    (``2001-02-30`` as a date, an integer of more than 4300 digits).
    """
    instance = loader(text)
    try:
        node = instance.get_single_node()
        if node is None:
            return None
        check_expanded_size(node)
        return instance.construct_document(node)
    finally:
        instance.dispose()
