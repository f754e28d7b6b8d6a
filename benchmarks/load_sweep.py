"""Coalescing and latency as load grows: batchsync's default against a fixed window.

    python benchmarks/load_sweep.py [--threads 1,2,4,8,16,32,64] [--seconds 1.5]

One shared loader, T request threads. Each thread serves requests one after another, each
inside ``batchsync.scope()`` (as the Flask and Django integrations open one per request):
three sequential levels of ``get()`` of a random key, then a random think time (0-2 ms)
before its next request. The batch function sleeps 1 ms (a database round trip).

Two loaders are compared, in the same run (the code: batchsync/demo/_sweep.py, which the
demo's chart plots too):
  * batchsync: ``Batcher(fn, max_concurrency=4)``, every other option at its default
    (window 5 ms);
  * fixed window: the textbook design written below: keys wait in a dict and a timer sends
    them when the window (5 ms) closes.

For each T it prints batch calls per request, p50 and p99 request latency and requests/s,
then the targets: at T=1, batchsync's p50 within 1.2x of three bare batch-function calls;
at T >= 8, batch calls per request at most 1.1x the fixed window's and p50 no higher.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from batchsync.demo._sweep import CALL, LEVELS, THINK, WINDOW, Counted, sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2,4,8,16,32,64")
    parser.add_argument("--seconds", type=float, default=1.5, help="per design and T")
    args = parser.parse_args(argv)
    sweep_threads = [int(t) for t in args.threads.split(",")]

    bare_fn = Counted()
    bare = []
    for _ in range(200):
        began = time.perf_counter()
        for _ in range(LEVELS):
            bare_fn([1])
        bare.append(time.perf_counter() - began)
    bare_p50 = statistics.median(bare) * 1000

    print(f"Python {sys.version.split()[0]}, {LEVELS} levels of get() per request, batch function "
          f"{CALL * 1000:.0f} ms, window {WINDOW * 1000:.0f} ms, think 0-{THINK * 1000:.0f} ms, "
          f"{args.seconds} s per row")
    print(f"three bare batch-function calls: p50 {bare_p50:.2f} ms")
    print(f"{'T':>3} {'loader':<12} {'calls/req':>9} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    results: dict[tuple[int, str], tuple[float, float]] = {}
    found = sweep(sweep_threads, args.seconds)
    for i, t in enumerate(sweep_threads):
        for design, rows in found.items():
            row = rows[i]
            name = "batchsync" if design == "batchsync" else "fixed"
            results[(t, name)] = (row["calls_per_request"], row["p50_ms"])
            print(f"{t:>3} {name:<12} {row['calls_per_request']:>9.2f} {row['p50_ms']:>8.2f} "
                  f"{row['p99_ms']:>8.2f} {row['requests_per_s']:>8.0f}")
    print("targets:")
    ok = True
    if (1, "batchsync") in results:
        ratio = results[(1, "batchsync")][1] / bare_p50
        ok &= ratio <= 1.2
        print(f"  T=1: p50 {ratio:.2f}x three bare calls (target <= 1.2x)")
    for t in sweep_threads:
        if t < 8:
            continue
        (c_b, p_b), (c_f, p_f) = results[(t, "batchsync")], results[(t, "fixed")]
        ok &= c_b <= 1.1 * c_f and p_b <= p_f
        print(f"  T={t}: calls/request {c_b / c_f:.2f}x fixed window (target <= 1.1x), "
              f"p50 {p_b / p_f:.2f}x (target <= 1x)")
    print("all targets met" if ok else "some targets missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
