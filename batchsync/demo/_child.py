"""A helper process of the demo and the benchmarks, started and stopped cleanly."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["child_process"]


@contextmanager
def child_process(command: list[str], env: dict[str, str] | None = None) -> Iterator[str]:
    """Run command; yield the first line it prints; at the end, stop it and wait for it.

    The child is expected to print one line once it is ready (its port, its address) and
    to stop when its standard input closes; it is killed if it has not after 15 s.
    """
    child = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert child.stdout is not None
        yield child.stdout.readline().strip()
    finally:
        assert child.stdin is not None
        child.stdin.close()  # the child's signal to stop
        try:
            child.wait(15.0)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
