"""The SSRF guard: address tables, literal spellings, resolution, and the guarded transport
over real HTTP (and HTTPS, to check the TLS name) on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from worker.devtools.embedded import free_port
from worker.errors import TargetForbiddenError
from worker.services.url_guard import (
    GuardedTransport,
    UrlGuard,
    VettedTarget,
    forbidden_reason,
    guarded_client,
    literal_ip,
    parse_legacy_ipv4,
)
from worker.services.webhooks import WebhookSender

TIMEOUT = httpx.Timeout(5.0)

# --------------------------------------------------------------------------------------------
# forbidden_reason


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("10.0.0.1", "private"),
        ("10.255.255.255", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "metadata"),
        ("169.254.1.1", "link-local"),
        ("100.64.0.1", "cgnat"),
        ("100.127.255.255", "cgnat"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "this-network"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"),
        ("192.0.0.8", "reserved"),
        ("192.0.2.1", "documentation"),
        ("198.51.100.7", "documentation"),
        ("203.0.113.9", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("fc00::1", "private"),
        ("fd00::1", "private"),
        ("fd00:ec2::254", "metadata"),
        ("fec0::1", "site-local"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "metadata"),
        ("::127.0.0.1", "reserved"),  # deprecated IPv4-compatible
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("64:ff9b:1::1", "private"),
        ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::1", "metadata"),  # 6to4 of 169.254.169.254
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo, client 127.0.0.1
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "documentation"),  # Teredo, client 192.0.2.45
        ("2001:db8::1", "documentation"),
        ("100::1", "reserved"),
        ("4000::1", "reserved"),  # outside global unicast 2000::/3
    ],
)
def test_forbidden_addresses(address: str, reason: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "100.63.255.255",  # just below CGNAT
        "100.128.0.0",  # just above CGNAT
        "172.15.255.255",
        "172.32.0.0",
        "2606:4700::1111",
        "2001:4860:4860::8888",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8
        "2002:808:808::1",  # 6to4 of 8.8.8.8
    ],
)
def test_public_addresses_allowed(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


# --------------------------------------------------------------------------------------------
# literal spellings


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0X7F000001", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0x7f.0.0.0x1", "127.0.0.1"),
        ("192.168.257", "192.168.1.1"),
        ("10.0.0.1.", "10.0.0.1"),  # a trailing dot, as in a fully qualified name
        ("0", "0.0.0.0"),
        ("0x", "0.0.0.0"),
        ("4294967295", "255.255.255.255"),
    ],
)
def test_legacy_ipv4_forms(host: str, expected: str) -> None:
    assert parse_legacy_ipv4(host) == ipaddress.IPv4Address(expected)


@pytest.mark.parametrize("host", ["example.com", "1.2.3.com", "0x1g", "a.b", "localhost", "x1"])
def test_names_are_not_ipv4(host: str) -> None:
    assert parse_legacy_ipv4(host) is None


@pytest.mark.parametrize(
    "host", ["1.2.3.256", "4294967296", "1.2.3.4.5", "08.0.0.1", "256.1", "foo.0x10", "1..2"]
)
def test_numeric_looking_but_invalid(host: str) -> None:
    with pytest.raises(ValueError, match="not a valid IPv4"):
        parse_legacy_ipv4(host)


def test_literal_ipv6_in_brackets_and_percent_encoded() -> None:
    assert literal_ip("[::1]") == ipaddress.IPv6Address("::1")
    assert literal_ip("%31%32%37.0.0.1") == ipaddress.IPv4Address("127.0.0.1")
    assert literal_ip("example.com") is None


# --------------------------------------------------------------------------------------------
# check_url_shape

STRICT = UrlGuard(allow_private=False)
LENIENT = UrlGuard(allow_private=True)

FORBIDDEN_LITERAL_URLS = [
    ("http://127.0.0.1/", "loopback"),
    ("http://127.0.0.1:8080/hook", "loopback"),
    ("http://10.1.2.3/", "private"),
    ("https://172.16.5.4/", "private"),
    ("http://192.168.0.10/", "private"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://100.64.0.1/", "cgnat"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://0/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://255.255.255.255/", "broadcast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://[::1]/", "loopback"),
    ("http://[::1]:9000/", "loopback"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fe80::1%25eth0]/", "link-local"),
    ("http://[fc00::1]/", "private"),
    ("http://[ff02::1]/", "multicast"),
    ("http://[::]/", "unspecified"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[::ffff:7f00:1]/", "loopback"),
    ("http://[::ffff:10.0.0.1]/", "private"),
    ("http://[64:ff9b::7f00:1]/", "loopback"),
    ("http://2130706433/", "loopback"),
    ("http://0x7f000001/", "loopback"),
    ("http://0177.0.0.1/", "loopback"),
    ("http://127.1/", "loopback"),
    ("http://0x7f.1/", "loopback"),
    ("http://127.0.0.1./", "loopback"),
    ("http://%31%32%37.0.0.1/", "loopback"),
    ("http://0xa9fea9fe/", "metadata"),
    ("HTTP://127.0.0.1/", "loopback"),
    ("http://localhost/", "loopback"),
    ("http://LOCALHOST:8000/", "loopback"),
    ("http://localhost./", "loopback"),
    ("http://api.localhost/", "loopback"),
]


@pytest.mark.parametrize(("url", "reason"), FORBIDDEN_LITERAL_URLS)
def test_shape_refuses_forbidden_literals(url: str, reason: str) -> None:
    with pytest.raises(TargetForbiddenError, match=rf"\({reason}\)"):
        STRICT.check_url_shape(url)


# httpx itself refuses to parse these, so no guard setting can make them usable.
UNSENDABLE = {"http://0177.0.0.1/"}


@pytest.mark.parametrize(("url", "reason"), FORBIDDEN_LITERAL_URLS)
def test_allow_private_lets_literals_through(url: str, reason: str) -> None:
    if url in UNSENDABLE:
        with pytest.raises(TargetForbiddenError, match="invalid URL"):
            LENIENT.check_url_shape(url)
    else:
        LENIENT.check_url_shape(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("javascript:alert(1)", "scheme"),
        ("gopher://example.com:70/", "scheme"),
        ("//example.com/", "scheme"),
        ("example.com/hook", "scheme"),
        ("http:///path", "no host"),
        ("http://user:pw@example.com/", "credentials"),
        ("http://user@example.com/", "credentials"),
        ("http://example.com\\@127.0.0.1/", "credentials"),
        ("http://:pw@example.com/", "credentials"),
        ("http://example.com:99999/", "port"),
        ("http://example.com:abc/", "port"),
        ("http://1.2.3.999/", "invalid host"),
        ("http://[::1/", "invalid URL"),
    ],
)
def test_shape_refuses_malformed(url: str, message: str) -> None:
    for guard in (STRICT, LENIENT):
        with pytest.raises(TargetForbiddenError, match=f"(?i){message}"):
            guard.check_url_shape(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/hook",
        "http://example.com:8080/a/b?c=d",
        "https://hooks.example.com./x",
        "http://8.8.8.8/",
        "http://134744072/",  # 8.8.8.8 as one number: odd, but public
        "https://[2606:4700::1111]/",
        "https://bücher.example/",
        "http://localhost.example.com/",  # only the .localhost TLD is special
    ],
)
def test_shape_accepts_public(url: str) -> None:
    STRICT.check_url_shape(url)


def test_always_allowed_hosts() -> None:
    guard = UrlGuard(allow_private=False, always_allowed_hosts=["LocalHost", "10.0.0.7", "[::1]"])
    guard.check_url_shape("http://localhost:9000/hook")
    guard.check_url_shape("http://localhost.:9000/hook")
    guard.check_url_shape("http://10.0.0.7/")
    guard.check_url_shape("http://0x0a000007/")  # the same address, spelled differently
    guard.check_url_shape("http://[::1]/")
    with pytest.raises(TargetForbiddenError):
        guard.check_url_shape("http://10.0.0.8/")
    with pytest.raises(TargetForbiddenError):
        guard.check_url_shape("http://api.localhost/")


# --------------------------------------------------------------------------------------------
# resolve


@dataclass
class FakeDns:
    """A resolver: name -> addresses; unknown names fail like getaddrinfo does."""

    table: dict[str, list[str]]
    calls: list[tuple[str, int]] = field(default_factory=list)

    def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append((host, port))
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.table[host]


def test_resolve_public_name() -> None:
    dns = FakeDns({"hooks.example.com": ["93.184.216.34", "2606:2800:220:1::", "93.184.216.34"]})
    guard = UrlGuard(allow_private=False, resolver=dns)
    target = guard.resolve("https://Hooks.Example.com/cb")
    assert target == VettedTarget(
        scheme="https",
        host="hooks.example.com",
        port=443,
        addresses=("93.184.216.34", "2606:2800:220:1::"),
    )
    assert dns.calls == [("hooks.example.com", 443)]


@pytest.mark.parametrize(
    ("addresses", "reason"),
    [
        (["10.0.0.5"], "private"),
        (["93.184.216.34", "127.0.0.1"], "loopback"),  # ANY forbidden address refuses
        (["2606:2800:220:1::", "fd12::1"], "private"),
        (["::ffff:169.254.169.254"], "metadata"),
    ],
)
def test_resolve_refuses_if_any_address_forbidden(addresses: list[str], reason: str) -> None:
    guard = UrlGuard(allow_private=False, resolver=FakeDns({"rebind.example.com": addresses}))
    with pytest.raises(TargetForbiddenError, match=rf"rebind\.example\.com.*\({reason}\)"):
        guard.resolve("http://rebind.example.com/")


def test_resolve_private_name_allowed_when_configured() -> None:
    dns = FakeDns({"receiver.internal": ["10.0.0.5"]})
    assert UrlGuard(allow_private=True, resolver=dns).resolve(
        "http://receiver.internal:9000/"
    ).addresses == ("10.0.0.5",)
    allowed = UrlGuard(
        allow_private=False, always_allowed_hosts=["receiver.internal"], resolver=dns
    )
    assert allowed.resolve("http://receiver.internal:9000/").port == 9000


def test_resolve_literal_does_not_use_dns() -> None:
    dns = FakeDns({})
    guard = UrlGuard(allow_private=True, resolver=dns)
    assert guard.resolve("http://0x7f.1:81/").addresses == ("127.0.0.1",)
    assert guard.resolve("http://[::1]/").addresses == ("::1",)
    assert dns.calls == []
    with pytest.raises(TargetForbiddenError, match="loopback"):
        UrlGuard(allow_private=False, resolver=dns).resolve("http://2130706433/")


def test_resolve_unknown_name_raises_oserror() -> None:
    guard = UrlGuard(allow_private=False, resolver=FakeDns({}))
    with pytest.raises(OSError, match="not known"):
        guard.resolve("http://nowhere.example/")


def test_resolve_localhost_with_the_real_resolver() -> None:
    with pytest.raises(TargetForbiddenError, match="loopback"):
        UrlGuard(allow_private=False).resolve("http://localhost/")
    target = UrlGuard(allow_private=True).resolve("http://localhost:8080/")
    assert target.addresses
    assert all(ipaddress.ip_address(a).is_loopback for a in target.addresses)


# --------------------------------------------------------------------------------------------
# GuardedTransport over real HTTP


@dataclass
class Seen:
    """One request as the test server saw it."""

    peer: str
    host_header: str | None
    path: str
    sni: str | None = None


class RecordingServer(ThreadingHTTPServer):
    daemon_threads = True
    seen: list[Seen]
    sni_names: list[str | None]


class RecordingHandler(BaseHTTPRequestHandler):
    server: RecordingServer
    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse would show

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        sni = self.server.sni_names[-1] if self.server.sni_names else None
        self.server.seen.append(
            Seen(self.client_address[0], self.headers.get("Host"), self.path, sni)
        )
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/target")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def http_server() -> Iterator[RecordingServer]:
    """A plain HTTP server on 127.0.0.1 that records who asked for what."""
    server = RecordingServer(("127.0.0.1", 0), RecordingHandler)
    server.seen, server.sni_names = [], []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def _port(server: ThreadingHTTPServer) -> int:
    return int(server.server_address[1])


def test_transport_refuses_loopback(http_server: RecordingServer) -> None:
    port = _port(http_server)
    with guarded_client(UrlGuard(allow_private=False), timeout=TIMEOUT) as client:
        for url in (
            f"http://127.0.0.1:{port}/",
            f"http://localhost:{port}/",
            f"http://127.1:{port}/",
        ):
            with pytest.raises(TargetForbiddenError, match="loopback"):
                client.get(url)
    assert http_server.seen == []


def test_transport_refuses_name_resolving_to_loopback(http_server: RecordingServer) -> None:
    guard = UrlGuard(allow_private=False, resolver=FakeDns({"evil.example": ["127.0.0.1"]}))
    with guarded_client(guard, timeout=TIMEOUT) as client, pytest.raises(TargetForbiddenError):
        client.get(f"http://evil.example:{_port(http_server)}/")
    assert http_server.seen == []


def test_transport_reaches_vetted_ip_with_original_host(http_server: RecordingServer) -> None:
    port = _port(http_server)
    dns = FakeDns({"hooks.example.test": ["127.0.0.1"]})
    guard = UrlGuard(allow_private=True, resolver=dns)
    with guarded_client(guard, timeout=TIMEOUT) as client:
        response = client.get(f"http://hooks.example.test:{port}/cb?x=1")
    assert response.status_code == 200
    assert response.text == "hello"
    assert str(response.url) == f"http://hooks.example.test:{port}/cb?x=1"  # caller's URL kept
    assert http_server.seen == [Seen("127.0.0.1", f"hooks.example.test:{port}", "/cb?x=1")]
    assert dns.calls == [("hooks.example.test", port)]


def test_transport_always_allowed_host(http_server: RecordingServer) -> None:
    port = _port(http_server)
    guard = UrlGuard(
        allow_private=False,
        always_allowed_hosts=["receiver.test"],
        resolver=FakeDns({"receiver.test": ["127.0.0.1"]}),
    )
    with guarded_client(guard, timeout=TIMEOUT) as client:
        assert client.get(f"http://receiver.test:{port}/").status_code == 200
        with pytest.raises(TargetForbiddenError):
            client.get(f"http://127.0.0.1:{port}/")


def test_transport_tries_next_vetted_address(http_server: RecordingServer) -> None:
    # 127.0.0.2 is loopback too, but nothing listens there on this port: refused, next one.
    dns = FakeDns({"multi.test": ["127.0.0.2", "127.0.0.1"]})
    with guarded_client(UrlGuard(allow_private=True, resolver=dns), timeout=TIMEOUT) as client:
        assert client.get(f"http://multi.test:{_port(http_server)}/").status_code == 200
    assert [s.peer for s in http_server.seen] == ["127.0.0.1"]


def test_transport_connect_error_when_no_address_answers() -> None:
    dns = FakeDns({"down.test": ["127.0.0.1"]})
    with (
        guarded_client(UrlGuard(allow_private=True, resolver=dns), timeout=TIMEOUT) as client,
        pytest.raises(httpx.ConnectError),
    ):
        client.get(f"http://down.test:{free_port()}/")


def test_transport_unresolvable_name_is_connect_error() -> None:
    guard = UrlGuard(allow_private=False, resolver=FakeDns({}))
    with (
        guarded_client(guard, timeout=TIMEOUT) as client,
        pytest.raises(httpx.ConnectError, match="cannot resolve"),
    ):
        client.get("http://nowhere.example/")


def test_redirects_are_not_followed(http_server: RecordingServer) -> None:
    port = _port(http_server)
    with guarded_client(UrlGuard(allow_private=True), timeout=TIMEOUT) as client:
        response = client.get(f"http://127.0.0.1:{port}/redirect")
        assert response.status_code == 302
        assert response.headers["location"] == "/target"
        # even when a caller asks per request, the client default stays off
        assert client.follow_redirects is False
    assert [s.path for s in http_server.seen] == ["/redirect"]


def test_guarded_client_refuses_bypasses() -> None:
    guard = UrlGuard(allow_private=False)
    with pytest.raises(ValueError, match="redirects"):
        guarded_client(guard, timeout=TIMEOUT, follow_redirects=True)
    for option in ("transport", "mounts", "proxy"):
        with pytest.raises(TypeError, match=option):
            guarded_client(guard, timeout=TIMEOUT, **{option: None})
    with pytest.raises(TypeError, match="uds"):
        GuardedTransport(guard, uds="/tmp/sock")


def test_bad_scheme_through_client() -> None:
    with (
        guarded_client(UrlGuard(allow_private=True), timeout=TIMEOUT) as client,
        pytest.raises((TargetForbiddenError, httpx.UnsupportedProtocol)),
    ):
        client.get("ftp://example.com/")


# --------------------------------------------------------------------------------------------
# HTTPS: the TLS name is the original host, and each name gets its own connections


@dataclass
class Tls:
    """A throw-away CA and a server certificate for one name."""

    ca_pem: Path
    cert_pem: Path
    key_pem: Path


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hooks.example.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("hooks.example.test")]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    files = Tls(folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    files.ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


@pytest.fixture
def https_server(tls_files: Tls) -> Iterator[RecordingServer]:
    """An HTTPS server on 127.0.0.1 with a certificate for hooks.example.test only."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files.cert_pem, tls_files.key_pem)
    server = RecordingServer(("127.0.0.1", 0), RecordingHandler)
    server.seen, server.sni_names = [], []

    def remember_sni(sock: Any, name: str | None, ctx: ssl.SSLContext) -> None:
        server.sni_names.append(name)

    context.sni_callback = remember_sni
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_https_uses_original_name_for_sni_and_verification(
    https_server: RecordingServer, tls_files: Tls
) -> None:
    port = _port(https_server)
    dns = FakeDns({"hooks.example.test": ["127.0.0.1"], "other.example.test": ["127.0.0.1"]})
    verify = ssl.create_default_context(cafile=str(tls_files.ca_pem))
    guard = UrlGuard(allow_private=True, resolver=dns)
    with guarded_client(guard, timeout=TIMEOUT, verify=verify) as client:
        response = client.get(f"https://hooks.example.test:{port}/secure")
        assert response.status_code == 200
        assert https_server.seen == [
            Seen("127.0.0.1", f"hooks.example.test:{port}", "/secure", "hooks.example.test")
        ]
        # Same IP, other name: must not ride the keep-alive connection made for the first
        # name; a fresh handshake for other.example.test fails verification.
        with pytest.raises(httpx.ConnectError, match=r"CERTIFICATE_VERIFY_FAILED|match"):
            client.get(f"https://other.example.test:{port}/secure")
        assert https_server.sni_names[-1] == "other.example.test"
        assert len(https_server.seen) == 1
        # and the first name's connection is still reused
        assert client.get(f"https://hooks.example.test:{port}/again").status_code == 200
    assert https_server.sni_names.count("hooks.example.test") == 1


def test_https_past_the_pool_limit_uses_one_off_connections(
    https_server: RecordingServer, tls_files: Tls
) -> None:
    port = _port(https_server)
    dns = FakeDns({"hooks.example.test": ["127.0.0.1"]})
    verify = ssl.create_default_context(cafile=str(tls_files.ca_pem))
    transport = GuardedTransport(
        UrlGuard(allow_private=True, resolver=dns), max_tls_pools=0, verify=verify
    )
    with httpx.Client(transport=transport, timeout=TIMEOUT) as client:
        for path in ("/one", "/two"):
            assert client.get(f"https://hooks.example.test:{port}{path}").text == "hello"
        with client.stream("GET", f"https://hooks.example.test:{port}/three") as response:
            assert response.read() == b"hello"
    assert https_server.sni_names == ["hooks.example.test"] * 3
    assert [s.path for s in https_server.seen] == ["/one", "/two", "/three"]


# --------------------------------------------------------------------------------------------
# Names DNS cannot carry: refused statically, at submit and again before any resolution

LABEL_63 = "a" * 63
HOST_253 = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
assert len(HOST_253) == 253


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("a" * 64 + ".example.com", "host label 'a{20}…' is 64 characters; DNS allows at most 63"),
        ("hooks." + "x" * 200 + ".example.com", r"is 200 characters; DNS allows at most 63"),
        (HOST_253[:-1] + "dd", "host 'a{20}…' is 254 characters; DNS allows at most 253"),
        (HOST_253 + ".com", "is 257 characters; DNS allows at most 253"),
        ("a..example.com", "host 'a..example.com' has an empty label"),
        (".example.com", "has an empty label"),
        ("example.com..", "has an empty label"),
        ("ü" * 60 + ".example", r"is \d+ characters once IDNA-encoded; DNS allows at most 63"),
        ("\u05d0a.example", "fails IDNA encoding: Violation of BIDI requirement"),
        ("xn--ü.example", "fails IDNA encoding: Label starts with ACE prefix"),
    ],
)
def test_shape_refuses_names_dns_cannot_carry(host: str, message: str) -> None:
    for guard in (STRICT, LENIENT):
        with pytest.raises(TargetForbiddenError, match=message):
            guard.check_url_shape(f"https://{host}/hook")


@pytest.mark.parametrize(
    "host",
    [
        LABEL_63 + ".example.com",
        HOST_253,
        HOST_253 + ".",  # the root's dot is not part of the 253
        "ü" * 20 + ".example",
        "under_score.example.com",
    ],
)
def test_shape_accepts_names_at_the_limits(host: str) -> None:
    STRICT.check_url_shape(f"https://{host}/hook")


def test_resolve_refuses_an_uncarriable_name_without_asking_dns() -> None:
    dns = FakeDns({})
    with pytest.raises(TargetForbiddenError, match="is 64 characters"):
        UrlGuard(allow_private=True, resolver=dns).resolve(f"https://{'a' * 64}.example.com/")
    assert dns.calls == []


# --------------------------------------------------------------------------------------------
# Resolution: bounded in time, and every resolver failure is classified


class SlowDns:
    """A resolver that blocks until released (a DNS server that never answers)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls += 1
        self.release.wait(10)
        return ["93.184.216.34"]


@pytest.fixture
def slow_dns() -> Iterator[SlowDns]:
    dns = SlowDns()
    yield dns
    dns.release.set()  # frees the shared resolver thread


def test_resolution_is_bounded_by_the_timeout(slow_dns: SlowDns) -> None:
    guard = UrlGuard(allow_private=False, resolver=slow_dns, resolve_timeout_s=0.2)
    started = time.monotonic()
    with pytest.raises(socket.gaierror, match=r"took longer than 0\.2 s") as caught:
        guard.resolve("https://slow.example/hook")
    assert 0.15 < time.monotonic() - started < 1.5
    assert caught.value.errno == socket.EAI_AGAIN
    assert slow_dns.calls == 1


def test_a_resolution_timeout_is_a_retryable_connect_error(slow_dns: SlowDns) -> None:
    guard = UrlGuard(allow_private=False, resolver=slow_dns, resolve_timeout_s=0.2)
    with (
        guarded_client(guard, timeout=TIMEOUT) as client,
        pytest.raises(httpx.ConnectError, match=r"cannot resolve slow\.example: .*took longer"),
    ):
        client.get("https://slow.example/hook")


def test_the_default_resolve_timeout() -> None:
    assert UrlGuard(allow_private=False).resolve_timeout_s == 5.0
    with pytest.raises(ValueError, match="positive"):
        UrlGuard(allow_private=False, resolve_timeout_s=0)


def _raise(exc: Exception) -> Any:
    def resolver(host: str, port: int) -> Sequence[str]:
        raise exc

    return resolver


@pytest.mark.parametrize(
    "error",
    [
        UnicodeError("encoding with 'idna' codec failed (UnicodeError: label too long)"),
        ValueError("embedded null byte"),
    ],
)
def test_resolver_value_errors_become_target_forbidden(error: Exception) -> None:
    guard = UrlGuard(allow_private=False, resolver=_raise(error))
    expected = f"cannot resolve host odd.example: {type(error).__name__}: {error}"
    with pytest.raises(TargetForbiddenError, match=re.escape(expected)):
        guard.resolve("https://odd.example/hook")


def test_unparseable_resolver_answer_is_target_forbidden() -> None:
    guard = UrlGuard(allow_private=True, resolver=FakeDns({"odd.example": ["not-an-address"]}))
    with pytest.raises(TargetForbiddenError, match=r"cannot resolve host odd\.example"):
        guard.resolve("https://odd.example/hook")


def test_getaddrinfo_unicode_error_at_delivery_is_forbidden_not_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def getaddrinfo(*args: object, **kwargs: object) -> Any:
        raise UnicodeError("encoding with 'idna' codec failed (UnicodeError: label too long)")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    guard = UrlGuard(allow_private=False)  # the real resolver, over the patched getaddrinfo
    with guarded_client(guard, timeout=TIMEOUT) as client:
        with pytest.raises(
            TargetForbiddenError, match=r"cannot resolve host odd\.example: UnicodeError"
        ):
            client.post("https://odd.example/hook", content=b"{}")
        sender = WebhookSender([SecretStr("whsec_" + "c2VjcmV0LWtleS0xMjM0NTY=")], client)
        result = sender.deliver("https://odd.example/hook", "msg_1", b"{}", timestamp=1)
    assert result.outcome == "forbidden"
    assert result.error is not None
    assert "UnicodeError" in result.error


def test_a_stored_webhook_url_with_a_long_label_is_refused_at_delivery() -> None:
    # A job queued before submit-time checks existed still reaches a final state.
    dns = FakeDns({})
    with guarded_client(UrlGuard(allow_private=False, resolver=dns), timeout=TIMEOUT) as client:
        sender = WebhookSender([SecretStr("whsec_" + "c2VjcmV0LWtleS0xMjM0NTY=")], client)
        result = sender.deliver(f"https://{'a' * 64}.example/hook", "msg_1", b"{}", timestamp=1)
    assert result.outcome == "forbidden"
    assert result.error is not None
    assert "64 characters; DNS allows at most 63" in result.error
    assert dns.calls == []
