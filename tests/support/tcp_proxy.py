"""A TCP proxy on 127.0.0.1 that a test can take down and bring back.

It stands between clients and a real server (the tests' S3 server) so that a test
can simulate the server going away and returning with its data: :meth:`stop` cuts
every open connection and closes the listening socket (new connections are
refused, as by a stopped server), :meth:`restart` listens again on the same port.
One thread accepts; each connection gets two threads copying bytes one way each.
"""

from __future__ import annotations

import contextlib
import socket
import threading

LOOPBACK = "127.0.0.1"
_BUFFER_BYTES = 64 * 1024


class TcpProxy:
    """Forwards connections on ``127.0.0.1:port`` to ``upstream`` (``host:port``)."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self.port = 0
        #: Connections cut by :meth:`stop` while open (the faults a test injected).
        self.cut_connections = 0
        #: Connections accepted since the proxy started.
        self.accepted = 0

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` for clients."""
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> TcpProxy:
        """Listen (on a free port the first time, on the same port afterwards)."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._acceptor = threading.Thread(
            target=self._accept, args=(listener,), name="tcp-proxy-accept", daemon=True
        )
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Refuse new connections and cut the open ones (both directions, at once)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5.0)
            self._acceptor = None
        with self._lock:
            open_now = list(self._connections)
            self._connections.clear()
        self.cut_connections += len(open_now) // 2
        for connection in open_now:
            _close(connection)

    def restart(self) -> None:
        """Listen again on the same port."""
        self.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # the listening socket was closed: stopped
                return
            try:
                server = socket.create_connection(self._upstream, timeout=10.0)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # stopped meanwhile
                    _close(client)
                    _close(server)
                    return
                self._connections.update((client, server))
                self.accepted += 1
            ended = threading.Barrier(2, action=lambda c=client, s=server: self._forget(c, s))
            for source, target in ((client, server), (server, client)):
                threading.Thread(
                    target=self._pump,
                    args=(source, target, ended),
                    name="tcp-proxy-pump",
                    daemon=True,
                ).start()

    def _pump(self, source: socket.socket, target: socket.socket, ended: threading.Barrier) -> None:
        try:
            while chunk := source.recv(_BUFFER_BYTES):
                target.sendall(chunk)
            # A clean end of one direction: pass the half-close on.
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)
        except OSError:  # reset, or cut by stop(): the other direction ends too
            _close(source)
            _close(target)
        with contextlib.suppress(threading.BrokenBarrierError):
            ended.wait(timeout=600.0)

    def _forget(self, client: socket.socket, server: socket.socket) -> None:
        """Both directions of a connection ended: close it and stop tracking it."""
        with self._lock:
            self._connections.discard(client)
            self._connections.discard(server)
        _close(client)
        _close(server)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _close(connection: socket.socket) -> None:
    # shutdown first: it wakes a thread blocked in recv on the same socket.
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)
    connection.close()
