"""The private cluster of the machine's own PostgreSQL binaries (where pgserver is missing)."""

from __future__ import annotations

import os

import pytest

from batchsync.demo import _server

pytestmark = pytest.mark.pg

psycopg = pytest.importorskip("psycopg")


@pytest.mark.timeout(120)
def test_local_cluster_preloads_pg_stat_statements_and_is_removed() -> None:
    if _server.find_pg_bindir() is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true and no PostgreSQL server binaries", pytrace=False)
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    with _server.local_cluster(preload=["pg_stat_statements"]) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_stat_statements")
            conn.execute("SELECT 1 AS batchsync_marker")
            rows = conn.execute(
                "SELECT calls FROM pg_stat_statements WHERE query LIKE %s",
                ("%batchsync_marker%",),
            ).fetchall()
            assert rows == [(1,)]
        port = int(dsn.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=2)


def test_local_cluster_without_binaries_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHSYNC_PG_BINDIR", "/nonexistent")
    with (
        pytest.raises(_server.NoServer, match="no PostgreSQL server binaries"),
        _server.local_cluster(),
    ):
        pass
