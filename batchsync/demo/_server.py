"""Where the demo and the tests get a PostgreSQL: a DSN, or an embedded server.

`server()` yields the DSN of a server to administer: the one given, else
``BATCHSYNC_PG_DSN``, else a private server started with the ``pgserver``
package (real PostgreSQL binaries in a temporary directory, listening on a
unix socket only). `scratch_database()` creates a database with a unique name
on it and drops it at the end.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = ["DSN_ENV", "NoServer", "proxied_dsn", "proxy_target", "scratch_database", "server"]

DSN_ENV = "BATCHSYNC_PG_DSN"


class NoServer(RuntimeError):
    """No PostgreSQL could be had: no DSN given and no usable pgserver."""


@contextmanager
def server(dsn: str | None = None) -> Iterator[str]:
    """Yield `dsn`, else ``$BATCHSYNC_PG_DSN``, else an embedded server's DSN.

    The embedded server is stopped and its directory removed at the end.
    Raise NoServer when the embedded server cannot be started.
    """
    dsn = dsn or os.environ.get(DSN_ENV)
    if dsn:
        yield dsn
        return
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset, at import time.
            warnings.simplefilter("ignore")
            from pgserver.postgres_server import get_server
    except ImportError as exc:
        raise NoServer(
            f"no PostgreSQL: set {DSN_ENV} or install pgserver (pip install 'batchsync[demo]')"
        ) from exc
    pgdata = tempfile.mkdtemp(prefix="batchsync-pg-")
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                embedded = get_server(pgdata, cleanup_mode="stop")
        except Exception as exc:
            raise NoServer(f"cannot start an embedded PostgreSQL in {pgdata}: {exc}") from exc
        try:
            yield embedded.get_uri()
        finally:
            embedded.cleanup()
    finally:
        shutil.rmtree(pgdata, ignore_errors=True)


@contextmanager
def scratch_database(admin_dsn: str, prefix: str = "batchsync") -> Iterator[str]:
    """Create a database with a unique name, yield its DSN, drop it at the end."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(admin_dsn, dbname=name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def proxy_target(dsn: str) -> str | tuple[str, int]:
    """Return where a proxy must forward to reach the server of `dsn`."""
    params: dict[str, Any] = conninfo_to_dict(dsn)
    host = str(params.get("hostaddr") or params.get("host") or "").split(",")[0]
    port = int(str(params.get("port") or "5432").split(",")[0])
    if not host or host.startswith("/"):
        return f"{host or '/tmp'}/.s.PGSQL.{port}"
    return (host, port)


def proxied_dsn(dsn: str, port: int) -> str:
    """Return `dsn` pointed at a proxy listening on 127.0.0.1:`port`."""
    params: dict[str, Any] = conninfo_to_dict(dsn)
    params.pop("hostaddr", None)
    params.update(host="127.0.0.1", port=str(port))
    return make_conninfo("", **params)

