"""The URL fetcher against local HTTP servers: what it fetches, and every way it refuses."""

import gzip
import http.server
import socket
import ssl
import threading
import time

import pytest
import trustme

from shared import fetch as fetch_module
from shared.fetch import UrlRefused, check_url, fetch
from tests.helpers import image_bytes

PNG = image_bytes("PNG")
BOMB = gzip.compress(b"\0" * (50 * 2**20))  # 50 MB of zeros in about 50 KB


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits = []

    def do_GET(self):
        Handler.hits.append(self.path)
        route = self.path.split("?")[0]
        if route == "/img.png":
            return self._send(200, PNG, "image/png")
        if route == "/as-html":
            return self._send(200, PNG, "text/html")  # the bytes decide, not the header
        if route.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", self.path.split("/redirect/", 1)[1].replace("__", "/"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
            return
        if route == "/huge-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            return
        if route == "/endless":
            self.send_response(200)
            self.end_headers()  # no length: read until close
            try:
                while True:
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                return
        if route == "/gzip-bomb":
            body = BOMB
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if route == "/gzip-png":
            return self._send(200, gzip.compress(PNG), "image/png", {"Content-Encoding": "gzip"})
        self._send(404, b"no", "text/plain")

    def _send(self, status, body, ctype, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    Handler.hits.clear()
    yield srv
    srv.shutdown()


def allowed(srv):
    return frozenset({f"127.0.0.1:{srv.server_address[1]}"})


def base(srv):
    return f"http://127.0.0.1:{srv.server_address[1]}"


def refused(url, code="url_not_allowed", **kw):
    with pytest.raises(UrlRefused) as e:
        fetch(url, **kw)
    assert e.value.code == code, e.value.message
    return e.value


def test_an_allowed_host_is_fetched(server):
    assert fetch(base(server) + "/img.png", allow_hosts=allowed(server)) == PNG


def test_loopback_is_refused_unless_explicitly_allowed(server):
    refused(base(server) + "/img.png")  # the same URL, without the setting
    assert Handler.hits == []


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/",
        "ftp://example.com/a.jpg",
        "javascript:alert(1)",
        "http://127.0.0.1/",
        "http://localhost/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://2130706433/",
        "http://0x7f000001/",
        "http://017700000001/",
        "http://127.1/",
        "http://0.0.0.0/",
        "http://0/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://192.168.1.1/",
        "http://172.16.0.1/",
        "http://100.64.0.1/",
        "http://224.0.0.1/",
        "http://[fe80::1]/",
        "http://[fc00::1]/",
        "http://example.com@127.0.0.1/",
        "http://user:pw@example.com/",
        "http://example.com:8080/a.jpg",
    ],
)
def test_refused_urls(url):
    with pytest.raises(UrlRefused) as e:
        check_url(url)
    assert e.value.code in ("url_not_allowed", "invalid_url")


@pytest.mark.parametrize(
    "url", ["", "http://", "http:///a.jpg", "http://exa mple.com/", "http://x/\n", "http://" + "a" * 3000 + ".com/"]
)
def test_malformed_urls(url):
    with pytest.raises(UrlRefused) as e:
        check_url(url)
    assert e.value.code in ("invalid_url", "url_not_allowed")


def test_a_redirect_to_loopback_is_refused_at_that_hop(server):
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        target = f"http:____127.0.0.1:{other.server_address[1]}__img.png"
        refused(base(server) + "/redirect/" + target, allow_hosts=allowed(server))
        assert Handler.hits == ["/redirect/" + target]  # the second server was never asked
    finally:
        other.shutdown()


def test_allowed_redirects_are_followed(server):
    assert fetch(base(server) + "/redirect/__img.png", allow_hosts=allowed(server)) == PNG


def test_redirect_chains_are_bounded(server):
    refused(base(server) + "/loop", "too_many_redirects", allow_hosts=allowed(server), max_redirects=3)
    assert len(Handler.hits) == 4


def test_a_slow_drip_is_cut_at_the_deadline(server):
    t0 = time.monotonic()
    refused(base(server) + "/drip", "fetch_timeout", allow_hosts=allowed(server), timeout=1.0)
    assert time.monotonic() - t0 < 10  # the drip would take 200 s; any machine stops it near 1 s


def test_declared_oversize_is_refused_before_reading(server):
    refused(base(server) + "/huge-declared", "file_too_large", allow_hosts=allowed(server), max_bytes=1000)


def test_an_endless_body_is_cut_at_the_cap(server):
    refused(base(server) + "/endless", "file_too_large", allow_hosts=allowed(server), max_bytes=200_000)


def test_a_gzip_bomb_is_not_inflated_past_the_cap(server):
    import tracemalloc

    tracemalloc.start()
    try:
        refused(base(server) + "/gzip-bomb", "file_too_large", allow_hosts=allowed(server), max_bytes=1_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20  # it never held the 50 MB


def test_gzip_encoded_images_are_decoded(server):
    assert fetch(base(server) + "/gzip-png", allow_hosts=allowed(server)) == PNG


def test_content_type_is_not_trusted(server):
    assert fetch(base(server) + "/as-html", allow_hosts=allowed(server)) == PNG


def test_the_connection_goes_to_the_checked_address(server, monkeypatch):
    """DNS rebinding: the name resolves to a public address when checked; were it resolved
    again at connect time it would give loopback, where our server listens. It must not."""
    port = server.server_address[1]
    answers = [
        [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))],
        [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))],
    ]
    real = socket.getaddrinfo

    def fake(host, *a, **kw):
        if host == "rebind.test":
            return answers.pop(0) if len(answers) > 1 else answers[0]
        return real(host, *a, **kw)

    monkeypatch.setattr(fetch_module.socket, "getaddrinfo", fake)
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with pytest.raises(UrlRefused):
        fetch(f"http://rebind.test:{port}/img.png", allow_hosts=frozenset({f"rebind.test:{port}"}), timeout=2)
    assert Handler.hits == []


def test_a_host_with_a_public_and_a_private_address_is_refused(monkeypatch):
    """Every address a name resolves to must be public: one private answer among public ones
    would let a connection land inside."""
    real = socket.getaddrinfo

    def fake(host, *a, **kw):
        if host == "mixed.test":
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", 80)),
            ]
        return real(host, *a, **kw)

    monkeypatch.setattr(fetch_module.socket, "getaddrinfo", fake)
    with pytest.raises(UrlRefused) as err:
        check_url("http://mixed.test/a.jpg")
    assert err.value.code == "url_not_allowed"


# --- HTTPS through the pinned connection: a local TLS server with a CA of its own ----------------
class TlsServer:
    """https://tls.test:<port>/img.png on loopback, its certificate issued by a throwaway CA for
    `names`; it records the server name (SNI) each client asked for."""

    def __init__(self, ca, names, tmp_path):
        self.sni = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(*names).configure_cert(context)
        context.sni_callback = lambda sock, name, ctx: self.sni.append(name)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.ca_bundle = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_bundle))

    def url(self) -> str:
        return f"https://tls.test:{self.port}/img.png"


@pytest.fixture
def tls(tmp_path, monkeypatch):
    real = socket.getaddrinfo

    def resolve(host, port, *a, **kw):  # tls.test is this machine
        return real("127.0.0.1" if host == "tls.test" else host, port, *a, **kw)

    monkeypatch.setattr(fetch_module.socket, "getaddrinfo", resolve)
    servers = []

    def make(names=("tls.test",), ca=None):
        servers.append(TlsServer(ca or trustme.CA(), names, tmp_path))
        return servers[-1]

    yield make
    for s in servers:
        s.server.shutdown()


def test_https_is_fetched_through_the_checked_address_with_sni_and_a_verified_certificate(tls):
    server = tls()
    body = fetch(server.url(), allow_hosts=frozenset({f"tls.test:{server.port}"}), ca_bundle=str(server.ca_bundle))
    assert body == PNG
    assert server.sni == ["tls.test"]  # the host name went out in the handshake, not the address


def test_https_with_a_certificate_for_another_name_is_refused(tls):
    server = tls(names=("someone-else.test",))
    with pytest.raises(UrlRefused) as err:
        fetch(server.url(), allow_hosts=frozenset({f"tls.test:{server.port}"}), ca_bundle=str(server.ca_bundle))
    assert err.value.code == "fetch_failed"


def test_https_from_an_unknown_ca_is_refused(tls):
    server = tls()
    with pytest.raises(UrlRefused) as err:  # requests' own CA bundle does not know our throwaway CA
        fetch(server.url(), allow_hosts=frozenset({f"tls.test:{server.port}"}))
    assert err.value.code == "fetch_failed"
