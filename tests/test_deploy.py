"""The Flask example deployed: gunicorn --preload with forked workers, through PgBouncer.

gunicorn (``-w 2 --threads 4 --preload``) serves ``examples/flask_shop.py`` (with an
``X-Worker`` header, tests/deploy_app.py) through a real PgBouncer in transaction mode, the
pool opened in each worker. Every body is checked against the truth: the same page served
by the example in this process, on a direct connection, one request at a time.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("gunicorn")
pytest.importorskip("flask")
psycopg = pytest.importorskip("psycopg")

from batchsync.demo._server import scratch_database  # noqa: E402
from batchsync.demo._shop import create_shop  # noqa: E402
from tests.pg_fixtures import Pooler  # noqa: E402
from tests.webutil import Gunicorn, Reply, get, serve_gunicorn  # noqa: E402

pytestmark = [pytest.mark.pg, pytest.mark.web]

ROOT = Path(__file__).resolve().parent.parent
PAGES = 10
URLS = [f"/page/{n}/{mode}" for n in range(PAGES) for mode in ("naive", "batched")]
CLIENTS = 16


@dataclass
class Shop:
    direct: str
    pooled: str
    truth: dict[str, bytes] = field(default_factory=dict)


@pytest.fixture(scope="module")
def shop(pgbouncer: Pooler) -> Iterator[Shop]:
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    import flask_shop

    with scratch_database(pgbouncer.direct, "batchsync_deploy") as direct:
        create_shop(direct)
        shop = Shop(direct, pgbouncer.through(direct))
        app = flask_shop.create_app(direct, pool_size=1)
        try:
            client = app.test_client()
            for url in URLS:
                naive = url.replace("batched", "naive")
                shop.truth[url] = client.get(naive).data
        finally:
            flask_shop.close_app(app)
        yield shop


@pytest.fixture
def gunicorn(shop: Shop) -> Iterator[Gunicorn]:
    env = {
        "BATCHSYNC_PG_DSN": shop.pooled,
        "SHOP_PREPARE_THRESHOLD": "none",
        "SHOP_POOL_SIZE": "4",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "examples")]),
    }
    args = ["--preload", "-w", "2", "--threads", "4", "--graceful-timeout", "5"]
    with serve_gunicorn("tests.deploy_app:create_app()", args, env, workers=2) as server:
        yield server


@dataclass
class Outcome:
    replies: list[tuple[str, Reply]] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)

    def wrong(self, truth: dict[str, bytes]) -> list[tuple[str, int, bytes]]:
        """The replies that are not the truth: (url, status, the start of the body)."""
        return [
            (u, r.status, r.body[:500])
            for u, r in self.replies
            if r.status != 200 or r.body != truth[u]
        ]

    def check(self, truth: dict[str, bytes], log: list[str]) -> None:
        """Assert that no reply is a wrong page, and that error replies are rare.

        A 200 with another page's body fails at once: that is the safety property. A 500 is
        a known, unexplained defect (issue 10): about one CI run in three, under a loaded
        machine, one reply in a few hundred is a 500 from the app, naive or batched; until
        its cause is found the test allows 1 % of them and shows them with the server's log.
        """
        wrong = self.wrong(truth)
        shown = "\n".join(log[-60:])
        assert [w for w in wrong if w[1] == 200] == [], shown
        errors = [w for w in wrong if w[1] != 200]
        assert len(errors) <= len(self.replies) // 100, (errors[:3], shown)

    def workers(self) -> set[int]:
        # Error replies carry the header too (tests/deploy_app.py adds it to every response
        # Flask makes); one without it came from gunicorn itself, and is named here.
        served = {(r.headers or {}).get("X-Worker") for _, r in self.replies}
        assert None not in served, [
            (u, r.status, r.body[:500])
            for u, r in self.replies
            if "X-Worker" not in (r.headers or {})
        ][:3]
        return {int(pid) for pid in served if pid is not None}


def load(
    base: str, stop: threading.Event, outcome: Outcome, seed: int, until: int | None = None
) -> None:
    """Send requests from CLIENTS threads until `stop` is set (or `until` replies arrived)."""
    lock = threading.Lock()

    def client(i: int) -> None:
        n = i
        while not stop.is_set():
            url = URLS[(n * 7 + seed) % len(URLS)]
            n += CLIENTS
            try:
                reply = get(base + url, timeout=15)
            except OSError as exc:  # connection reset by a killed worker: counted, not hidden
                with lock:
                    outcome.failures.append(exc)
                continue
            with lock:
                outcome.replies.append((url, reply))
                if until is not None and len(outcome.replies) >= until:
                    stop.set()

    with ThreadPoolExecutor(CLIENTS) as pool:
        for _ in pool.map(client, range(CLIENTS)):
            pass


def run_until(base: str, replies: int, deadline: float, seed: int = 0) -> Outcome:
    """Load the server until `replies` replies came back, or `deadline` seconds passed.

    A count, not a duration: on a busy machine the same check just takes longer.
    """
    outcome, stop = Outcome(), threading.Event()
    timer = threading.Timer(deadline, stop.set)
    timer.start()
    try:
        load(base, stop, outcome, seed, until=replies)
    finally:
        timer.cancel()
    return outcome


@pytest.mark.timeout(120)
def test_preloaded_workers_through_pgbouncer_serve_only_right_pages(
    shop: Shop, gunicorn: Gunicorn
) -> None:
    booted = gunicorn.wait_workers(2)
    outcome = run_until(gunicorn.base, 300, deadline=60.0)
    assert outcome.failures == []
    outcome.check(shop.truth, gunicorn.log())
    assert len(outcome.replies) >= 300  # else the deadline ran out first
    assert outcome.workers() == set(booted)  # each worker served
    log = gunicorn.log()
    assert not [line for line in log if "Traceback" in line or "ERROR" in line], "\n".join(
        log[-80:]
    )


@pytest.mark.timing
@pytest.mark.timeout(120)
def test_a_worker_killed_with_sigkill_is_replaced_without_hangs(
    shop: Shop, gunicorn: Gunicorn
) -> None:
    first = gunicorn.wait_workers(2)
    outcome, stop = Outcome(), threading.Event()
    clients = threading.Thread(target=load, args=(gunicorn.base, stop, outcome, 3))
    clients.start()
    try:
        deadline = time.monotonic() + 20
        while len(outcome.replies) < 50 and time.monotonic() < deadline:
            time.sleep(0.01)  # polling the clients' progress; nothing to wait on
        victim = first[0]
        os.kill(victim, signal.SIGKILL)
        replacement = gunicorn.wait_workers(3)[2]
        # The replacement is a fresh fork of the master: it opens its own pool and serves.
        while replacement not in outcome.workers() and time.monotonic() < deadline + 20:
            time.sleep(0.01)
    finally:
        stop.set()
        clients.join(30)
    assert not clients.is_alive(), "a client hung"
    assert replacement in outcome.workers()
    outcome.check(shop.truth, gunicorn.log())
    # Only requests in flight on the killed worker may fail, as a broken connection.
    assert len(outcome.failures) <= CLIENTS, outcome.failures[:3]
    assert all(isinstance(f, (ConnectionError, OSError)) for f in outcome.failures)
    assert max(r.seconds for _, r in outcome.replies) < 15
