"""Fixtures shared by the core tests (tests/core and tests/core/actions).

Its folder is on ``sys.path`` for every test below it (pytest puts a conftest's folder there),
so ``from toy_models import ...`` works from tests/core/actions too.
"""
from __future__ import annotations

import pytest

from fxrewrite import registry


@pytest.fixture
def scope():
    """A scoped registry for one test: what the test registers is gone after it."""
    with registry.scoped("test") as scoped:
        yield scoped
