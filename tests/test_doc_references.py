"""Every path of this repository that its documentation, comments and docstrings name exists.

A renamed file leaves references behind (the toy models of tests/core moved from
``models.py`` to ``toy_models.py``, and three references kept the old name); this finds them: every ``tests/...``, ``docs/...``, ``fxrewrite/...``, ``scripts/...``,
``rules/...``, ``benchmarks/...`` or ``notebooks/...`` path with a file suffix, in every
text file of the repository.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".ipynb", ".sh", ".toml", ".txt", ".cfg"}
SKIP = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks"}
REFERENCE = re.compile(r"(?<![\w./-])((?:tests|docs|fxrewrite|scripts|rules|benchmarks|notebooks)/[\w./-]*?"
                       r"\.(?:py|md|yaml|ipynb|sh|json|png|svg))(?![\w/-])")


def text_files() -> list[Path]:
    found = []
    for path in ROOT.rglob("*"):
        parts = set(path.relative_to(ROOT).parts)
        if path.is_file() and path.suffix in SUFFIXES and not parts & SKIP and not any(
                p.endswith(".egg-info") for p in parts):
            found.append(path)
    return found


def test_the_scan_sees_the_repository():
    names = {p.relative_to(ROOT).as_posix() for p in text_files()}
    assert {"README.md", "docs/cli.md", "tests/helpers/official.py", "pyproject.toml"} <= names


def test_every_referenced_repository_path_exists():
    missing = []
    for path in text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for reference in REFERENCE.findall(line):
                if not (ROOT / reference).exists():
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {reference}")
    assert missing == []
