"""Where the demo and the tests get a PostgreSQL: a DSN, or an embedded server.

`server()` yields the DSN of a server to administer: the one given, else
``BATCHSYNC_PG_DSN``, else a private server started with the ``pgserver``
package (real PostgreSQL binaries in a temporary directory, listening on a
unix socket only), else a private cluster of the machine's own PostgreSQL
binaries (Debian's ``postgresql-NN`` package, for Pythons pgserver has no
wheel for). `local_cluster()` starts such a cluster directly, with extensions
preloaded where a caller needs them (``pg_stat_statements``).
`scratch_database()` creates a database with a unique name on it and drops it
at the end.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = [
    "CONNECT_TIMEOUT",
    "DSN_ENV",
    "NoServer",
    "check_admin",
    "check_dsn",
    "embedded_kind",
    "find_pg_bindir",
    "intermediary",
    "local_cluster",
    "one_line",
    "proxied_dsn",
    "proxy_target",
    "scratch_database",
    "server",
    "with_connect_timeout",
]

DSN_ENV = "BATCHSYNC_PG_DSN"

# Seconds a connection attempt may take, unless the DSN sets its own connect_timeout: a
# server that accepts the connection and never answers must not hang the demo.
CONNECT_TIMEOUT = 10


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
        if find_pg_bindir() is None:
            raise NoServer(
                f"no PostgreSQL: set {DSN_ENV}, install pgserver (pip install -e '.[demo]'), "
                "or install PostgreSQL's server binaries (apt-get install postgresql)"
            ) from exc
        with local_cluster() as local:
            yield local
        return
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


def embedded_kind() -> str:
    """Describe the server `server()` starts when it is given no DSN."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver  # noqa: F401
    except ImportError:
        bindir = find_pg_bindir()
        return f"private cluster of {bindir}" if bindir else "none available"
    return "embedded pgserver"


def check_dsn(dsn: str) -> str | None:
    """Return why `dsn` is not a PostgreSQL DSN (one line), or None when it parses."""
    try:
        conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        return f"not a valid PostgreSQL DSN ({one_line(exc)})"
    return None


def with_connect_timeout(dsn: str, seconds: int = CONNECT_TIMEOUT) -> str:
    """Return `dsn` with ``connect_timeout`` = `seconds`, unless it sets its own."""
    if conninfo_to_dict(dsn).get("connect_timeout"):
        return dsn
    return make_conninfo(dsn, connect_timeout=str(seconds))


def one_line(exc: BaseException) -> str:
    """The message of `exc` on one line (psycopg's connection errors span several)."""
    text = "; ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def check_admin(dsn: str) -> None:
    """Raise NoServer (one line) unless the role of `dsn` can create databases.

    The demo and the tests create a database of their own on the server they are given.
    """
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        row = conn.execute(
            "SELECT rolname, rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
    if row is None or not row[1]:
        role = row[0] if row else "?"
        raise NoServer(
            f"the role {role!r} of the DSN cannot create databases: give a DSN of a role with"
            f" CREATEDB (ALTER ROLE {role} CREATEDB), or no DSN for a private server"
        )


def find_pg_bindir() -> str | None:
    """Return the directory of the newest installed PostgreSQL server binaries, or None.

    ``$BATCHSYNC_PG_BINDIR`` wins; else Debian's ``/usr/lib/postgresql/NN/bin``.
    """
    given = os.environ.get("BATCHSYNC_PG_BINDIR")
    if given:
        return given if os.path.exists(os.path.join(given, "initdb")) else None
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        return None
    newest = max(found, key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    return os.path.dirname(newest)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def local_cluster(
    preload: Sequence[str] = (), settings: dict[str, str] | None = None
) -> Iterator[str]:
    """Start a private cluster of the machine's PostgreSQL binaries; yield a superuser DSN.

    The cluster lives in a temporary directory, listens on 127.0.0.1 at a free
    port (and a unix socket in its directory), trusts local connections, and is
    stopped and removed at the end. `preload` goes to
    ``shared_preload_libraries`` (e.g. ``["pg_stat_statements"]``); `settings`
    are more ``postgresql.conf`` lines. PostgreSQL refuses to run as root, so
    as root the cluster runs as ``nobody``. Raise NoServer when there are no
    binaries or the cluster does not start.
    """
    bindir = find_pg_bindir()
    if bindir is None:
        raise NoServer("no PostgreSQL server binaries (apt-get install postgresql)")
    user: str | None = "nobody" if os.geteuid() == 0 else None
    base = tempfile.mkdtemp(prefix="batchsync-pgcluster-")
    pgdata = os.path.join(base, "data")
    log = os.path.join(base, "log")
    if user is not None:
        shutil.chown(base, user)
    port = _free_port()

    def run(*args: str) -> None:
        done = subprocess.run(
            [os.path.join(bindir, args[0]), *args[1:]],
            user=user,
            capture_output=True,
            text=True,
            cwd=base,
            timeout=120,
            check=False,
            # Its own session: Ctrl-C in a terminal goes to the whole foreground process
            # group, and the server must stop when the demo's cleanup says so, not before.
            start_new_session=True,
        )
        if done.returncode != 0:
            tail = ""
            if os.path.exists(log):
                with open(log, errors="replace") as f:
                    tail = f.read()[-2000:]
            raise NoServer(
                f"{args[0]} failed ({done.returncode}): {done.stderr.strip()[-2000:]} {tail}"
            )

    started = False
    try:
        run("initdb", "-D", pgdata, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(port),
            "unix_socket_directories": f"'{base}'",
            "fsync": "off",
            "max_connections": "200",
        }
        if preload:
            conf["shared_preload_libraries"] = "'" + ",".join(preload) + "'"
        conf.update(settings or {})
        with open(os.path.join(pgdata, "postgresql.conf"), "a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())
        run("pg_ctl", "-D", pgdata, "-l", log, "-w", "-t", "60", "start")
        started = True
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            with suppress(NoServer):
                run("pg_ctl", "-D", pgdata, "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(base, ignore_errors=True)


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



def intermediary(dsn: str) -> str | None:
    """Describe what stands between `dsn` and its server (a pooler, a proxy), or None.

    The server's own port (``inet_server_port()``, NULL over a unix socket) is compared
    with the port `dsn` names: when they differ, something else answers at the DSN.
    """
    params: dict[str, Any] = conninfo_to_dict(dsn)
    host = str(params.get("hostaddr") or params.get("host") or "").split(",")[0]
    port = int(str(params.get("port") or "5432").split(",")[0])
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        row = conn.execute("SELECT inet_server_port()").fetchone()
    server_port = row[0] if row else None
    over_socket = not host or host.startswith("/")
    if (server_port is None) if over_socket else (server_port == port):
        return None
    where = "a unix socket" if server_port is None else f"port {server_port}"
    return f"a pooler or proxy (the DSN names port {port}, the server listens on {where})"
