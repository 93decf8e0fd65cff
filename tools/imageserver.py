"""A local HTTP server of images, optionally slow: the remote site for URL tests and benchmarks."""

from __future__ import annotations

import http.server
import threading
import time


class ImageServer(http.server.ThreadingHTTPServer):
    """GET /<n>.jpg answers image n (modulo the list) after `delay` seconds; any other path 404."""

    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, images: list[bytes], delay: float = 0.0):
        self.images, self.delay = images, delay
        self.served, self.last_served_at = 0, None  # answered requests, and when (perf_counter)
        self._count_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, n: int) -> str:
        return f"http://127.0.0.1:{self.port}/{n}.jpg"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(self.server.delay)
        name = self.path.strip("/").split(".")[0]
        if not name.isdigit():
            self.send_error(404)
            return
        body = self.server.images[int(name) % len(self.server.images)]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        with self.server._count_lock:
            self.server.served += 1
            self.server.last_served_at = time.perf_counter()

    def log_message(self, *args):
        pass
