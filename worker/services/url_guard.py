"""The SSRF guard for URLs that come from outside: producers' webhook targets and upstream's
output URLs. Never used for the operator's own endpoints (RunComfy base URL, S3, Redis).

Two layers:

* :meth:`UrlGuard.check_url_shape` — static, no DNS: scheme, host, userinfo, literal
  addresses in every spelling a resolver accepts (``2130706433``, ``0x7f.1``, ``0177.0.0.1``,
  ``127.1``, ``[::ffff:127.0.0.1]``) plus ``localhost``, and names DNS cannot carry (labels
  over 63 characters, names over 253, empty labels, failed IDNA encoding). Used at submit time.
* :class:`GuardedTransport` — the authoritative check at connect time: resolve the name once
  (within the guard's ``resolve_timeout_s``), refuse if any address is forbidden, then connect
  to a vetted address (never re-resolving, so DNS rebinding has no window), with the original
  ``Host`` header and TLS name.
"""

from __future__ import annotations

import concurrent.futures
import encodings.idna
import ipaddress
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import httpx

from worker.errors import TargetForbiddenError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Resolves ``(host, port)`` to address strings; the default is ``socket.getaddrinfo``.
Resolver = Callable[[str, int], Sequence[str]]

ALLOWED_SCHEMES: Final = frozenset({"http", "https"})
DEFAULT_PORTS: Final = {"http": 80, "https": 443}
#: RFC 1035 limits, in characters of the ASCII (IDNA-encoded) form; 253 is the 255-octet wire
#: form less its first length byte and the root label.
MAX_LABEL_CHARS: Final = 63
MAX_HOSTNAME_CHARS: Final = 253
#: Seconds one name resolution may take before it counts as failed (retryable).
DEFAULT_RESOLVE_TIMEOUT_S: Final = 5.0
# Lookups that outlive their timeout keep their thread until getaddrinfo gives up; past this
# many, new lookups wait in the queue and time out too, instead of piling up threads.
_RESOLVER_THREADS: Final = 16

# First match wins, so the narrow entries come before the ranges that contain them.
_V4_RULES: Final = tuple(
    (ipaddress.IPv4Network(net), reason)
    for net, reason in (
        ("0.0.0.0/32", "unspecified"),
        ("0.0.0.0/8", "this-network"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "cgnat"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.169.254/32", "metadata"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "reserved"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
    )
)
_V6_RULES: Final = tuple(
    (ipaddress.IPv6Network(net), reason)
    for net, reason in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "reserved"),  # deprecated IPv4-compatible addresses
        ("::ffff:0:0:0/96", "reserved"),  # IPv4-translated (SIIT)
        ("64:ff9b:1::/48", "private"),  # local-use NAT64
        ("100::/64", "reserved"),  # discard-only
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("2001::/23", "reserved"),  # IETF protocol assignments, incl. Teredo
        ("fd00:ec2::254/128", "metadata"),
        ("fc00::/7", "private"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)
_NAT64_WELL_KNOWN: Final = ipaddress.IPv6Network("64:ff9b::/96")
_GLOBAL_UNICAST: Final = ipaddress.IPv6Network("2000::/3")


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why this service must not connect to ``ip`` (e.g. "loopback"), or None when it may."""
    if isinstance(ip, ipaddress.IPv4Address):
        for network, reason in _V4_RULES:
            if ip in network:
                return reason
        return None if ip.is_global else "reserved"
    # Addresses that carry an IPv4 address reach that address; judge them by it.
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        return forbidden_reason(embedded)
    if ip.teredo is not None:
        _server, client = ip.teredo
        return forbidden_reason(client) or "reserved"
    for network6, reason in _V6_RULES:
        if ip in network6:
            return reason
    if ip not in _GLOBAL_UNICAST:
        return "reserved"
    return None if ip.is_global else "reserved"


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


@dataclass(frozen=True)
class VettedTarget:
    """A URL's scheme, host and port, and the addresses it may be reached at (in order)."""

    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


class _InvalidHostError(ValueError):
    pass


_DIGITS: Final = {8: "01234567", 10: "0123456789", 16: "0123456789abcdefABCDEF"}


def _parse_ipv4_number(part: str) -> int:
    # inet_aton(3) / WHATWG: 0x… is hex, a leading 0 is octal, else decimal.
    if part[:2].lower() == "0x":
        digits, base = part[2:], 16
        if not digits:
            return 0
    elif len(part) > 1 and part.startswith("0"):
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    if not digits or not all(c in _DIGITS[base] for c in digits):
        raise _InvalidHostError(part)
    return int(digits, base)


def _ends_in_number(labels: list[str]) -> bool:
    last = labels[-1]
    if last.isdigit() and last.isascii():
        return True
    if last[:2].lower() == "0x":
        return all(c in _DIGITS[16] for c in last[2:])
    return False


def parse_legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a resolver would read ``host`` as (``127.1``, ``0x7f000001`` …), or None.

    Raises ValueError for a host that looks numeric but is no valid address (``1.2.3.999``).
    """
    labels = host.split(".")
    if labels and labels[-1] == "":
        labels.pop()  # one trailing dot is allowed, as in a fully qualified name
    if not labels or not labels[-1] or not _ends_in_number(labels):
        return None
    if len(labels) > 4 or any(not label for label in labels):
        raise _InvalidHostError(f"{host!r} is not a valid IPv4 address")
    try:
        numbers = [_parse_ipv4_number(label) for label in labels]
    except _InvalidHostError:
        raise _InvalidHostError(f"{host!r} is not a valid IPv4 address") from None
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise _InvalidHostError(f"{host!r} is not a valid IPv4 address")
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def literal_ip(host: str) -> IPAddress | None:
    """The address ``host`` spells literally (any IPv4 form, IPv6 with or without brackets)."""
    host = unquote(host).strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise _InvalidHostError(f"{host!r} is not a valid IPv6 address") from None
    return parse_legacy_ipv4(host)


def _is_localhost_name(host: str) -> bool:
    name = host.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost")


def _normalise_host(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.removesuffix(".")


def _shown(text: str, keep: int = 20) -> str:
    return text if len(text) <= keep else text[:keep] + "…"


def hostname_problem(host: str) -> str | None:
    """Why the name ``host`` can never be resolved (DNS limits, IDNA), or None if it may be."""
    name = host.removesuffix(".")  # one trailing dot: a fully qualified name
    labels = name.split(".")
    if not all(labels):
        return f"host {_shown(host, 60)!r} has an empty label"
    encoded: list[str] = []
    for label in labels:
        if label.isascii():
            ascii_label, how = label, ""
        else:
            try:
                prepared = encodings.idna.nameprep(label)
                ascii_label = (
                    prepared
                    if prepared.isascii()
                    else "xn--" + prepared.encode("punycode").decode("ascii")
                )
            except UnicodeError as exc:
                return f"host label {_shown(label)!r} fails IDNA encoding: {exc}"
            how = " once IDNA-encoded"
        if len(ascii_label) > MAX_LABEL_CHARS:
            return (
                f"host label {_shown(label)!r} is {len(ascii_label)} characters{how}; "
                f"DNS allows at most {MAX_LABEL_CHARS}"
            )
        encoded.append(ascii_label)
    length = len(".".join(encoded))
    if length > MAX_HOSTNAME_CHARS:
        return (
            f"host {_shown(host)!r} is {length} characters; DNS allows at most {MAX_HOSTNAME_CHARS}"
        )
    # socket.getaddrinfo encodes every str host with this codec: whatever else it refuses
    # (an ACE prefix on a non-ASCII label …) would otherwise surface as UnicodeError there.
    try:
        name.encode("idna")
    except UnicodeError as exc:
        return f"host {_shown(host)!r} fails IDNA encoding: {exc.__cause__ or exc}"
    return None


def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class _ResolverPool:
    """The threads every guard in the process resolves names on, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def submit(
        self, resolve: Resolver, host: str, port: int
    ) -> concurrent.futures.Future[Sequence[str]]:
        """Run ``resolve(host, port)`` on one of the pool's threads."""
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    _RESOLVER_THREADS, thread_name_prefix="url-guard-dns"
                )
            return self._pool.submit(resolve, host, port)

    def forget(self) -> None:
        """Drop the pool without touching it: in a forked child its threads do not exist."""
        self._lock = threading.Lock()
        self._pool = None


_resolver_pool = _ResolverPool()
# A prefork child inherits a pool whose threads stayed in the parent; work submitted to it
# would never run. It starts a pool of its own instead.
os.register_at_fork(after_in_child=_resolver_pool.forget)


class UrlGuard:
    """Decides whether a producer- or upstream-supplied URL may be fetched."""

    def __init__(
        self,
        *,
        allow_private: bool,
        always_allowed_hosts: Iterable[str] = (),
        resolver: Resolver | None = None,
        resolve_timeout_s: float = DEFAULT_RESOLVE_TIMEOUT_S,
    ) -> None:
        if not resolve_timeout_s > 0:
            raise ValueError(f"resolve_timeout_s must be positive, not {resolve_timeout_s}")
        self.allow_private = allow_private
        self.resolve_timeout_s = resolve_timeout_s
        self._always_allowed = frozenset(_normalise_host(h) for h in always_allowed_hosts if h)
        self._resolve_name: Resolver = resolver or _getaddrinfo

    def is_always_allowed(self, host: str) -> bool:
        """True if ``host`` (a name or literal address) is exempt from the address checks."""
        host = _normalise_host(host)
        if host in self._always_allowed:
            return True
        try:
            ip = literal_ip(host)
        except ValueError:
            return False
        if ip is None:
            return False
        for allowed in self._always_allowed:
            try:
                if literal_ip(allowed) == ip:
                    return True
            except ValueError:
                continue
        return False

    def _exempt(self, host: str) -> bool:
        return self.allow_private or self.is_always_allowed(host)

    def _check_literal(self, host: str) -> IPAddress | None:
        """The literal address in ``host`` (None for a name), refusing forbidden ones."""
        try:
            ip = literal_ip(host)
        except ValueError as exc:
            raise TargetForbiddenError(f"invalid host: {exc}") from None
        if self._exempt(host):
            return ip
        if ip is not None:
            reason = forbidden_reason(ip)
            if reason:
                raise TargetForbiddenError(f"host {host} is a forbidden address ({reason})")
        elif _is_localhost_name(host):
            raise TargetForbiddenError(f"host {host} is a forbidden name (loopback)")
        return ip

    def _check_host(self, host: str) -> IPAddress | None:
        """Like :meth:`_check_literal`, also refusing names that can never resolve."""
        ip = self._check_literal(host)
        if ip is None:
            problem = hostname_problem(host)
            if problem:
                raise TargetForbiddenError(problem)
        return ip

    def check_url_shape(self, url: str) -> None:
        """Static checks, no DNS: http(s), a host, no credentials, no forbidden literal address,
        no name that DNS cannot carry."""
        try:
            parts = urlsplit(url)
            _ = parts.port  # raises for a malformed port
        except ValueError as exc:
            raise TargetForbiddenError(f"invalid URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise TargetForbiddenError(f"scheme {scheme or '(none)'!r} is not http or https")
        if "@" in parts.netloc:
            raise TargetForbiddenError("URL must not carry credentials")
        host = parts.hostname
        if not host:
            raise TargetForbiddenError("URL has no host")
        self._check_host(host)
        # httpx is what will send the request: judge its reading of the URL too.
        self._check_host(self._split(url).host)

    def _split(self, url: str | httpx.URL) -> VettedTarget:
        """Scheme, host and port as httpx reads them, after the static checks."""
        try:
            parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise TargetForbiddenError(f"invalid URL: {exc}") from None
        if parsed.scheme not in ALLOWED_SCHEMES:
            raise TargetForbiddenError(f"scheme {parsed.scheme or '(none)'!r} is not http or https")
        if parsed.userinfo:
            raise TargetForbiddenError("URL must not carry credentials")
        host = parsed.raw_host.decode("ascii").lower()
        if not host:
            raise TargetForbiddenError("URL has no host")
        port = parsed.port or DEFAULT_PORTS[parsed.scheme]
        if not 0 < port < 65536:
            raise TargetForbiddenError(f"invalid port {port}")
        return VettedTarget(scheme=parsed.scheme, host=host, port=port, addresses=())

    def resolve(self, url: str | httpx.URL) -> VettedTarget:
        """Full check: resolve the host and refuse if any address is forbidden.

        Raises TargetForbiddenError when refused (a name that can never resolve included) and
        OSError (``socket.gaierror``) when the name does not resolve, now or within
        ``resolve_timeout_s``.
        """
        target = self._split(url)
        ip = self._check_host(target.host)
        if ip is not None:
            return VettedTarget(target.scheme, target.host, target.port, (str(ip),))
        try:
            addresses = tuple(dict.fromkeys(self._lookup(target.host, target.port)))
            ips = [ipaddress.ip_address(address) for address in addresses]
        except ValueError as exc:
            # UnicodeError included: getaddrinfo's IDNA encoding refused the name, which no
            # retry will change.
            raise TargetForbiddenError(
                f"cannot resolve host {_shown(target.host, 60)}: {type(exc).__name__}: {exc}"
            ) from None
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, f"{target.host} has no addresses")
        if not self._exempt(target.host):
            for address, parsed in zip(addresses, ips, strict=True):
                reason = forbidden_reason(parsed)
                if reason:
                    raise TargetForbiddenError(
                        f"host {target.host} resolves to a forbidden address {address} ({reason})"
                    )
        return VettedTarget(target.scheme, target.host, target.port, addresses)

    def _lookup(self, host: str, port: int) -> Sequence[str]:
        """The resolver's answer, or socket.gaierror (EAI_AGAIN) after ``resolve_timeout_s``."""
        future = _resolver_pool.submit(self._resolve_name, host, port)
        done, _pending = concurrent.futures.wait([future], timeout=self.resolve_timeout_s)
        if not done:
            future.cancel()  # still queued behind hung lookups: never start it
            raise socket.gaierror(
                socket.EAI_AGAIN,
                f"resolving {_shown(host, 60)} took longer than {self.resolve_timeout_s:g} s",
            )
        return future.result()


#: Hostnames given their own TLS connection pool; past this, a request gets a one-off pool.
MAX_TLS_POOLS: Final = 64
_TRANSPORT_OPTIONS: Final = frozenset(
    {"verify", "cert", "trust_env", "http1", "http2", "limits", "retries", "socket_options"}
)


class _ClosingStream(httpx.SyncByteStream):
    """A response body that closes its one-off transport when it is closed."""

    def __init__(self, stream: httpx.SyncByteStream, transport: httpx.HTTPTransport) -> None:
        self._stream = stream
        self._transport = transport

    def __iter__(self) -> Iterator[bytes]:
        yield from self._stream

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._transport.close()


class GuardedTransport(httpx.BaseTransport):
    """An httpx transport that vets every request with a :class:`UrlGuard` and connects to the
    vetted address itself, so the name is resolved exactly once.

    Refused requests raise :class:`~worker.errors.TargetForbiddenError` (it passes through
    ``httpx.Client`` unchanged); names that do not resolve raise ``httpx.ConnectError``.
    """

    def __init__(
        self, guard: UrlGuard, *, max_tls_pools: int = MAX_TLS_POOLS, **transport_options: Any
    ) -> None:
        unknown = set(transport_options) - _TRANSPORT_OPTIONS
        if unknown:
            # proxy/uds would send the request somewhere the guard never looked at.
            raise TypeError(f"unsupported transport options: {sorted(unknown)}")
        self._guard = guard
        verify = transport_options.pop("verify", True)
        cert = transport_options.pop("cert", None)
        trust_env = transport_options.get("trust_env", True)
        # One SSL context for every pool: loading the CA bundle per pool is slow.
        ssl_context = httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env)
        self._options: dict[str, Any] = {**transport_options, "verify": ssl_context}
        self._plain = httpx.HTTPTransport(**self._options)
        # The pool key is (IP, port), so HTTPS needs one pool per server name: otherwise two
        # names on one IP (a CDN) would share a TLS connection made for the first name.
        self._tls: dict[str, httpx.HTTPTransport] = {}
        self._max_tls_pools = max_tls_pools
        self._lock = threading.Lock()
        self._closed = False

    def _pool_for(self, target: VettedTarget) -> tuple[httpx.HTTPTransport, bool]:
        """The transport to use and whether it is a one-off to close after the response."""
        if target.scheme == "http":
            return self._plain, False
        with self._lock:
            if self._closed:
                raise RuntimeError("transport is closed")
            pool = self._tls.get(target.host)
            if pool is None and len(self._tls) < self._max_tls_pools:
                pool = self._tls[target.host] = httpx.HTTPTransport(**self._options)
        if pool is None:
            return httpx.HTTPTransport(**self._options), True
        return pool, False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Vet the URL, then send the request to the first vetted address that accepts."""
        try:
            target = self._guard.resolve(request.url)
        except OSError as exc:
            message = f"cannot resolve {request.url.host}: {exc}"
            raise httpx.ConnectError(message, request=request) from exc
        transport, one_off = self._pool_for(target)
        headers = httpx.Headers(request.headers)
        if "host" not in headers:
            headers["Host"] = request.url.netloc.decode("ascii")
        extensions = dict(request.extensions)
        if target.scheme == "https" and literal_ip(target.host) is None:
            extensions["sni_hostname"] = target.host.removesuffix(".")
        try:
            error: httpx.ConnectError | None = None
            for address in target.addresses:
                inner = httpx.Request(
                    request.method,
                    request.url.copy_with(host=address),
                    headers=headers,
                    stream=request.stream,
                    extensions=extensions,
                )
                try:
                    response = transport.handle_request(inner)
                except httpx.ConnectError as exc:
                    error = exc  # refused or unreachable: try the next vetted address
                    continue
                if one_off:
                    assert isinstance(response.stream, httpx.SyncByteStream)
                    response.stream = _ClosingStream(response.stream, transport)
                return response
            assert error is not None
            raise httpx.ConnectError(str(error), request=request) from error
        except BaseException:
            if one_off:
                transport.close()
            raise

    def close(self) -> None:
        """Close every connection pool."""
        with self._lock:
            self._closed = True
            pools = [self._plain, *self._tls.values()]
            self._tls.clear()
        for pool in pools:
            pool.close()


def guarded_client(guard: UrlGuard, *, timeout: httpx.Timeout, **kwargs: Any) -> httpx.Client:
    """An ``httpx.Client`` whose every request goes through ``guard``; redirects never followed.

    Transport options (``verify``, ``cert``, ``limits``, ``http2``, ``retries`` …) go to the
    guarded transport; the rest to the client. ``transport``, ``mounts`` and ``proxy`` are
    refused because they would bypass the guard.
    """
    for bypass in ("transport", "mounts", "proxy"):
        if bypass in kwargs:
            raise TypeError(f"guarded_client does not accept {bypass!r}: it would bypass the guard")
    if kwargs.pop("follow_redirects", False):
        raise ValueError("guarded_client never follows redirects: each hop must be vetted")
    transport_options = {k: kwargs.pop(k) for k in list(kwargs) if k in _TRANSPORT_OPTIONS}
    if "trust_env" in transport_options:
        kwargs["trust_env"] = transport_options["trust_env"]
    return httpx.Client(
        transport=GuardedTransport(guard, **transport_options),
        timeout=timeout,
        follow_redirects=False,
        **kwargs,
    )
