"""Fixtures shared by the core tests (tests/core and tests/core/actions); the shared model
builders are in the ``helpers`` package (tests/helpers/)."""
from __future__ import annotations

import pytest

from fxrewrite import registry


@pytest.fixture
def scope():
    """A scoped registry for one test: what the test registers is gone after it."""
    with registry.scoped("test") as scoped:
        yield scoped
