"""The N+1 demo on a real PostgreSQL: same page data, server-counted queries, its CLI."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg")
pytest.importorskip("psycopg_pool")

from psycopg_pool import ConnectionPool  # noqa: E402

from batchsync.demo import _cli, _measure, _server, _shop  # noqa: E402
from batchsync.demo._measure import QueryCounter  # noqa: E402
from tests.pg_fixtures import wait_gone  # noqa: E402

pytestmark = pytest.mark.pg


@pytest.fixture(scope="module")
def shop_dsn(pg_admin_dsn: str) -> Iterator[str]:
    with _server.scratch_database(pg_admin_dsn, "batchsync_shop") as dsn:
        _shop.create_shop(dsn)
        yield dsn


def test_modes_return_the_same_page_with_the_expected_query_counts(shop_dsn: str) -> None:
    ids = _shop.page_ids(3)
    with psycopg.connect(shop_dsn) as conn:
        row = conn.execute("SELECT count(*) FROM orders WHERE customer_id = ANY(%s)", [ids])
        orders = row.fetchone()[0]
    assert orders > 0
    counter = QueryCounter(shop_dsn)
    try:
        with ConnectionPool(
            shop_dsn, min_size=2, max_size=2, kwargs={"autocommit": True}, open=True
        ) as pool:
            shop = _shop.BatchedShop(pool)
            try:
                naive = _shop.naive_page(pool, ids)
                assert shop.page(ids) == naive
                assert _shop.bulk_page(pool, ids) == naive
                assert len(naive) == 50
                assert sum(len(c["orders"]) for c in naive) == orders
                assert counter.count(pool, lambda: _shop.naive_page(pool, ids)) == 1 + 50 + orders
                assert counter.count(pool, lambda: shop.page(ids)) == 3
                assert counter.count(pool, lambda: _shop.bulk_page(pool, ids)) == 3
                loaders = (shop.customers, shop.orders, shop.items)
                before = [b.stats().batches for b in loaders]
                shop.page(ids)
                # One batch call per level, as the server counted.
                assert [b.stats().batches - n for b, n in zip(loaders, before, strict=True)] == [
                    1,
                    1,
                    1,
                ]
            finally:
                shop.close()
    finally:
        counter.close()


def test_shop_is_the_same_for_the_same_seed(pg_admin_dsn: str, shop_dsn: str) -> None:
    with _server.scratch_database(pg_admin_dsn, "batchsync_shop") as other:
        counts = _shop.create_shop(other)
        query = "SELECT sum(hashtext(o::text)) FROM order_items o"
        with psycopg.connect(other) as a, psycopg.connect(shop_dsn) as b:
            assert a.execute(query).fetchone() == b.execute(query).fetchone()
    assert counts["customers"] == 500
    assert 1000 < counts["orders"] + counts["order_items"] < 10000


KEYS = {"queries_per_page", "single_page_ms", "requests_per_s", "p50_ms", "p99_ms"}


def test_json_output(pg_admin_dsn: str) -> None:
    env = dict(os.environ, BATCHSYNC_PG_DSN=pg_admin_dsn)
    done = subprocess.run(
        [sys.executable, "-m", "batchsync.demo", "--threads", "2", "--seconds", "0.3", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=50,
        check=True,
    )
    report = json.loads(done.stdout)
    assert set(report["modes"]) == {"naive", "batched", "bulk"}
    for figures in report["modes"].values():
        assert set(figures) >= KEYS
    assert report["modes"]["batched"]["queries_per_page"] == 3
    assert report["modes"]["bulk"]["queries_per_page"] == 3
    assert report["modes"]["naive"]["queries_per_page"] > 50
    assert report["identical_pages"] is True
    assert report["settings"]["threads"] == 2
    assert report["settings"]["rtt_simulated"] is False
    # stderr is a pipe here, not a terminal: no progress meter, no carriage returns.
    assert "\r" not in done.stderr and "pages" not in done.stderr


def test_rtt_and_plot(pg_admin_dsn: str, tmp_path: Path, capsys: Any) -> None:
    chart = tmp_path / "demo.png"
    args = ["--dsn", pg_admin_dsn, "--threads", "2", "--seconds", "0.2", "--rtt", "1"]
    assert _cli.main([*args, "--plot", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "SIMULATED" in out
    assert "identical page data" in out
    assert chart.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threads", "0"], "--threads must be >= 1"),
        (["--seconds", "0"], "--seconds must be a finite number > 0, not 0"),
        (["--seconds", "nan"], "--seconds must be a finite number > 0, not nan"),
        (["--seconds", "inf"], "--seconds must be a finite number > 0, not inf"),
        (["--rtt", "-1"], "--rtt must be a number of milliseconds from 0 to 1000, not -1"),
        (["--rtt", "nan"], "--rtt must be a number of milliseconds from 0 to 1000, not nan"),
        (["--rtt", "inf"], "--rtt must be a number of milliseconds from 0 to 1000, not inf"),
        (["--dsn", "host=x port"], '--dsn is not a valid PostgreSQL DSN (missing "="'),
        (["--plot", "/nonexistent-dir/demo.png"], "the directory /nonexistent-dir does not exist"),
        (["--plot", "demo.pnx"], "'.pnx' is not a chart format; use one of"),
        (["--plot", "demo"], "no extension is not a chart format"),
    ],
)
def test_bad_arguments_are_one_line_before_any_work(
    args: list[str], message: str, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No server is given or reachable: an argument check that came after any work would
    # fail on the connection instead.
    monkeypatch.setenv(_server.DSN_ENV, "postgresql://nobody@127.0.0.1:1/x")
    with pytest.raises(SystemExit) as exit_info:
        _cli.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert err.startswith("python -m batchsync.demo: error: ")


def test_a_plot_path_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "chart.png"
    folder.mkdir()
    assert _cli.check_plot_path(str(folder)) == f"--plot {folder}: is a directory"
    assert _cli.check_plot_path(str(tmp_path / "chart.svg")) is None


def test_plot_without_matplotlib_is_refused_before_any_work(
    capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # not installed
    monkeypatch.setenv(_server.DSN_ENV, "postgresql://nobody@127.0.0.1:1/x")
    with pytest.raises(SystemExit):
        _cli.main(["--plot", "demo.png"])
    assert "error: --plot needs matplotlib: pip install -e '.[demo]'" in capsys.readouterr().err


def test_an_unreachable_server_is_one_line(capsys: Any) -> None:
    # Port 1 on loopback: nothing listens there.
    assert _cli.main(["--dsn", "postgresql://nobody@127.0.0.1:1/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchsync demo: cannot use the database: connection failed")
    assert err.count("\n") == 1, err


@pytest.mark.timing
def test_a_server_that_never_answers_times_out(capsys: Any) -> None:
    # A real listening socket that accepts connections and never says a word.
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        dsn = f"postgresql://nobody@127.0.0.1:{port}/x?connect_timeout=2"
        started = time.monotonic()
        assert _cli.main(["--dsn", dsn]) == 2
        took = time.monotonic() - started
    assert took < 10
    err = capsys.readouterr().err
    assert err.startswith("batchsync demo: cannot use the database: connection timeout expired")


def test_connect_timeout_is_added_unless_the_dsn_sets_one() -> None:
    from psycopg.conninfo import conninfo_to_dict

    added = conninfo_to_dict(_server.with_connect_timeout("postgresql://u@h/db"))
    assert added["connect_timeout"] == str(_server.CONNECT_TIMEOUT)
    kept = conninfo_to_dict(_server.with_connect_timeout("postgresql://u@h/db?connect_timeout=3"))
    assert kept["connect_timeout"] == "3"  # the user's own setting wins


def test_a_role_without_createdb_is_one_line(pg_admin_dsn: str, capsys: Any) -> None:
    from psycopg.conninfo import make_conninfo

    role = f"batchsync_nocreatedb_{os.getpid()}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN NOCREATEDB PASSWORD 'pw'")
    try:
        dsn = make_conninfo(pg_admin_dsn, user=role, password="pw")
        assert _cli.main(["--dsn", dsn]) == 2
    finally:
        with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
            conn.execute(f"DROP ROLE {role}")
    err = capsys.readouterr().err
    assert err == (
        f"batchsync demo: the role '{role}' of the DSN cannot create databases: give a DSN of"
        f" a role with CREATEDB (ALTER ROLE {role} CREATEDB), or no DSN for a private server\n"
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_embedded_server_without_a_traceback(
    signum: int, server_tmp: Path
) -> None:
    """The demo on its own embedded server, its stderr a terminal (a pty): the meter shows;
    SIGTERM or SIGINT, sent once the load runs, stops the server it started and removes
    its directory, with one line and status 128 + the signal. (Python's default SIGTERM
    ends the process at once and leaves the server running.)"""
    _signal_the_demo(signum, server_tmp)


def _signal_the_demo(signum: int, tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop(_server.DSN_ENV, None)
    meter, terminal = pty.openpty()
    demo = subprocess.Popen(
        [sys.executable, "-m", "batchsync.demo", "--threads", "2", "--seconds", "60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
        env=env,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    os.close(terminal)
    try:
        seen = b""
        while b" pages" not in seen:  # the meter: the load phase runs
            try:
                chunk = os.read(meter, 4096)
            except OSError:  # EIO: the demo closed the terminal, it has ended
                chunk = b""
            assert chunk, seen.decode(errors="replace")
            seen += chunk
        assert b"\r" in seen
        pids = [int(p.read_text().split()[0]) for p in tmp_path.rglob("postmaster.pid")]
        assert len(pids) == 1, pids
        demo.send_signal(signum)
        demo.wait(60)
        seen += _read_all(meter)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        assert demo.stdout is not None
        demo.stdout.close()
        os.close(meter)
    assert demo.returncode == 128 + signum
    err = seen.decode(errors="replace")
    assert "Traceback" not in err, err
    name = signal.Signals(signum).name
    stopped = f"batchsync demo: stopped by {name}; everything it started is stopped"
    assert err.rstrip().endswith(stopped), err
    assert wait_gone(pids), f"the embedded server (pid {pids[0]}) still runs"
    assert not list(tmp_path.glob("batchsync-*")), list(tmp_path.iterdir())


def _read_all(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other end of the pty is closed
            return out
        if not chunk:
            return out
        out += chunk


# -- counted by pg_stat_statements, directly and through PgBouncer ------------------------------


@pytest.fixture(scope="module")
def stats_shop(pgbouncer: Any) -> Iterator[tuple[str, str]]:
    """A shop on the pg_stat_statements cluster: (direct DSN, DSN through PgBouncer)."""
    with _server.scratch_database(pgbouncer.direct, "batchsync_shop") as dsn:
        _shop.create_shop(dsn)
        yield dsn, pgbouncer.through(dsn)


def check_counts(counter: QueryCounter, dsn: str, ids: list[int], naive: int) -> None:
    kwargs = {"autocommit": True, "prepare_threshold": None}
    with ConnectionPool(dsn, min_size=4, max_size=4, kwargs=kwargs, open=True) as pool:
        shop = _shop.BatchedShop(pool)
        try:
            assert counter.count(pool, lambda: shop.page(ids), tries=1) == 3
            assert counter.count(pool, lambda: _shop.bulk_page(pool, ids), tries=1) == 3
            assert counter.count(pool, lambda: _shop.naive_page(pool, ids), tries=1) == naive
            # 4 threads at once, 5 naive pages each: every statement counted once.
            start = threading.Barrier(4)

            def pages() -> None:
                start.wait()
                for _ in range(5):
                    _shop.naive_page(pool, ids)

            with counter.counting(pool) as counted:
                threads = [threading.Thread(target=pages) for _ in range(4)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            assert counted == [20 * naive]
        finally:
            shop.close()


def test_pg_stat_statements_counts_right_directly_and_through_pgbouncer(
    stats_shop: tuple[str, str],
) -> None:
    direct, pooled = stats_shop
    ids = _shop.page_ids(3)
    with psycopg.connect(direct) as conn:
        orders = conn.execute(
            "SELECT count(*) FROM orders WHERE customer_id = ANY(%s)", [ids]
        ).fetchone()[0]
    counter = QueryCounter(direct, pooled=True)
    try:
        assert counter.source == "pg_stat_statements"
        check_counts(counter, direct, ids, 1 + 50 + orders)
        check_counts(counter, pooled, ids, 1 + 50 + orders)
    finally:
        counter.close()


def test_counting_through_a_pooler_without_pg_stat_statements_is_refused(pg_dsn: str) -> None:
    # The embedded server has no pg_stat_statements: the xact_commit count would be wrong.
    with pytest.raises(_measure.CannotCount, match="through a pooler needs pg_stat_statements"):
        QueryCounter(pg_dsn, pooled=True)


def test_an_intermediary_is_told_from_a_direct_connection(
    pgbouncer: Any, pg_admin_dsn: str
) -> None:
    assert _server.intermediary(pgbouncer.direct) is None
    assert _server.intermediary(pg_admin_dsn) is None  # the embedded server's unix socket
    found = _server.intermediary(pgbouncer.pooled)
    assert found is not None and found.startswith("a pooler or proxy (the DSN names port")


@pytest.mark.timeout(120)
def test_the_demo_through_pgbouncer(pgbouncer: Any, capsys: Any) -> None:
    args = ["--dsn", pgbouncer.direct, "--pgbouncer", "--threads", "4", "--seconds", "0.3"]
    assert _cli.main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    s = report["settings"]
    assert s["pooler"] == "PgBouncer in transaction mode, started by the demo"
    assert s["query_count_source"] == "pg_stat_statements.calls"
    assert report["identical_pages"] is True
    assert report["modes"]["batched"]["queries_per_page"] == 3
    assert report["modes"]["bulk"]["queries_per_page"] == 3
    assert report["modes"]["naive"]["queries_per_page"] > 50
    text = _cli.format_report(report)
    assert "network: no delay added; through PgBouncer in transaction mode" in text
    assert "direct connection" not in text


@pytest.mark.timeout(120)
def test_a_dsn_through_a_pooler_is_named_in_the_network_line(pgbouncer: Any, capsys: Any) -> None:
    args = ["--dsn", pgbouncer.pooled, "--threads", "2", "--seconds", "0.2", "--json"]
    assert _cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["pooler"].startswith("a pooler or proxy (the DSN names port")
    assert report["identical_pages"] is True
    text = _cli.format_report(report)
    assert "network: no delay added; through a pooler or proxy" in text
    assert "direct connection" not in text
