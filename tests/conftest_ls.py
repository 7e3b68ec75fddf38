"""pytest plugin: a session-scoped real Label Studio (`label_studio` fixture).

Skipped only when `.venv-ls` is missing and REQUIRE_LABEL_STUDIO is unset; with
REQUIRE_LABEL_STUDIO=1 a missing install is a failure, so CI cannot pass by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.ls_server import DEFAULT_VENV, LabelStudioServer, label_studio_installed


@pytest.fixture(scope="session")
def label_studio() -> Iterator[LabelStudioServer]:
    """A running Label Studio 1.23.2 with a legacy-token superuser; stopped at session end."""
    if not label_studio_installed(DEFAULT_VENV):
        msg = (f"Label Studio is not installed in {DEFAULT_VENV}; "
               "run scripts/install_label_studio.sh")
        if os.environ.get("REQUIRE_LABEL_STUDIO", "") not in ("", "0"):
            pytest.fail(f"REQUIRE_LABEL_STUDIO is set but {msg}", pytrace=False)
        pytest.skip(msg)
    with LabelStudioServer() as server:
        yield server
