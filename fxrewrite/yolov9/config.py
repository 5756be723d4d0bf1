"""Access to the model configurations shipped in ``fxrewrite/yolov9/configs/``.

A configuration is referred to either by its shipped name (``"yolov9-c"``,
with or without the ``.yaml`` suffix) or by a path to a YAML file.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

__all__ = ["CONFIG_DIR", "shipped_configs", "resolve_config_path", "load_config"]

#: Folder holding the shipped ``*.yaml`` model descriptions.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


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
    :class:`~fxrewrite.yolov9.model.ConfigError` for unparsable files.
    """
    from .model import ConfigError  # deferred: model.py imports this module

    path = resolve_config_path(name_or_path)
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid YAML: {error}", source=str(path)) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"a model config must be a YAML mapping, got {type(loaded).__name__}", source=str(path))
    return loaded
