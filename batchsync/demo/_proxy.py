"""A TCP proxy on loopback that adds network latency and cuts connections.

The demo puts it in front of the database to simulate a network round trip
(``--rtt``), in a process of its own (`proxy_process`) so that forwarding does not
compete for the interpreter lock with the client threads it measures; the tests use it
in-process to cut the server off. Standard library only:
one accepting thread, and per connection one thread per direction, plus one
more per direction when a delay is set (a reader that stamps each chunk with
its due time and a writer that sends it then, so latency is added without
limiting throughput). All threads are daemons; `close()` stops them all.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Literal

from ._child import child_process

__all__ = ["Proxy", "proxy_process"]

logger = logging.getLogger("batchsync.demo.proxy")

Side = Literal["both", "request", "response"]

_CHUNK = 65536


class Proxy:
    """Forward 127.0.0.1:`port` to `target`, a unix socket path or a (host, port).

    `rtt_ms` adds that much to each round trip: half on the way to the server
    and half on the way back with ``side="both"``, all of it on one way with
    ``side="request"`` or ``side="response"``. Start it with `start()` or
    ``with``; `cut()` closes every connection and refuses new ones until
    `restore()`; `close()` stops everything and is idempotent.
    """

    def __init__(
        self, target: str | tuple[str, int], *, rtt_ms: float = 0.0, side: Side = "both"
    ) -> None:
        if rtt_ms < 0:
            raise ValueError(f"rtt_ms must be >= 0, got {rtt_ms!r}")
        if side not in ("both", "request", "response"):
            raise ValueError(f"side must be 'both', 'request' or 'response', got {side!r}")
        self.target = target
        self.rtt_ms = rtt_ms
        rtt = rtt_ms / 1000.0
        self._request_delay = {"both": rtt / 2, "request": rtt, "response": 0.0}[side]
        self._response_delay = {"both": rtt / 2, "request": 0.0, "response": rtt}[side]
        self.port = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"<Proxy 127.0.0.1:{self.port} -> {self.target!r} rtt_ms={self.rtt_ms}>"

    def __enter__(self) -> Proxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Listen on a free port (the same port again after `cut()`) and accept."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", self.port))
            listener.listen(128)
        except BaseException:
            listener.close()
            raise
        # A timeout, because closing a socket does not wake a thread blocked
        # in accept() on every platform.
        listener.settimeout(0.05)
        stopping = threading.Event()
        acceptor = threading.Thread(
            target=self._accept_loop,
            args=(listener, stopping),
            name=f"batchsync-proxy-accept-{listener.getsockname()[1]}",
            daemon=True,
        )
        with self._lock:  # critical section: install the listener
            if self._closed:
                listener.close()
                raise RuntimeError("the proxy is closed")
            if self._listener is not None:
                listener.close()
                raise RuntimeError("the proxy is already listening")
            self._listener = listener
            self._stopping = stopping
            self._acceptor = acceptor
            self.port = listener.getsockname()[1]
        acceptor.start()

    def cut(self) -> None:
        """Close every connection and refuse new ones until `restore()`."""
        with self._lock:  # critical section: take the listener and connections out
            listener, self._listener = self._listener, None
            acceptor, self._acceptor = self._acceptor, None
            sockets, self._sockets = self._sockets, set()
            self._stopping.set()
        if acceptor is not None:
            acceptor.join()
        if listener is not None:
            listener.close()
        for sock in sockets:
            _shut(sock)

    def restore(self) -> None:
        """Accept connections again on the same port after `cut()`."""
        self.start()

    def close(self) -> None:
        """Stop accepting, close every connection and wait for all threads."""
        self.cut()
        with self._lock:  # critical section: take the threads out
            self._closed = True
            threads, self._threads = self._threads, set()
        for thread in threads:
            thread.join(5.0)

    def _accept_loop(self, listener: socket.socket, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if not stopping.is_set():
                    logger.exception("proxy %r: accept failed", self)
                return
            try:
                self._link(client, stopping)
            except Exception:
                logger.exception("proxy %r: cannot connect to the target", self)
                _shut(client)

    def _link(self, client: socket.socket, stopping: threading.Event) -> None:
        client.settimeout(None)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(self.target, str):
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            server.connect(self.target)
        except BaseException:
            server.close()
            raise
        threads = [
            *self._pipe(client, server, self._request_delay, "request"),
            *self._pipe(server, client, self._response_delay, "response"),
        ]
        with self._lock:  # critical section: register the connection
            refused = stopping.is_set()
            if not refused:
                self._sockets.update((client, server))
                self._threads.difference_update([t for t in self._threads if not t.is_alive()])
                self._threads.update(threads)
        if refused:
            _shut(client)
            _shut(server)
            return
        for thread in threads:
            thread.start()

    def _pipe(
        self, source: socket.socket, sink: socket.socket, delay: float, direction: str
    ) -> list[threading.Thread]:
        name = f"batchsync-proxy-{self.port}-{direction}"
        if delay <= 0:
            return [threading.Thread(target=_copy, args=(source, sink), name=name, daemon=True)]
        line: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()
        return [
            threading.Thread(
                target=_delay_read, args=(source, sink, line, delay), name=name, daemon=True
            ),
            threading.Thread(
                target=_delay_write, args=(line, source, sink), name=name + "-send", daemon=True
            ),
        ]


def _copy(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(_CHUNK):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        _shut(source)
        _shut(sink)


def _delay_read(
    source: socket.socket,
    sink: socket.socket,
    line: queue.SimpleQueue[tuple[float, bytes] | None],
    delay: float,
) -> None:
    try:
        while data := source.recv(_CHUNK):
            line.put((time.monotonic() + delay, data))
    except OSError:
        pass
    finally:
        # The writer sends what is in flight, then closes both ends.
        line.put(None)


def _delay_write(
    line: queue.SimpleQueue[tuple[float, bytes] | None],
    source: socket.socket,
    sink: socket.socket,
) -> None:
    try:
        while (item := line.get()) is not None:
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            sink.sendall(data)
    except OSError:
        pass
    finally:
        _shut(source)
        _shut(sink)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@contextlib.contextmanager
def proxy_process(target: str | tuple[str, int], rtt_ms: float) -> Iterator[int]:
    """Run a Proxy to target in a child process; yield its port; stop it at the end."""
    where = ["--unix", target] if isinstance(target, str) else ["--tcp", f"{target[0]}:{target[1]}"]
    command = [sys.executable, "-m", "batchsync.demo._proxy", *where, "--rtt", str(rtt_ms)]
    with child_process(command) as line:
        if not line.isdigit():
            raise RuntimeError(f"the proxy process did not start (it said {line!r})")
        yield int(line)


def main() -> None:
    """Serve a Proxy until standard input closes; print its port first."""
    ap = argparse.ArgumentParser(description="A latency-adding TCP proxy on 127.0.0.1.")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--unix", help="forward to this unix socket path")
    group.add_argument("--tcp", help="forward to HOST:PORT")
    ap.add_argument("--rtt", type=float, default=0.0, help="milliseconds per round trip")
    args = ap.parse_args()
    # Ctrl-C in a terminal reaches the whole process group: the parent decides when this
    # proxy stops (it closes our stdin), and a KeyboardInterrupt here would only print a
    # traceback over the parent's clean exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    target: str | tuple[str, int]
    if args.unix:
        target = args.unix
    else:
        host, _, port = args.tcp.rpartition(":")
        target = (host, int(port))
    with Proxy(target, rtt_ms=args.rtt) as proxy:
        print(proxy.port, flush=True)
        sys.stdin.read()  # until the parent closes our stdin (or exits)


if __name__ == "__main__":
    main()
