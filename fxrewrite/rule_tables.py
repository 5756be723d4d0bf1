"""Rules over a table: one rule per row, ``{column}`` in the rule replaced by the row's value.

Owns the substitution (:func:`substitute`); :mod:`fxrewrite.rule_file` applies it to each
row and reports what it found (placeholders naming no column, columns used nowhere).

>>> substitute({"with": "{cls}", "note": "to {cls}", "n": "{n}"}, {"cls": "DDetect", "n": 2}, set(), set())
{'with': 'DDetect', 'note': 'to DDetect', 'n': 2}
"""
from __future__ import annotations

import re
from typing import Any

from .yaml_lines import LineList, LineMap, plain

# A placeholder of a table rule: ``{column}``.
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def substitute(value: Any, row: dict, used: set[str], unknown: set[str], key: Any = None) -> Any:
    """``value`` with every ``{column}`` replaced by the row's value (line numbers kept).

    A string that is only ``"{column}"`` becomes the value itself (a number, a mapping); in a
    longer string it is written as text. An unquoted ``{column}`` (YAML reads a mapping
    ``{column: null}``) counts too. A placeholder naming no column is collected in ``unknown``,
    except in descriptions (free text).
    """
    if isinstance(value, str):
        whole = PLACEHOLDER.fullmatch(value)
        if whole and whole[1] in row:
            used.add(whole[1])
            return row[whole[1]]

        def text(m: re.Match) -> str:
            if m[1] in row:
                used.add(m[1])
                return str(plain(row[m[1]]))
            if key != "description":
                unknown.add(m[1])
            return m[0]

        return PLACEHOLDER.sub(text, value)
    if isinstance(value, dict):
        if len(value) == 1:
            ((k, v),) = value.items()
            if v is None and isinstance(k, str) and k in row:
                used.add(k)
                return row[k]
        result = LineMap((k, substitute(v, row, used, unknown, k)) for k, v in value.items())
        result.line, result.key_lines = getattr(value, "line", 0), getattr(value, "key_lines", {})
        return result
    if isinstance(value, list):
        result = LineList(substitute(v, row, used, unknown, key) for v in value)
        result.line, result.item_lines = getattr(value, "line", 0), getattr(value, "item_lines", [])
        return result
    return value


__all__ = ["PLACEHOLDER", "substitute"]
