"""Interpreter exit and fork, each in a fresh subprocess (as CPython tests its executors)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def run(code: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_queued_keys_are_dispatched_at_interpreter_exit() -> None:
    proc = run(
        """
        import sys
        from batchsync import Batcher

        def fn(keys):
            print("sent", sorted(keys), flush=True)
            return keys

        b = Batcher(fn, window=3600)   # the window would never close by itself
        futures = b.load_many([3, 1, 2])
        print("exiting", flush=True)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["exiting", "sent [1, 2, 3]"]


def test_exit_is_prompt_when_nothing_is_queued_and_a_worker_idles() -> None:
    proc = run(
        """
        from batchsync import Batcher
        b = Batcher(lambda keys: keys)
        assert b.get(1) == 1
        print("done")
        """,
        timeout=10,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "done\n"


def test_exit_does_not_hang_on_a_hung_batch_function() -> None:
    proc = run(
        """
        import threading
        import batchsync._lifecycle as lc
        from batchsync import Batcher
        lc.EXIT_TIMEOUT = 0.5
        b = Batcher(lambda keys: threading.Event().wait(), window=0)
        b.load(1)
        print("exiting", flush=True)
        """,
        timeout=20,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "exiting\n"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_gets_a_fresh_batcher_and_parent_is_unaffected() -> None:
    proc = run(
        """
        import os, threading
        from batchsync import Batcher

        entered, release = threading.Event(), threading.Event()
        calls = []

        def fn(keys):
            calls.append((os.getpid(), list(keys)))
            if keys == [1]:
                entered.set()
                release.wait(10)
            return [k * 10 for k in keys]

        b = Batcher(fn, window=3600)
        in_flight = b.load(1)
        b.flush()
        assert entered.wait(10)
        queued = b.load(2)        # queued in the parent when we fork
        pid = os.fork()
        if pid == 0:
            # The child: nothing of the parent's is dispatched; the Batcher works.
            ok = b.get(3, timeout=10) == 30 and b.get(2, timeout=10) == 20
            child_calls = [c for c in calls if c[0] == os.getpid()]
            ok = ok and child_calls == [(os.getpid(), [3]), (os.getpid(), [2])]
            ok = ok and not in_flight.done() and not queued.done()
            b.close()
            os._exit(0 if ok else 1)
        release.set()
        _, status = os.waitpid(pid, 0)
        assert in_flight.result(10) == 10 and queued.result(10) == 20
        assert b.get(4, timeout=10) == 40
        assert [c[1] for c in calls] == [[1], [2], [4]], calls
        b.close()
        print("child", os.waitstatus_to_exitcode(status))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "child 0\n"
