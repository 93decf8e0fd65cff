"""HTTP servers on loopback that break mid-answer, for the fault tests: each sends its status and
headers and part of its body, then resets the connection, stalls, or closes before its
Content-Length (what real image servers and webhook receivers do when they crash or hang). The
fault tests and the soak (benchmarks/soak.py) use them."""

from __future__ import annotations

import socket
import struct
import threading
import time

BEHAVIOURS = ("reset", "stall", "short")


class BreakingServer:
    """Answers every request `HTTP/1.1 200` with a Content-Length of 10,000 and 1 KB of it, then
    `behaviour`: "reset" (RST), "stall" (holds the connection for `stall_s`), "short" (FIN)."""

    def __init__(self, behaviour: str, stall_s: float = 30.0, content_type: str = "image/jpeg"):
        assert behaviour in BEHAVIOURS
        self.behaviour, self.stall_s, self.content_type = behaviour, stall_s, content_type
        self.requests = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    def url(self, path: str = "/a.jpg") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _serve(self):
        self._sock.settimeout(0.2)
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket):
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(65536)  # the request (small: a GET, or a webhook's POST)
            except OSError:
                return
            self.requests += 1
            head = f"HTTP/1.1 200 OK\r\nContent-Type: {self.content_type}\r\nContent-Length: 10000\r\n\r\n"
            conn.sendall(head.encode() + b"\xff\xd8\xff" + b"\0" * 1021)
            if self.behaviour == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif self.behaviour == "stall":
                self._stopped.wait(self.stall_s)

    def close(self):
        self._stopped.set()
        self._sock.close()
        time.sleep(0.05)
