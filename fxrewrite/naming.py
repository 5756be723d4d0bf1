"""How fxrewrite names things and compares them: globs over class and function names,
attribute equality, and renaming of dotted module paths.

Owns the one definition of each comparison that patterns, checks, the tracer's leaf
policy and plug-ins share, so that ``module_class: "Conv*"`` means the same in a
pattern, a leaf policy and a check, and ``attrs: {stride: [1, 1]}`` the same in a
pattern and in ``attr_equals``.

>>> import torch
>>> class_matches(torch.nn.Conv2d(1, 1, 1), "Conv*"), class_matches(torch.nn.ReLU, "torch.nn.*.ReLU")
(True, True)
>>> same_value((1, 1), [1, 1]), same_value(torch.tensor([8., 16.]), [8, 16]), same_value(1, "1")
(True, True, False)
>>> rename_path("model.38.cv2.0", {"model.38": "model.22"})
'model.22.cv2.0'
"""
from __future__ import annotations

import fnmatch
from functools import lru_cache
from typing import Any, Callable, Iterable, Mapping

import torch
from torch.fx.node import _get_qualified_name

# A rename of dotted module paths: a mapping of prefixes (the longest matching prefix wins) or a function.
Rename = Mapping[str, str] | Callable[[str], str]


def glob_matches(name: str, glob: str) -> bool:
    """``fnmatch`` glob (``*``, ``?``, ``[abc]``), case-sensitive, over the whole name."""
    return fnmatch.fnmatchcase(name, glob)


@lru_cache(maxsize=None)
def _class_names(cls: type) -> tuple[str, str]:
    return cls.__name__, f"{cls.__module__}.{cls.__qualname__}"


def class_names(obj: Any) -> tuple[str, str]:
    """``(name, qualified name)`` of a class, or of an object's class."""
    return _class_names(obj if isinstance(obj, type) else type(obj))


def class_matches(obj: Any, globs: str | Iterable[str]) -> bool:
    """Whether the class of ``obj`` (or ``obj``, a class) matches one of ``globs`` by its name
    (``SiLU``) or its qualified name (``torch.nn.modules.activation.SiLU``)."""
    names = class_names(obj)
    if isinstance(globs, str):
        globs = (globs,)
    return any(fnmatch.fnmatchcase(name, glob) for glob in globs for name in names)


_FUNCTION_NAMES: dict[Any, tuple[str, ...]] = {}


def function_names(target: Any) -> tuple[str, ...]:
    """Names a ``call_function`` target can be matched by: qualified and short.

    Cached per target: naming a function is slow and a graph calls few distinct ones.
    """
    try:
        return _FUNCTION_NAMES[target]
    except (KeyError, TypeError):  # not seen yet, or not hashable
        pass
    try:
        qualified = _get_qualified_name(target)
    except Exception:  # a callable fx cannot name: match by its repr
        qualified = repr(target)
    short = getattr(target, "__name__", qualified.rpartition(".")[2])
    names = qualified, short, qualified.replace("_operator.", "operator.")
    try:
        _FUNCTION_NAMES[target] = names
    except TypeError:
        pass
    return names


_FUNCTION_MATCHES: dict[tuple[str, Any], bool] = {}


def function_matches(glob: str, target: Any) -> bool:
    """Whether one of ``target``'s :func:`function_names` matches ``glob`` (cached)."""
    try:
        return _FUNCTION_MATCHES[glob, target]
    except (KeyError, TypeError):
        pass
    found = any(fnmatch.fnmatchcase(name, glob) for name in function_names(target))
    try:
        _FUNCTION_MATCHES[glob, target] = found
    except TypeError:
        pass
    return found


def same_value(actual: Any, expected: Any) -> bool:
    """Attribute equality as rule files mean it: lists and tuples compare alike (YAML has no
    tuples), recursively; a tensor compares by its values (``stride: [8, 16]``); a comparison
    that fails (incomparable types) is ``False``."""
    if isinstance(actual, torch.Tensor) and not isinstance(expected, torch.Tensor):
        if actual.is_meta:
            return False
        actual = actual.tolist()
    if isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(actual) == len(expected) and all(same_value(a, e) for a, e in zip(actual, expected))
    try:
        return bool(actual == expected)
    except Exception:
        return False


def rename_path(path: str, rename: Rename | None) -> str:
    """Apply a rename to a dotted path: a function, or a mapping of dotted prefixes (longest prefix wins)."""
    if rename is None:
        return path
    if callable(rename):
        return rename(path)
    best = max((p for p in rename if path == p or path.startswith(p + ".")), key=len, default=None)
    return path if best is None else rename[best] + path[len(best):]


__all__ = ["Rename", "glob_matches", "class_names", "class_matches", "function_names", "function_matches",
           "same_value", "rename_path"]
