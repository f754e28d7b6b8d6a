"""Where the example apps (examples/flask_*.py, examples/django_shop) get their shop database.

Given a DSN (``--dsn``, ``$BATCHSYNC_PG_DSN``, or the Django example's ``$DJANGO_SHOP_DSN``),
they use it: the connection is checked once at start (with ``connect_timeout``, unless the
DSN sets its own) and ``--create`` fills the shop there unless it is there already. Given
none, they start a private PostgreSQL, as ``python -m batchsync.demo`` does, fill a fresh
shop in it, and stop it when the process ends (also on SIGTERM and Ctrl-C). Every failure
is one line: `ShopUnavailable`.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from types import FrameType
from typing import Any

import psycopg

from . import _server, _shop, _signals

__all__ = ["ShopUnavailable", "process_shop_dsn", "serve_example", "shop_database"]


class ShopUnavailable(RuntimeError):
    """No shop database to serve: the message says why, on one line."""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def shop_database(
    dsn: str | None,
    *,
    create: bool = False,
    require_shop: bool = True,
    say: Callable[[str], None] = _say,
) -> Iterator[str]:
    """Yield the DSN of a database that holds the demo's shop.

    `dsn` (else ``$BATCHSYNC_PG_DSN``): checked, and with `create` filled unless the shop
    is there (idempotent); without `create` a database with no shop is refused, unless
    not `require_shop` (Django's settings, which ``manage.py create_shop`` loads too). No DSN
    at all: a private server with a fresh shop, stopped when the block ends. Raise
    ShopUnavailable (one line) when there is no usable database.
    """
    given = dsn or os.environ.get(_server.DSN_ENV)
    if given:
        yield _checked(given, create, require_shop, say)
        return
    with ExitStack() as stack:
        try:
            admin = stack.enter_context(_server.server())
            db = stack.enter_context(_server.scratch_database(admin, "shop"))
            counts = _shop.create_shop(db)
        except (_server.NoServer, psycopg.Error) as exc:
            raise ShopUnavailable(
                f"no DSN given (--dsn or ${_server.DSN_ENV}) and no private PostgreSQL:"
                f" {_server.one_line(exc)}"
            ) from exc
        say(
            f"no DSN given: serving a private PostgreSQL ({_server.embedded_kind()}) with a"
            f" fresh shop ({_counts(counts)}); it is stopped when this process ends"
        )
        yield db


def _checked(dsn: str, create: bool, require_shop: bool, say: Callable[[str], None]) -> str:
    wrong = _server.check_dsn(dsn)
    if wrong:
        raise ShopUnavailable(f"the DSN is {wrong}")
    dsn = _server.with_connect_timeout(dsn)
    try:
        if create:
            counts, created = _shop.ensure_shop(dsn)
            say(f"{'created' if created else 'kept the shop already there'}: {_counts(counts)}")
        else:
            with psycopg.connect(dsn, autocommit=True) as conn:
                row = conn.execute("SELECT to_regclass('customers') IS NOT NULL").fetchone()
            if require_shop and not (row and row[0]):
                raise ShopUnavailable(
                    "the database has no shop tables: start once with --create"
                    " (or manage.py create_shop)"
                )
    except ValueError as exc:
        raise ShopUnavailable(str(exc)) from exc
    except psycopg.Error as exc:
        raise ShopUnavailable(f"cannot use the database: {_server.one_line(exc)}") from exc
    return dsn


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {table.replace('_', ' ')}" for table, n in counts.items())


_process_lock = threading.Lock()


def process_shop_dsn(dsn: str | None, *, require_shop: bool = False) -> str:
    """Return the DSN of a shop database for the rest of this process (Django's settings).

    As `shop_database`, entered once per process and left at interpreter exit. When it
    started a private server, SIGTERM (waitress-serve, ``docker stop``) is made to exit
    through the exit handlers too, so the server is stopped rather than orphaned.
    """
    with _process_lock:
        stack = ExitStack()
        try:
            found = stack.enter_context(shop_database(dsn, require_shop=require_shop))
        except BaseException:
            stack.close()
            raise
        atexit.register(stack.close)
    started_server = not (dsn or os.environ.get(_server.DSN_ENV))
    if (
        started_server
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return found


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the exit handlers must run to their end
    raise SystemExit(128 + signum)


def serve_example(
    name: str,
    dsn: str | None,
    create: bool,
    port: int,
    create_app: Callable[[str], Any],
    close_app: Callable[[Any], None],
) -> None:
    """Serve the WSGI app `create_app(dsn)` of example `name` with werkzeug's threaded server.

    The database comes from `shop_database(dsn, create=create)`. A signal (Ctrl-C, SIGTERM)
    closes the server, the app (`close_app`) and the database it started, then exits with
    128 + the signal; no usable database exits with one line naming the example.
    """
    from werkzeug.serving import make_server

    try:
        with _signals.stop_on_signals(), shop_database(dsn, create=create) as found:
            app = create_app(found)
            server = make_server("127.0.0.1", port, app, threaded=True)
            print(f"serving on http://127.0.0.1:{server.server_port}/page/0/batched", flush=True)
            try:
                server.serve_forever()
            finally:
                server.server_close()
                close_app(app)
    except ShopUnavailable as exc:
        raise SystemExit(f"{name}: {exc}") from None
    except _signals.Stopped as exc:
        raise SystemExit(exc.exit_code) from None
