"""A TCP proxy whose behaviour a test changes while clients use it: a peer that drops, hangs, resets, refuses
or goes away with its connections, and comes back."""

from __future__ import annotations

import socket
import struct
import threading

from .support import HOST, free_port


def close_listener(sock: socket.socket) -> None:
    """Stop listening now: shutdown wakes the thread blocked in accept (a bare close leaves it listening)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """TCP proxy to ``upstream``; what it does with each new connection depends on :attr:`mode`:
    forward, drop (close at once), hang (never answer), reset (RST), refuse (not listening)."""

    def __init__(self, upstream: int) -> None:
        self.upstream, self.mode = upstream, "forward"
        self.port = free_port()
        self.stopping = threading.Event()
        self.socks: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.connections = 0
        self.listen()

    def listen(self) -> None:
        self.listener = socket.create_server((HOST, self.port), reuse_port=False)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def set_mode(self, mode: str) -> None:
        if mode == "refuse" and self.listener is not None:
            close_listener(self.listener)
            self.listener = None
        elif mode != "refuse" and self.listener is None:
            self.listen()
        self.mode = mode

    def _accept(self, listener: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            self.connections += 1
            self.socks.append(sock)
            if self.mode == "drop":
                sock.close()
            elif self.mode == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            elif self.mode == "forward":
                up = socket.create_connection((HOST, self.upstream))
                self.socks.append(up)
                for a, b in ((sock, up), (up, sock)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()
            # hang: keep the socket open, never read or answer

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Close every connection it carries now (new ones are handled by :attr:`mode`)."""
        socks, self.socks = self.socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def stop(self) -> None:
        self.stopping.set()
        if self.listener is not None:
            close_listener(self.listener)
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass
