"""Fixtures of the YOLOv9 tests: the official-code oracle, and checkpoints it wrote (once per session)."""
from __future__ import annotations

import pytest

from helpers.official import INSTALL_HINT, official_available


def pytest_runtest_setup(item):
    """A test marked ``requires_official`` fails without the oracle, saying how to install it."""
    if item.get_closest_marker("requires_official") is not None and not official_available():
        pytest.fail(INSTALL_HINT, pytrace=False)


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory):
    """``official_checkpoint(name)``: the :class:`official_checkpoints.OfficialCheckpoint` of one of
    ``official_checkpoints.OFFICIAL_CHECKPOINTS``, written by the official code the first time a test
    of the session asks for it (the files stay for the session: converting them is what tests do)."""
    if not official_available():
        pytest.fail(INSTALL_HINT, pytrace=False)
    from helpers.official_checkpoints import OFFICIAL_CHECKPOINTS, official_config, write_training_checkpoint

    folder = tmp_path_factory.mktemp("official-checkpoints")
    written = {}

    def get(name: str):
        if name not in written:
            _, nc = OFFICIAL_CHECKPOINTS[name]
            path = folder / f"{name.replace('/', '-')}-last.pt"
            written[name] = write_training_checkpoint(path, official_config(name), label=name, nc=nc)
        return written[name]

    return get
