"""Hostile clients for the abuse test and benchmark: slowloris connections that never finish
their request head."""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager


@contextmanager
def slowloris(port: int, n: int, host: str = "127.0.0.1"):
    """n connections that each send a request's first line and then one header byte a second,
    for as long as the block runs; yields the sockets (to see whether the server let go)."""
    conns = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        conns.append(s)
    stop = threading.Event()

    def drip():
        while not stop.wait(1):
            for s in conns:
                try:
                    s.sendall(b"X")
                except OSError:
                    pass

    threading.Thread(target=drip, daemon=True).start()
    try:
        yield conns
    finally:
        stop.set()
        for s in conns:
            s.close()
