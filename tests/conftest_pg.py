"""pytest plugin: a session-scoped throwaway PostgreSQL (`postgres` fixture, tests/pg_server.py) and
`postgres_url`, a fresh database on it per test.

Skipped when PostgreSQL is missing and REQUIRE_POSTGRES is unset; with REQUIRE_POSTGRES=1
(scripts/test.sh) a missing install is a failure, so CI cannot pass by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.pg_server import PostgresServer, missing_reason


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A running PostgreSQL cluster on loopback; stopped (and its files removed) at session end."""
    reason = missing_reason()
    if reason is not None:
        if os.environ.get("REQUIRE_POSTGRES", "") not in ("", "0"):
            pytest.fail(f"REQUIRE_POSTGRES is set but {reason}", pytrace=False)
        pytest.skip(reason)
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> str:
    """The SQLAlchemy URL of an empty database of this test's own."""
    return postgres.new_database()
