"""Helpers for the web tests and benchmarks: real servers, a concurrent client, server counts.

- ``serve_werkzeug(app)`` / ``serve_waitress(app)``: a real threaded WSGI server on a free
  loopback port, in a thread of this process; the context manager yields its base URL and
  stops it (and its threads) at the end.
- ``fetch_all(urls, threads=16)``: GET every URL from a pool of client threads (urllib, one
  connection per request); returns the responses in order, with their latencies.
- ``run_clients(clients, seconds, step)``: the benchmarks' load driver: `clients` threads,
  released together, each calling ``step(rng)`` until the time is up.
- ``DatabaseWatch``: reads the server's own statistics for one database from another
  database (so that reading does not count): ``xact_commit`` and ``pg_stat_activity``.

Run as a script to serve an app in its own process (the benchmarks do)::

    python tests/webutil.py --server waitress --threads 16 module:factory
    # prints "listening on PORT" once ready; stops on SIGTERM or when stdin closes
"""

from __future__ import annotations

import argparse
import importlib
import logging
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

CLIENT_THREADS = 16


# -- servers ---------------------------------------------------------------------------------


@contextmanager
def serve_werkzeug(app: Any, threads: int = 0) -> Iterator[str]:
    """Serve app with werkzeug's threaded server (a thread per request; `threads` unused)."""
    from werkzeug.serving import WSGIRequestHandler, make_server

    class QuietHandler(WSGIRequestHandler):
        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            pass

    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="werkzeug-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10.0)


@contextmanager
def serve_waitress(app: Any, threads: int = CLIENT_THREADS) -> Iterator[str]:
    """Serve app with waitress (a pool of `threads` worker threads) on 127.0.0.1."""
    import waitress

    server: Any = waitress.create_server(
        app, host="127.0.0.1", port=0, threads=threads, asyncore_loop_timeout=0.2
    )
    thread = threading.Thread(target=server.run, name="waitress-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        _stop_waitress(server)
        thread.join(10.0)


def _stop_waitress(server: Any) -> None:
    # waitress has no stop(): its loop ends when its socket map is empty. Stop the worker
    # threads, then have the loop's own thread close every channel, the listening socket
    # and the trigger (a thunk given to the trigger runs on the loop's thread).
    server.task_dispatcher.shutdown(timeout=5)

    def close_all() -> None:
        for dispatcher in list(server._map.values()):
            dispatcher.handle_close()

    server.trigger.pull_trigger(close_all)


# -- the client ------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: bytes
    seconds: float
    headers: Mapping[str, str] | None = None


def get(url: str, headers: Mapping[str, str] | None = None, timeout: float = 20.0) -> Reply:
    """GET url; an HTTP error status is returned, not raised."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
            return Reply(
                response.status, body, time.perf_counter() - started, dict(response.headers)
            )
    except urllib.error.HTTPError as exc:
        with exc:
            body = exc.read()
            return Reply(exc.code, body, time.perf_counter() - started, dict(exc.headers))


def fetch_all(
    urls: Sequence[str],
    threads: int = CLIENT_THREADS,
    headers: Callable[[int], Mapping[str, str]] | None = None,
) -> list[Reply]:
    """GET every URL from `threads` client threads at once; return the replies in order.

    headers(i), when given, gives the headers of the i-th request. All threads start
    together (a barrier), so the server sees `threads` requests in flight from the start.
    """
    parties = min(threads, len(urls))
    start = threading.Barrier(parties)

    def one(i: int) -> Reply:
        if i < parties:
            start.wait(10.0)
        return get(urls[i], headers(i) if headers else None)

    with ThreadPoolExecutor(threads, thread_name_prefix="http-client") as pool:
        return list(pool.map(one, range(len(urls))))


def run_clients(clients: int, seconds: float, step: Callable[[random.Random], None]) -> float:
    """Call ``step(rng)`` over and over from `clients` threads for `seconds`; return the time taken.

    All threads start together (a barrier) and the clock starts with them; thread i draws
    from its own ``random.Random(i)``. A step that raises ends its thread; once every thread
    has ended, the first such exception is raised here.
    """
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(i: int) -> None:
        rng = random.Random(i)
        start.wait()
        try:
            while time.perf_counter() < deadline[0]:
                step(rng)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=client, args=(i,), name=f"http-client-{i}") for i in range(clients)
    ]
    for t in threads:
        t.start()
    began = time.perf_counter()
    deadline[0] = began + seconds
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    return elapsed


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    """Return the q-quantile (0..1) of latencies, in milliseconds (nearest rank)."""
    ordered = sorted(seconds)
    index = min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))
    return ordered[index] * 1000


# -- the server's own counts -----------------------------------------------------------------


class DatabaseWatch:
    """The server's statistics of database `dbname`, read through an admin connection.

    The reading connection is on another database, so its own statements are not counted.
    A backend publishes its transaction count at the latest when it exits, so counts are
    read once the app's connections are closed: ``settled_queries()`` waits for that.
    """

    def __init__(self, admin_dsn: str, dbname: str) -> None:
        import psycopg

        self.dbname = dbname
        self._conn = psycopg.connect(admin_dsn, autocommit=True)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> DatabaseWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def backends(self, application_name: str | None = None) -> int:
        """Client connections open on the database now (of one application_name)."""
        sql = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
            " AND backend_type = 'client backend'"
        )
        params: list[Any] = [self.dbname]
        if application_name is not None:
            sql += " AND application_name = %s"
            params.append(application_name)
        row = self._conn.execute(sql, params).fetchone()
        assert row is not None
        return int(row[0])

    def wait_backends(self, at_most: int, timeout: float = 10.0, **kw: Any) -> int:
        """Wait until at most `at_most` connections are open; return how many are."""
        deadline = time.monotonic() + timeout
        while True:
            n = self.backends(**kw)
            if n <= at_most or time.monotonic() > deadline:
                return n
            time.sleep(0.02)  # polling: the server offers nothing to wait on

    def settled_queries(self, timeout: float = 10.0) -> int:
        """Return the statements run on the database so far, once no client is connected.

        That is ``xact_commit`` less ``sessions`` of ``pg_stat_database``: under
        autocommit each statement commits one transaction, and each new connection
        commits one more while it logs in.
        """
        left = self.wait_backends(0, timeout)
        if left:
            raise AssertionError(f"{left} connections still open on {self.dbname}")
        row = self._conn.execute(
            "SELECT xact_commit - sessions FROM pg_stat_database WHERE datname = %s",
            [self.dbname],
        ).fetchone()
        assert row is not None
        return int(row[0])


def served_statements(
    watch: DatabaseWatch,
    app: Any,
    urls: Sequence[str],
    close: Callable[[Any], None],
    warm: Callable[[Any], None] | None = None,
) -> tuple[int, list[Reply]]:
    """Serve `urls` (paths) from app under werkzeug; return the statements they cost, and replies.

    ``warm(app)``, run first, is not counted (an engine's first connection runs statements
    of its own); ``close(app)`` must close every connection of the app, since the server's
    counts are read once none is open. The app is closed in any case.
    """
    try:
        if warm is not None:
            warm(app)
        before = watch.settled_queries()
        with serve_werkzeug(app) as base:
            replies = fetch_all([base + u for u in urls])
    finally:
        close(app)
    return watch.settled_queries() - before, replies


# -- the database ----------------------------------------------------------------------------

# A table under row-level security, for the tenant tests: both tenants have notes numbered
# 1..20, and a policy shows a session only the rows of the tenant in app.tenant.
NOTES_SQL = """
CREATE TABLE notes (
    id serial PRIMARY KEY,
    tenant text NOT NULL,
    number int NOT NULL,
    body text NOT NULL,
    UNIQUE (tenant, number)
);
INSERT INTO notes (tenant, number, body)
    SELECT t, n, t || ' note ' || n
    FROM unnest(ARRAY['acme', 'globex']) AS t, generate_series(1, 20) AS n;
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY notes_of_tenant ON notes USING (tenant = current_setting('app.tenant', true));
"""

TENANTS = ("acme", "globex")


@dataclass
class ShopDatabase:
    """A scratch database with the demo's shop, the notes table and an app role."""

    admin_dsn: str  # the server's administrator, on its maintenance database
    owner_dsn: str  # the tables' owner (an administrator), on the shop database
    dsn: str  # the app's role: not a superuser, not the owner, so RLS applies to it
    dbname: str
    role: str


@contextmanager
def shop_database(admin_dsn: str, prefix: str) -> Iterator[ShopDatabase]:
    """Create a shop database and a login role that may only read it; drop both after."""
    import secrets

    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from batchsync.demo._server import scratch_database
    from batchsync.demo._shop import create_shop

    role = f"{prefix}_app_{secrets.token_hex(4)}"
    password = secrets.token_hex(8)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
    try:
        with scratch_database(admin_dsn, prefix) as owner_dsn:
            create_shop(owner_dsn)
            with psycopg.connect(owner_dsn, autocommit=True) as conn:
                conn.execute(NOTES_SQL)
                conn.execute(
                    sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(
                        sql.Identifier(role)
                    )
                )
            dbname = str(conninfo_to_dict(owner_dsn)["dbname"])
            dsn = make_conninfo(owner_dsn, user=role, password=password)
            yield ShopDatabase(admin_dsn, owner_dsn, dsn, dbname, role)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


# -- gunicorn ---------------------------------------------------------------------------------


class Gunicorn:
    """A gunicorn master serving `app` (a gunicorn app spec) on a free loopback port.

    ``base`` is the URL once started; ``workers()`` the pids of the workers booted so far
    (from gunicorn's log, which a thread drains so gunicorn never blocks on it).
    """

    def __init__(self, app: str, args: Sequence[str], env: Mapping[str, str]) -> None:
        import os
        import re
        import subprocess

        self._booted: list[int] = []
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", "127.0.0.1:0", *args, app],
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._listening = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)")
        self._booting = re.compile(r"Booting worker with pid: (\d+)")
        self.port = 0
        self._drainer = threading.Thread(target=self._drain, name="gunicorn-log", daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            with self._cond:
                self._lines.append(line.rstrip())
                if m := self._listening.search(line):
                    self.port = int(m.group(1))
                if m := self._booting.search(line):
                    self._booted.append(int(m.group(1)))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_workers(self, n: int, timeout: float = 30.0) -> list[int]:
        """Wait until `n` workers have booted in all; return their pids."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: len(self._booted) >= n or self._process.poll() is not None, timeout
            )
            if not ok or len(self._booted) < n or not self.port:
                raise AssertionError("gunicorn did not boot:\n" + "\n".join(self._lines[-30:]))
            return list(self._booted)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def stop(self) -> None:
        import signal

        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(15)
            except Exception:
                self._process.kill()
                self._process.wait(10)
        self._drainer.join(10)
        if self._process.stderr is not None:
            self._process.stderr.close()


@contextmanager
def serve_gunicorn(
    app: str, args: Sequence[str], env: Mapping[str, str], workers: int
) -> Iterator[Gunicorn]:
    """Start gunicorn, wait for its `workers`, yield it; stop it at the end."""
    server = Gunicorn(app, args, env)
    try:
        server.wait_workers(workers)
        yield server
    finally:
        server.stop()


# -- a server in its own process -------------------------------------------------------------


def _load(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    obj = getattr(importlib.import_module(module), attr or "app")
    # A factory (create_app) is called; a WSGI callable (app, application) is served.
    if isinstance(obj, type) or getattr(obj, "__name__", "").startswith(("create", "make")):
        return obj()
    return obj


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a WSGI app on a free loopback port.")
    parser.add_argument("app", help="module:attribute, a WSGI app or a factory returning one")
    parser.add_argument("--server", choices=["werkzeug", "waitress"], default="waitress")
    parser.add_argument("--threads", type=int, default=CLIENT_THREADS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("waitress").setLevel(logging.ERROR)  # queue depth notes under load
    app = _load(args.app)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    serve = serve_werkzeug if args.server == "werkzeug" else serve_waitress
    with serve(app, args.threads) as url:
        print(f"listening on {url.rsplit(':', 1)[1]}", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
