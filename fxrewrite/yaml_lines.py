r"""YAML read with line numbers: every mapping and list of a rule file remembers where it was, so
that each problem is reported as ``file:line``. Owns the loader (safe: no arbitrary objects,
bounded nesting, duplicate keys refused) and the plain-data view of what it read.

>>> data = yaml.load("rules:\n  - {name: a}\n", LineLoader)
>>> data.key_lines["rules"], data["rules"].item_lines, plain(data)
(1, [2], {'rules': [{'name': 'a'}]})
"""
from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import yaml

from .safe_yaml import GuardedLoader


class LineMap(dict):
    """A YAML mapping that remembers its line and the line of each key."""

    line: int = 0
    key_lines: dict


class LineList(list):
    """A YAML list that remembers its line and the line of each item."""

    line: int = 0
    item_lines: list


class LineLoader(GuardedLoader):
    """A safe loader (no arbitrary objects, bounded nesting) whose mappings and lists carry line numbers."""


def _construct_map(loader: LineLoader, node: yaml.MappingNode) -> LineMap:
    loader.flatten_mapping(node)
    result = LineMap()
    result.line, result.key_lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(None, None, f"{kind_of(key)} cannot be a mapping key",
                                                    key_node.start_mark)
        if key in result:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_seq(loader: LineLoader, node: yaml.SequenceNode) -> LineList:
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line, result.item_lines = node.start_mark.line + 1, [c.start_mark.line + 1 for c in node.value]
    return result


LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


def plain(value: Any) -> Any:
    """Strip the line-number wrappers: rules hold plain dicts and lists."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


_KINDS = {dict: "a mapping", LineMap: "a mapping", list: "a list", LineList: "a list", str: "a string",
          int: "an integer", float: "a number", bool: "a boolean", type(None): "null"}


def kind_of(value: Any) -> str:
    """How an error message names a value's type: "a mapping", "a string"..."""
    return _KINDS.get(type(value), type(value).__name__)


__all__ = ["LineMap", "LineList", "LineLoader", "plain", "kind_of"]
