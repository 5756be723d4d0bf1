"""Shared test helpers (importable as ``helpers``: pytest puts ``tests/`` on the path, see
pyproject.toml): model builders, hostile files, CLI runners and the official-code oracle."""
