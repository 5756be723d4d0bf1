"""Every global a pickle names, listed without unpickling it (to explain a refusal).

The loader refuses the first name that is not allowed, as soon as the pickle
asks for it; to say *everything* that is wrong (every unknown block, every
gadget), a caller lists the pickle's globals with :func:`pickle_globals`, which
only reads opcodes (``pickletools``) and runs nothing.

>>> import pickle, collections
>>> sorted(pickle_globals(pickle.dumps(collections.OrderedDict(), protocol=2)))
['collections.OrderedDict']
"""
from __future__ import annotations

import _compat_pickle
import pickletools
from typing import Any

__all__ = ["pickle_globals", "python3_name"]

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}


def python3_name(module: str, name: str) -> str:
    """``module.name`` as Python 3 spells it (protocol-2 pickles say ``__builtin__.set``; unpickling maps it)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


def pickle_globals(data: bytes) -> set[str]:
    """Every global (``module.name``) a pickle refers to, found without unpickling it.

    ``GLOBAL``/``INST`` carry the name inline; for ``STACK_GLOBAL`` (protocol 4+)
    the two most recent strings are used, following the memo, which is how
    pickle itself builds them. Raises whatever ``pickletools`` raises on a
    truncated or garbage opcode stream.
    """
    found: set[str] = set()
    strings: list[str] = []
    memo: dict[int, Any] = {}
    last: Any = None
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, _, qual = arg.partition(" ")
            found.add(python3_name(module, qual))
            last = None
        elif name in _STRING_OPS:
            last = arg.decode("latin-1") if isinstance(arg, bytes) else arg
            strings.append(last)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = last
        elif name == "MEMOIZE":
            memo[len(memo)] = last
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            last = memo.get(arg)
            if isinstance(last, str):
                strings.append(last)
        elif name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]) if len(strings) >= 2 else "<unresolved STACK_GLOBAL>")
            last = None
        else:
            last = None
    return found
