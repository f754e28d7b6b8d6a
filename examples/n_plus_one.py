"""The N+1 problem and its cure, with the standard library only (sqlite3 in memory).

    python examples/n_plus_one.py

16 threads each render a "page": 10 customers, then each customer's orders. Naively that
is one query per customer and per list of orders; with two Batchers every thread asks for
one key at a time and batchsync turns the keys of all threads into a few bulk queries.
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

from batchsync import Batcher

THREADS = 16

db = sqlite3.connect(":memory:", check_same_thread=False)
db_lock = threading.Lock()  # one sqlite connection, shared by the threads
queries = 0


def query(sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    global queries
    with db_lock:
        queries += 1
        return db.execute(sql, params).fetchall()


def setup() -> None:
    db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, total INT)")
    db.executemany("INSERT INTO customers VALUES (?, ?)", [(i, f"c{i}") for i in range(100)])
    db.executemany(
        "INSERT INTO orders VALUES (?, ?, ?)", [(i, i % 100, i * 3 % 97) for i in range(400)]
    )


def fetch_customers(ids: list[int]) -> dict[int, str]:
    marks = ",".join("?" * len(ids))
    return dict(query(f"SELECT id, name FROM customers WHERE id IN ({marks})", ids))


def fetch_orders(customer_ids: list[int]) -> list[list[int]]:
    marks = ",".join("?" * len(customer_ids))
    rows = query(
        f"SELECT customer_id, total FROM orders WHERE customer_id IN ({marks}) ORDER BY id",
        customer_ids,
    )
    by_customer: dict[int, list[int]] = {c: [] for c in customer_ids}
    for customer_id, total in rows:
        by_customer[customer_id].append(total)
    return [by_customer[c] for c in customer_ids]  # one item per key, in order


def page_naive(first: int) -> list[tuple[str, int]]:
    out = []
    for cid in range(first, first + 10):
        name = fetch_customers([cid])[cid]
        out.append((name, sum(fetch_orders([cid])[0])))
    return out


def page_batched(first: int, customers: Batcher[int, str], orders: Batcher[int, list[int]]):
    # Written like the naive loop, one key at a time: load() queues, result() waits.
    names = [customers.load(cid) for cid in range(first, first + 10)]
    totals = [orders.load(cid) for cid in range(first, first + 10)]
    return [(n.result(), sum(t.result() or [])) for n, t in zip(names, totals, strict=True)]


def run(render: Any) -> tuple[int, list[Any]]:
    global queries
    queries = 0
    pages: list[Any] = [None] * THREADS
    barrier = threading.Barrier(THREADS)

    def worker(i: int) -> None:
        barrier.wait()
        pages[i] = render(i * 5)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return queries, pages


def main() -> None:
    setup()
    naive_queries, naive_pages = run(page_naive)
    with Batcher(fetch_customers, name="customers") as customers, Batcher(
        fetch_orders, name="orders"
    ) as orders:
        batched_queries, batched_pages = run(lambda first: page_batched(first, customers, orders))
        loads = customers.stats().loads + orders.stats().loads
        calls = customers.stats().batches + orders.stats().batches
    assert batched_pages == naive_pages, "the two ways must render the same pages"
    print(f"{THREADS} threads, 10 customers and their orders per page")
    print(f"naive:   {naive_queries} queries")
    print(f"batched: {batched_queries} queries for {loads} loads ({calls} batch calls)")


if __name__ == "__main__":
    main()
