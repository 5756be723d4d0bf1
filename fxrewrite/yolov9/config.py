"""Model config files: the configurations shipped in ``fxrewrite/yolov9/configs/``, reading a
config file, and :class:`ConfigError` (a config that cannot be read or built).

A configuration is referred to either by its shipped name (``"yolov9-c"``,
with or without the ``.yaml`` suffix) or by a path to a YAML file.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ..safe_yaml import MAX_TEXT_CHARS, YamlTooLarge, guarded_load

__all__ = ["CONFIG_DIR", "ConfigError", "shipped_configs", "resolve_config_path", "load_config"]

#: Folder holding the shipped ``*.yaml`` model descriptions.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A model config cannot be built.

    The message names the config file (when the config came from one), the
    layer index (when a single layer is at fault) and the problem.
    """

    def __init__(self, problem: str, *, source: str | None = None, layer: int | None = None):
        self.problem = problem
        self.source = source
        self.layer = layer
        where = []
        if source:
            where.append(str(source))
        if layer is not None:
            where.append(f"layer {layer}")
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)


def shipped_configs() -> list[str]:
    """Names (without suffix) of all shipped configurations, sorted."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """Map a shipped name or a file path to an existing YAML file.

    An existing file path wins over a shipped name of the same spelling.
    Raises ``FileNotFoundError`` naming the shipped configurations when
    nothing matches.
    """
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    stem = candidate.name[: -len(".yaml")] if candidate.name.endswith(".yaml") else candidate.name
    # Only a bare name (no folder part) may refer to a shipped config.
    if candidate.parent == Path(".") and (CONFIG_DIR / f"{stem}.yaml").is_file():
        return CONFIG_DIR / f"{stem}.yaml"
    raise FileNotFoundError(
        f"no model config {str(name_or_path)!r}: not an existing file and not a shipped name "
        f"(shipped: {', '.join(shipped_configs())})"
    )


def load_config(name_or_path: str | os.PathLike) -> dict:
    """Parse a shipped or user YAML model config into a fresh dict.

    Each call returns a new dict, so callers may modify the result freely.
    Raises ``FileNotFoundError`` for unknown names and
    :class:`ConfigError` for unparsable files.
    """
    path = resolve_config_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"not a text file (not UTF-8): {error}", source=str(path)) from None
    if len(text) > MAX_TEXT_CHARS:
        raise ConfigError(f"too large for a model config ({len(text):,} characters; the limit is {MAX_TEXT_CHARS:,})",
                          source=str(path))
    try:  # bounded: no alias bomb, no nesting deep enough to exhaust the stack
        loaded = guarded_load(text)
    except YamlTooLarge as error:
        raise ConfigError(f"refused: {error.problem} (line {error.line})", source=str(path)) from None
    except yaml.YAMLError as error:  # one line: the problem and where (str(error) spans several)
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        problem = getattr(error, "problem", None) or str(error).strip().splitlines()[0]
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"invalid YAML{where}: {problem}", source=str(path)) from None
    except (ValueError, OverflowError) as error:  # a scalar PyYAML cannot build (2001-02-30, 5000 digits)
        raise ConfigError(f"invalid YAML: a value cannot be read ({error})", source=str(path)) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"a model config must be a YAML mapping, got {type(loaded).__name__}", source=str(path))
    return loaded
