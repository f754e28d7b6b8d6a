"""The N+1 demo: ``python -m batchsync.demo`` (needs ``pip install -e '.[demo]'``).

It fills a small shop database on a real PostgreSQL (``--dsn``,
``$BATCHSYNC_PG_DSN`` or an embedded ``pgserver``) and serves a page of 50
customers with their orders and order items three ways: the naive N+1 loop,
batchsync loaders, and hand-written bulk queries. It prints the queries per
page counted by the server and the latency and throughput of each under load.
"""
