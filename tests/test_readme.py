"""Every code block of README.md runs as copied, or says, right above it, why it is not run here.

A block is run unless the line above it is ``<!-- readme-test: skip (reason) -->``. A
``<!-- readme-test: run (name) -->`` above a block runs it after the stand-in `name` of
STANDINS: the names it uses but does not define (``db``, ``pool``, a table), made real here,
on the test database where the block names one. Python blocks run in a child interpreter
of their own (a block may instrument globals, as ``otel.instrument()`` does); SQL blocks on a
scratch database. Only python and sql blocks can be run; a bash block, an output listing or
a diagram must carry a skip with its reason, and a marker that is not directly above a block,
an unknown stand-in or one no block uses fails the test, so no marker hides anything silently.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

MARKER = re.compile(r"^\s*<!-- readme-test: (?P<verb>skip|run) \((?P<arg>.*)\) -->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>\w*)\s*$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    source: str
    verb: str | None  # "skip", "run" or None (no marker)
    arg: str

    @property
    def id(self) -> str:
        return f"README.md:{self.line}:{self.lang or 'text'}"


def blocks(text: str) -> list[Block]:
    """Every fenced block of `text`, with the marker above it; markers checked as they go."""
    lines = text.split("\n")
    found: list[Block] = []
    pending: tuple[int, str, str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if "readme-test" in line:
            marker = MARKER.match(line)
            assert marker, f"README.md:{i + 1}: malformed readme-test marker: {line!r}"
            assert pending is None, f"README.md:{pending[0]}: marker not directly above a block"
            pending = (i + 1, marker["verb"], marker["arg"].strip())
            i += 1
            continue
        fence = FENCE.match(line)
        if fence is None:
            if pending is not None:
                raise AssertionError(f"README.md:{pending[0]}: marker not directly above a block")
            i += 1
            continue
        end = i + 1
        while not re.match(r"^\s*```\s*$", lines[end]):
            end += 1
            assert end < len(lines), f"README.md:{i + 1}: unclosed code block"
        source = textwrap.dedent("\n".join(lines[i + 1 : end]))
        verb, arg = (pending[1], pending[2]) if pending else (None, "")
        found.append(Block(i + 1, fence["lang"], source + "\n", verb, arg))
        pending = None
        i = end + 1
    assert pending is None, f"README.md:{pending[0]}: marker not directly above a block"
    return found


# -- stand-ins: what a block uses without defining it ----------------------------------------

STANDINS: dict[str, str] = {
    # The Usage and Cache blocks: a users table in memory, with the query the block writes.
    "users": '''
from dataclasses import dataclass

@dataclass
class User:
    id: int
    name: str

@dataclass
class Order:
    id: int
    customer_id: int

class _Db:
    def query(self, sql, params):
        assert sql == "SELECT * FROM users WHERE id = ANY(%s)", sql
        return [User(i, f"user {i}") for i in params[0] if i < 100]

    def orders_of(self, customer_id):
        return [Order(customer_id * 10 + n, customer_id) for n in range(2)]

db = _Db()
user = User(7, "primed")

def fetch_users(ids):
    return {u.id: u for u in db.query("SELECT * FROM users WHERE id = ANY(%s)", [ids])}
''',
    # A whole level at a time: three Batchers over the shop's shape, counting their calls.
    "levels": '''
from types import SimpleNamespace
from batchsync import Batcher

customer_ids = [1, 2, 3]
customers_loader = Batcher(lambda ids: {i: SimpleNamespace(id=i) for i in ids})
orders_loader = Batcher(lambda ids: [[SimpleNamespace(id=i * 10 + n) for n in range(2)]
                                     for i in ids])
items_loader = Batcher(lambda ids: [["item"] for _ in ids])
import atexit
atexit.register(lambda: print("calls", [b.stats().batches for b in
                                        (customers_loader, orders_loader, items_loader)]))
''',
    # The block's "dbname=shop" pool is pointed at the test's shop database.
    "shop": '''
import os
import psycopg_pool

class _ShopPool(psycopg_pool.ConnectionPool):
    def __init__(self, conninfo="", *args, **kwargs):
        assert conninfo == "dbname=shop", conninfo
        super().__init__(os.environ["README_SHOP_DSN"], *args, **kwargs)

psycopg_pool.ConnectionPool = _ShopPool
''',
    # The composite-key block: a stock table and a pool on the test database.
    "stock": '''
import os
import psycopg
from psycopg_pool import ConnectionPool
from batchsync import pg

with psycopg.connect(os.environ["README_SHOP_DSN"], autocommit=True) as _conn:
    _conn.execute("CREATE TABLE IF NOT EXISTS stock (tenant_id int, sku text, count int,"
                  " PRIMARY KEY (tenant_id, sku))")
    _conn.execute("INSERT INTO stock VALUES (7, 'A-100', 3) ON CONFLICT DO NOTHING")
pool = ConnectionPool(os.environ["README_SHOP_DSN"], kwargs={"autocommit": True}, open=True)
''',
    # SQLAlchemy's URL of the test's shop database.
    "sqlalchemy": '''
import os
from sqlalchemy.engine import URL
from psycopg.conninfo import conninfo_to_dict

_params = {k: str(v) for k, v in conninfo_to_dict(os.environ["README_SHOP_DSN"]).items()}
os.environ["DATABASE_URL"] = URL.create("postgresql+psycopg", query=_params).render_as_string(
    hide_password=False)
''',
    # psycopg's URL of the test's shop database.
    "flask": '''
import os
os.environ["DATABASE_URL"] = os.environ["README_SHOP_DSN"]
''',
    # The row-level security block: the notes table it names.
    "notes": "CREATE TABLE notes (number int, tenant text, body text);",
}

# What each run block must print or leave, beyond running without an error.
CHECKS: dict[str, str] = {
    "levels": "calls [1, 1, 1]",
}


@pytest.fixture(scope="module")
def shop(pg_admin_dsn: str) -> Iterator[str]:
    from batchsync.demo import _server, _shop

    with _server.scratch_database(pg_admin_dsn, "batchsync_readme") as dsn:
        _shop.create_shop(dsn)
        yield dsn


ALL = blocks(README.read_text())


def test_every_block_is_run_or_skipped_for_a_stated_reason() -> None:
    used = set()
    for block in ALL:
        if block.verb == "skip":
            assert len(block.arg) >= 10, f"{block.id}: a skip needs its reason"
            for named in re.findall(r"tests/\w+\.py|examples/\w+|\.ci/\w+\.py", block.arg):
                assert (ROOT / named).exists(), f"{block.id}: the skip names {named}, not found"
            continue
        assert block.lang in ("python", "sql"), (
            f"{block.id}: a {block.lang or 'plain'} block cannot be run here: mark it"
            " <!-- readme-test: skip (reason) -->"
        )
        if block.verb == "run":
            assert block.arg in STANDINS, f"{block.id}: no stand-in {block.arg!r}"
            used.add(block.arg)
    assert used == set(STANDINS), f"stand-ins no block uses: {set(STANDINS) - used}"
    assert sum(b.verb != "skip" for b in ALL) >= 10  # the extraction found the blocks


def test_a_marker_cannot_hide_what_is_not_a_block() -> None:
    with pytest.raises(AssertionError, match="marker not directly above a block"):
        blocks("<!-- readme-test: skip (a reason long enough) -->\ntext\n```python\n1/0\n```\n")
    with pytest.raises(AssertionError, match="malformed readme-test marker"):
        blocks("<!-- readme-test: skip -->\n```python\n1/0\n```\n")
    with pytest.raises(AssertionError, match="marker not directly above a block"):
        blocks("<!-- readme-test: run (users) -->\n")


RUN = [b for b in ALL if b.verb != "skip" and b.lang in ("python", "sql")]


@pytest.mark.pg
@pytest.mark.timeout(120)
@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_block_runs_as_copied(block: Block, shop: str, pg_admin_dsn: str) -> None:
    standin = STANDINS.get(block.arg, "") if block.verb == "run" else ""
    if block.lang == "sql":
        import psycopg

        from batchsync.demo import _server

        with (
            _server.scratch_database(pg_admin_dsn, "batchsync_readme_sql") as dsn,
            psycopg.connect(dsn, autocommit=True) as conn,
        ):
            if standin:
                conn.execute(standin)
            conn.execute(block.source)
        return
    program = standin + "\n" + block.source
    done = subprocess.run(
        [sys.executable, "-c", program],
        cwd=ROOT,
        env=dict(os.environ, README_SHOP_DSN=shop, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, f"{block.id} failed:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr
    if block.arg in CHECKS:
        assert CHECKS[block.arg] in done.stdout, done.stdout
