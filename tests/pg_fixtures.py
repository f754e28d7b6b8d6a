"""PostgreSQL fixtures: a real server, a database per test run, pools and a proxy.

The server is ``$BATCHSYNC_PG_DSN`` when set, else an embedded one started
with ``pgserver``. Without either the tests that need it are skipped, except
under ``CI=true``, where a missing server is a failure.

Loaded by ``tests/conftest.py`` with ``pytest_plugins = ["tests.pg_fixtures"]``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


def _no_server(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and no PostgreSQL: {reason}", pytrace=False)
    pytest.skip(f"no PostgreSQL: {reason}")


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    """The DSN of the server, with rights to create databases (and roles)."""
    try:
        from batchsync.demo import _server
    except ImportError as exc:
        _no_server(f"{exc} (pip install -e '.[test]')")
        raise AssertionError("unreachable") from exc
    try:
        with _server.server() as dsn:
            yield dsn
    except _server.NoServer as exc:
        _no_server(str(exc))


@pytest.fixture(scope="session")
def pg_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """The DSN of a database created for this test run and dropped after it."""
    from batchsync.demo import _server

    with _server.scratch_database(pg_admin_dsn, "batchsync_test") as dsn:
        yield dsn


@pytest.fixture
def pg_conn(pg_dsn: str) -> Iterator[Any]:
    """An autocommit connection to the test database, for set-up and checks."""
    import psycopg

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def pg_pool(pg_dsn: str) -> Iterator[Any]:
    """An open autocommit ConnectionPool of 2 connections on the test database."""
    from psycopg_pool import ConnectionPool

    pool: ConnectionPool[Any] = ConnectionPool(
        pg_dsn, min_size=2, max_size=2, kwargs={"autocommit": True}, open=True, name="test"
    )
    try:
        pool.wait(10.0)
        yield pool
    finally:
        pool.close()


@pytest.fixture
def pg_proxy(pg_dsn: str) -> Iterator[Any]:
    """A started Proxy in front of the server, closed after the test."""
    from batchsync.demo._proxy import Proxy
    from batchsync.demo._server import proxy_target

    with Proxy(proxy_target(pg_dsn)) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def pg_stats_admin_dsn() -> Iterator[str]:
    """A private cluster of the machine's PostgreSQL with pg_stat_statements loaded.

    The embedded server cannot preload extensions, so this is Debian's ``postgresql-NN``
    run as a private cluster (see ``batchsync.demo._server.local_cluster``).
    """
    from batchsync.demo import _server

    try:
        with _server.local_cluster(preload=["pg_stat_statements"]) as dsn:
            yield dsn
    except _server.NoServer as exc:
        _no_server(f"no private cluster with pg_stat_statements: {exc}")


@dataclass
class Pooler:
    """A PgBouncer in transaction mode in front of a server."""

    direct: str  # the server's administrator, straight to the server
    pooled: str  # the same, through PgBouncer

    def through(self, dsn: str) -> str:
        """Return `dsn` (a database on the server) pointed at PgBouncer."""
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        pooled = conninfo_to_dict(self.pooled)
        return make_conninfo(dsn, host=pooled["host"], port=pooled["port"], hostaddr=None)


@pytest.fixture(scope="session")
def pgbouncer(pg_stats_admin_dsn: str) -> Iterator[Pooler]:
    """PgBouncer (Debian's ``pgbouncer``) in transaction mode, 4 server connections per
    database and user, in front of the pg_stat_statements cluster. Skipped when PgBouncer
    is not installed, except under ``CI=true``, where that fails.
    """
    from batchsync.demo._pgbouncer import NoPgBouncer, pgbouncer

    try:
        with pgbouncer(pg_stats_admin_dsn, pool_size=4) as pooled:
            yield Pooler(pg_stats_admin_dsn, pooled)
    except NoPgBouncer as exc:
        reason = f"no PgBouncer: {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)


# -- for tests of what starts its own private server (the demo, the examples) ----------------


@pytest.fixture
def server_tmp() -> Iterator[Path]:
    """A temporary directory (TMPDIR) for a process that starts its own private server.

    As root, Debian's PostgreSQL runs as ``nobody`` (it refuses root), who cannot enter
    pytest's tmp_path (mode 0700): this one is world-readable. Skipped without pgserver or
    server binaries, except under ``CI=true``.
    """
    from batchsync.demo import _server

    if _server.embedded_kind() == "none available":
        _no_server("neither pgserver nor PostgreSQL's server binaries")
    path = Path(tempfile.mkdtemp(prefix="batchsync-test-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def process_gone(pid: int) -> bool:
    """True when process `pid` has ended (a zombie has: only its parent's reaping is left)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def wait_gone(pids: list[int], seconds: float = 30.0) -> bool:
    """Wait up to `seconds` for every process of `pids` to end; True when they all have."""
    deadline = time.monotonic() + seconds
    while not all(process_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)  # another process's exit: nothing to wait on but its pid
    return all(process_gone(p) for p in pids)
