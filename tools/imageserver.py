"""A local HTTP server of images, optionally slow: the remote site for URL tests and benchmarks.

    python -m tools.imageserver [--host 0.0.0.0] [--port 8000] [--count 50]

serves generated JPEGs as /<n>.jpg (the compose test runs it as a container on the compose network).
"""

from __future__ import annotations

import argparse
import http.server
import io
import threading
import time

import numpy as np
from PIL import Image


class ImageServer(http.server.ThreadingHTTPServer):
    """GET /<n>.jpg answers image n (modulo the list) after `delay` seconds; any other path 404."""

    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, images: list[bytes], delay: float = 0.0, host: str = "127.0.0.1", port: int = 0):
        self.images, self.delay = images, delay
        self.served, self.last_served_at = 0, None  # answered requests, and when (perf_counter)
        self._count_lock = threading.Lock()
        super().__init__((host, port), _Handler)
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


def generated_jpegs(count: int) -> list[bytes]:
    """Distinct 64x48 JPEGs (a colour gradient each), so that none is a cached result of another."""
    out = []
    for n in range(count):
        rng = np.random.default_rng(n)
        a = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 40, (48, 64, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--count", type=int, default=50, help="distinct images (/<n>.jpg takes n modulo this)")
    args = p.parse_args(argv)
    server = ImageServer(generated_jpegs(args.count), host=args.host, port=args.port)
    print(f"serving {args.count} images on http://{args.host}:{server.port}/<n>.jpg", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
