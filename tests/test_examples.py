"""The stand-alone example runs and shows the cure: far fewer queries, the same pages."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.pg_fixtures import wait_gone

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "n_plus_one.py"


def test_n_plus_one_example() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr  # it asserts the pages are identical itself
    naive = int(re.search(r"naive: +(\d+) queries", proc.stdout).group(1))  # type: ignore[union-attr]
    batched = re.search(r"batched: (\d+) queries for (\d+) loads", proc.stdout)
    assert batched is not None, proc.stdout
    assert naive == 320
    assert int(batched.group(2)) == 320
    assert int(batched.group(1)) <= naive / 10


# -- the web examples as a newcomer starts them: no DSN, --create twice, a bad server --------

ROOT = EXAMPLE.parent.parent
FLASK_SHOP = ROOT / "examples" / "flask_shop.py"
DJANGO_SHOP = ROOT / "examples" / "django_shop"


def _serve_then_stop(
    command: list[str],
    env: dict[str, str],
    cwd: Path,
    ready: str,
    tmp_path: Path,
    codes: tuple[int, ...] = (128 + signal.SIGTERM,),
) -> tuple[list[dict[str, Any]], str, list[int]]:
    """Start an example, GET /page/0/batched once it prints `ready` and its URL, SIGTERM it.

    Return (the page, everything it wrote, the pids of the servers it started under
    `tmp_path`), after checking it exited with one of `codes`, without a traceback.
    """
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if ready in line:
                break
        else:
            raise AssertionError("".join(seen))
        base = re.search(r"http://127\.0\.0\.1:\d+", seen[-1]).group(0)  # type: ignore[union-attr]
        pids = [int(p.read_text().split()[0]) for p in tmp_path.rglob("postmaster.pid")]
        with urllib.request.urlopen(f"{base}/page/0/batched", timeout=30) as response:
            page = json.loads(response.read())
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        seen.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # reaps it and closes its pipe, whatever happened
    out = "".join(seen)
    assert proc.returncode in codes, out
    assert "Traceback" not in out, out
    return page, out, pids


def _assert_stopped(pids: list[int], tmp_path: Path) -> None:
    assert wait_gone(pids), f"servers still running: {pids}"
    assert not list(tmp_path.glob("batchsync-*")), list(tmp_path.iterdir())


def _env_without_dsn(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))
    for name in ("BATCHSYNC_PG_DSN", "DJANGO_SHOP_DSN"):
        env.pop(name, None)
    return env


@pytest.mark.pg
@pytest.mark.web
@pytest.mark.timeout(120)
def test_flask_shop_without_a_dsn_serves_a_private_server_and_stops_it(
    server_tmp: Path,
) -> None:
    pytest.importorskip("flask")
    tmp_path = server_tmp
    page, out, pids = _serve_then_stop(
        [sys.executable, str(FLASK_SHOP), "--port", "0"],
        _env_without_dsn(tmp_path), ROOT, "serving on", tmp_path,
    )
    assert "no DSN given: serving a private PostgreSQL" in out
    assert len(page) == 50 and page[0]["id"] == 1
    assert len(pids) == 1
    _assert_stopped(pids, tmp_path)


@pytest.mark.pg
@pytest.mark.web
@pytest.mark.timeout(120)
def test_django_shop_under_waitress_without_a_dsn(server_tmp: Path) -> None:
    tmp_path = server_tmp
    pytest.importorskip("django")
    pytest.importorskip("waitress")
    waitress = Path(sys.executable).with_name("waitress-serve")
    page, out, pids = _serve_then_stop(
        [str(waitress), "--threads", "4", "--listen", "127.0.0.1:0",
         "shopsite.wsgi:application"],
        _env_without_dsn(tmp_path), DJANGO_SHOP, "Serving on", tmp_path,
        codes=(0, 128 + signal.SIGTERM),  # waitress ends its loop on the SystemExit cleanly
    )
    assert "no DSN given: serving a private PostgreSQL" in out
    assert len(page) == 50 and page[0]["id"] == 1
    _assert_stopped(pids, tmp_path)


@pytest.mark.pg
@pytest.mark.web
@pytest.mark.timeout(120)
def test_flask_shop_create_is_idempotent(pg_admin_dsn: str, tmp_path: Path) -> None:
    pytest.importorskip("flask")
    from batchsync.demo import _server

    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    with _server.scratch_database(pg_admin_dsn, "batchsync_example") as dsn:
        command = [sys.executable, str(FLASK_SHOP), "--dsn", dsn, "--create", "--port", "0"]
        first, out1, _ = _serve_then_stop(command, env, ROOT, "serving on", tmp_path)
        second, out2, _ = _serve_then_stop(command, env, ROOT, "serving on", tmp_path)
    assert "created: 500 customers, 1570 orders, 3947 order items" in out1
    assert "kept the shop already there: 500 customers" in out2
    assert first == second


@pytest.mark.pg
def test_example_failures_are_one_line(pg_admin_dsn: str) -> None:
    pytest.importorskip("flask")
    from batchsync.demo import _server

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, str(FLASK_SHOP), *args], capture_output=True, text=True,
            timeout=60, check=False, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        assert done.returncode == 1, done
        assert done.stderr.count("\n") == 1, done.stderr
        return done.stderr

    assert run("--dsn", "postgresql://nobody@127.0.0.1:1/x").startswith(
        "flask_shop: cannot use the database: connection failed: connection to server at"
    )
    assert run("--dsn", "host=x port") .startswith("flask_shop: the DSN is not a valid")
    with _server.scratch_database(pg_admin_dsn, "batchsync_example") as empty:
        assert run("--dsn", empty) == (
            "flask_shop: the database has no shop tables: start once with --create"
            " (or manage.py create_shop)\n"
        )
