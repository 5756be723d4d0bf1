"""``needs_dot``: a test that renders with Graphviz fails (never skips) when ``dot`` is missing,
saying how to install it, as the official-code tests do: setup installs it everywhere tests run."""
from __future__ import annotations

import functools
import shutil

import pytest

INSTALL_HINT = "Graphviz's `dot` is not installed: run `bash scripts/setup.sh` (apt-get install -y graphviz)"


def needs_dot(test):
    @functools.wraps(test)
    def run(*args, **kwargs):
        if shutil.which("dot") is None:
            pytest.fail(INSTALL_HINT)
        return test(*args, **kwargs)

    return run
