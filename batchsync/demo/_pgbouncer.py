"""A private PgBouncer in front of a PostgreSQL, for the demo, the tests and the benchmarks.

`pgbouncer(dsn)` starts the machine's PgBouncer (Debian's ``pgbouncer`` package) in a
temporary directory, listening on 127.0.0.1 at a free port, pooling in `pool_mode`
(``transaction`` by default, the mode where session state, prepared statements included,
does not survive a transaction) in front of the server of `dsn`, and yields `dsn` pointed
at it. Clients log in with the users of `dsn` and `users`; PgBouncer passes their
passwords on to the server. Its admin console is the database ``pgbouncer`` for the user
of `dsn` (``SHOW POOLS``). PgBouncer refuses to run as root, so as root it runs as
``nobody``. Raise NoPgBouncer when there is no binary or it does not start.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._server import _free_port, proxy_target

__all__ = ["NoPgBouncer", "find_pgbouncer", "pgbouncer"]


class NoPgBouncer(RuntimeError):
    """PgBouncer is not installed or did not start."""


def find_pgbouncer() -> str | None:
    """Return the path of the pgbouncer binary (``$BATCHSYNC_PGBOUNCER`` wins), or None."""
    given = os.environ.get("BATCHSYNC_PGBOUNCER")
    if given:
        return given if os.path.exists(given) else None
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None
    )


def _quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


@contextmanager
def pgbouncer(
    dsn: str,
    *,
    pool_mode: str = "transaction",
    pool_size: int = 20,
    max_client_conn: int = 1000,
    users: Sequence[tuple[str, str]] = (),
) -> Iterator[str]:
    """Start PgBouncer in front of the server of `dsn`; yield `dsn` through it. See the module."""
    binary = find_pgbouncer()
    if binary is None:
        raise NoPgBouncer("no pgbouncer binary (apt-get install pgbouncer)")
    params: dict[str, Any] = conninfo_to_dict(dsn)
    target = proxy_target(dsn)
    if isinstance(target, tuple):
        server = f"host={target[0]} port={target[1]}"
    else:  # a unix socket: PgBouncer wants the directory and the port
        directory, _, name = target.rpartition("/")
        server = f"host={directory} port={name.rsplit('.', 1)[-1]}"
    user = str(params.get("user") or "postgres")
    logins = [(user, str(params.get("password") or "")), *users]
    run_as = "nobody" if os.geteuid() == 0 else None
    base = tempfile.mkdtemp(prefix="batchsync-pgbouncer-")
    port = _free_port()
    conf = os.path.join(base, "pgbouncer.ini")
    with open(os.path.join(base, "users.txt"), "w") as f:
        f.writelines(f"{_quote(u)} {_quote(p)}\n" for u, p in logins)
    with open(conf, "w") as f:
        f.write(
            "[databases]\n"
            f"* = {server}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {base}/users.txt\n"
            f"admin_users = {user}\n"
            f"pool_mode = {pool_mode}\n"
            f"default_pool_size = {pool_size}\n"
            f"max_client_conn = {max_client_conn}\n"
            # No sanity query of its own: the demo counts the statements the server runs.
            "server_check_query =\n"
            "ignore_startup_parameters = extra_float_digits\n"
            f"logfile = {base}/pgbouncer.log\n"
        )
    if run_as is not None:
        for path in (base, *(os.path.join(base, n) for n in os.listdir(base))):
            shutil.chown(path, run_as)
    process = subprocess.Popen(
        [binary, conf],
        user=run_as,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=base,
    )
    try:
        _wait_listening(process, port, base)
        yield make_conninfo(dsn, host="127.0.0.1", port=str(port), hostaddr=None)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # safe shutdown: close the server connections
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if process.stderr is not None:
            process.stderr.close()
        shutil.rmtree(base, ignore_errors=True)


def _wait_listening(process: subprocess.Popen[bytes], port: int, base: str) -> None:
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            log = ""
            with_log = os.path.join(base, "pgbouncer.log")
            if os.path.exists(with_log):
                with open(with_log, errors="replace") as f:
                    log = f.read()[-2000:]
            raise NoPgBouncer(f"pgbouncer exited with {process.returncode}: {err[-2000:]} {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.02)  # polling: a starting process offers nothing to wait on
    process.kill()
    raise NoPgBouncer(f"pgbouncer did not listen on 127.0.0.1:{port} within 20 s")
