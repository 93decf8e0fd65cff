"""Fetching an image from a URL someone gave us, without letting them aim us at our own network.

Per hop (the first request and every redirect): http/https only; no credentials in the URL;
default ports only; the host is resolved once and *every* address must be public; the
connection then goes to that checked address (a DNS answer that changes between check and
connect cannot redirect it). A total deadline and a byte cap hold while streaming, and
compressed bodies are never inflated past the cap. `FETCH_ALLOW_HOSTS` lists host:port
pairs allowed despite the address rules (tests, intranets).
"""

from __future__ import annotations

import ipaddress
import socket
import time
import zlib
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from shared.errors import InputRefused

DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_URL_LENGTH = 2048
USER_AGENT = "cifar-svc-fetcher/1.0"


class UrlRefused(InputRefused):
    """A URL we will not fetch, or a fetch that failed."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # as written (lower case, brackets removed)
    port: int
    allowed_anyway: bool  # listed in FETCH_ALLOW_HOSTS


def check_url(url: str, allow_hosts=frozenset(), resolve: bool = True) -> tuple[Target, list[str]]:
    """Validate a URL's form (and, with resolve, its addresses). Returns the target and the
    addresses it may be fetched from."""
    if not isinstance(url, str) or len(url) > MAX_URL_LENGTH:
        raise UrlRefused("invalid_url", f"URLs are limited to {MAX_URL_LENGTH} characters.")
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise UrlRefused("invalid_url", "The URL contains spaces or control characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UrlRefused("invalid_url", "The URL is malformed.") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise UrlRefused("url_not_allowed", f"Only http and https URLs are fetched, not {scheme or 'this'}:.")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise UrlRefused("url_not_allowed", "URLs with a user name or password are not fetched.")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise UrlRefused("invalid_url", "The URL has no host.")
    port = port or DEFAULT_PORTS[scheme]
    allowed = f"{host}:{port}" in allow_hosts
    if not allowed and port != DEFAULT_PORTS[scheme]:
        raise UrlRefused("url_not_allowed", f"Only the default port for {scheme} is fetched.")
    target = Target(scheme, host, port, allowed)
    literal = _parse_ip_literal(host)
    if literal is not None and not allowed and not is_public(literal):
        raise UrlRefused("url_not_allowed", "That address is private, local or reserved; it is not fetched.")
    if not resolve:
        return target, []
    return target, resolve_checked(target)


def _parse_ip_literal(host: str):
    """Dotted, decimal, octal and hex spellings alike (what the C resolver would accept)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.ip_address(socket.inet_aton(host))  # 2130706433, 0x7f.1, 017700000001
    except OSError:
        return None


def is_public(ip) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.ip_network("0.0.0.0/8"):
        return False
    return ip.is_global and not (
        ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_loopback or ip.is_link_local or ip.is_private
    )


def resolve_checked(target: Target) -> list[str]:
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise UrlRefused("fetch_failed", f"The host {target.host} could not be resolved.", 502) from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not target.allowed_anyway:
        bad = [a for a in addresses if not is_public(ipaddress.ip_address(a.split("%")[0]))]
        if bad:
            raise UrlRefused(
                "url_not_allowed", f"{target.host} resolves to a private, local or reserved address; it is not fetched."
            )
    if not addresses:
        raise UrlRefused("fetch_failed", f"The host {target.host} has no address.", 502)
    return addresses


class _PinnedAdapter(HTTPAdapter):
    """Connects to one already-checked IP while speaking to (and verifying TLS for) the host name."""

    def __init__(self, target: Target, ip: str):
        self.target, self.ip = target, ip
        super().__init__(max_retries=0)

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        pool_kwargs = {}
        if self.target.scheme == "https":
            pool_kwargs = dict(
                server_hostname=self.target.host,
                assert_hostname=self.target.host,
                cert_reqs="CERT_REQUIRED" if verify else "CERT_NONE",
            )
        return self.poolmanager.connection_from_host(
            self.ip, self.target.port, self.target.scheme, pool_kwargs=pool_kwargs
        )


def fetch(
    url: str,
    *,
    allow_hosts=frozenset(),
    timeout: float = 10.0,
    max_bytes: int = 10 << 20,
    max_redirects: int = 5,
    ca_bundle: str = "",
) -> bytes:
    """GET url with every rule above; returns the body or raises UrlRefused. TLS certificates
    are checked against requests' CA bundle (certifi), or against ca_bundle (a PEM file) if given."""
    deadline = time.monotonic() + timeout
    for _hop in range(max_redirects + 1):
        with _pinned_request(
            "GET", url, allow_hosts, deadline, timeout, ca_bundle, {"Accept": "image/*", "Accept-Encoding": "identity"}
        ) as resp:
            if resp.is_redirect:
                url = urljoin(url, resp.headers.get("Location", ""))
                continue
            if resp.status_code != 200:
                raise UrlRefused("fetch_failed", f"The server answered HTTP {resp.status_code}.", 502)
            return _read_body(resp, deadline, timeout, max_bytes)
    raise UrlRefused("too_many_redirects", f"More than {max_redirects} redirects.", 502)


def post(
    url: str, body: bytes, headers: dict, *, allow_hosts=frozenset(), timeout: float = 10.0, ca_bundle: str = ""
) -> int:
    """POST body to url under the same rules (no redirect is followed); returns the status."""
    with _pinned_request(
        "POST",
        url,
        allow_hosts,
        time.monotonic() + timeout,
        timeout,
        ca_bundle,
        {"Content-Type": "application/json", **headers},
        body,
    ) as resp:
        # The status is the answer; its body is never read, so a receiver that answers and then
        # stalls or breaks off its body cannot hold the delivery (it did, for the read timeout,
        # and the urllib3 error that escaped left the attempt uncounted: resent for 7 days).
        return resp.status_code


def _pinned_request(
    method: str,
    url: str,
    allow_hosts,
    deadline: float,
    timeout: float,
    ca_bundle: str,
    headers: dict,
    data: bytes | None = None,
):
    """One request to one checked address (one hop: redirects are the caller's to check)."""
    target, addresses = check_url(url, allow_hosts)
    session = requests.Session()
    session.trust_env = False  # no proxies or .netrc from the environment
    session.mount(f"{target.scheme}://", _PinnedAdapter(target, addresses[0]))
    host_header = target.host if target.port == DEFAULT_PORTS[target.scheme] else f"{target.host}:{target.port}"
    if ":" in target.host:
        host_header = f"[{target.host}]" + host_header[len(target.host) :]
    try:
        return session.request(
            method,
            url,
            data=data,
            stream=True,
            allow_redirects=False,
            verify=ca_bundle or True,
            timeout=(max(0.1, min(5.0, deadline - time.monotonic())), max(0.1, deadline - time.monotonic())),
            headers={"Host": host_header, "User-Agent": USER_AGENT, **headers},
        )
    except requests.Timeout:
        raise UrlRefused("fetch_timeout", f"The server did not answer within {timeout:g} s.", 504) from None
    except requests.RequestException as exc:
        raise UrlRefused("fetch_failed", f"Could not connect ({type(exc).__name__}).", 502) from None
    finally:
        session.close()  # the response keeps its own connection until it is closed


def _read_body(resp, deadline: float, timeout: float, max_bytes: int) -> bytes:
    declared = resp.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise UrlRefused("file_too_large", f"The image is larger than {max_bytes // (1 << 20)} MB.", 413)
    encoding = resp.headers.get("Content-Encoding", "identity").lower()
    inflate = None
    if encoding in ("gzip", "x-gzip", "deflate"):
        inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib headers
    elif encoding not in ("identity", ""):
        raise UrlRefused("fetch_failed", f"Unsupported Content-Encoding {encoding}.", 502)
    body = bytearray()
    try:
        while True:
            if time.monotonic() > deadline:
                raise UrlRefused("fetch_timeout", f"The download took longer than {timeout:g} s.", 504)
            chunk = resp.raw.read1(64 * 1024, decode_content=False)  # one recv: a slow drip still hits the deadline
            if not chunk:
                break
            if inflate is not None:
                # Never inflate past the cap: max_length bounds the output of each step.
                chunk = inflate.decompress(chunk, max_bytes + 1 - len(body))
                if inflate.unconsumed_tail:
                    raise UrlRefused("file_too_large", f"The image is larger than {max_bytes // (1 << 20)} MB.", 413)
            body += chunk
            if len(body) > max_bytes:
                raise UrlRefused("file_too_large", f"The image is larger than {max_bytes // (1 << 20)} MB.", 413)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, zlib.error) as exc:
        # urllib3's own errors too: a body that breaks off mid-stream raises ProtocolError or
        # IncompleteRead, a stalled one ReadTimeoutError, and none is an OSError. They escaped,
        # the task was acknowledged, and the job stayed `fetching` for good.
        if isinstance(exc, (socket.timeout, TimeoutError, urllib3.exceptions.TimeoutError)) or (
            "timed out" in str(exc).lower()
        ):
            raise UrlRefused("fetch_timeout", f"The download took longer than {timeout:g} s.", 504) from None
        raise UrlRefused("fetch_failed", f"The download broke off ({type(exc).__name__}).", 502) from None
    return bytes(body)
