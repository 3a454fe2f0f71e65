"""The SSRF guard for callback URLs: which URLs a caller may name, and an HTTP client for
delivery that connects only to addresses that pass the same check."""

import ipaddress
import socket
import threading
import time
from typing import Any

import httpcore
import httpx

from jobs.errors import InvalidParameter

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# getaddrinfo has no timeout of its own; a submission must not wait on a slow resolver.
RESOLVE_TIMEOUT_SECONDS = 2.0
DELIVERY_TIMEOUT_SECONDS = 10.0

_SHARED = ipaddress.IPv4Network("100.64.0.0/10")
# RFC 6052's well-known NAT64 prefix: the last 32 bits are the IPv4 address reached.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def refused_address(ip: IPAddress | str) -> str | None:
    """Why a callback may not connect to this address, or None when it may."""
    if isinstance(ip, str):
        try:
            # A scope (`fe80::1%eth0`) says which interface, not where: judge the address.
            ip = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.teredo is not None:
            # A Teredo address reaches an IPv4 host through a relay we cannot judge.
            return "a Teredo tunnel address"
        embedded, form = _embedded(ip)
        if embedded is not None:
            reason = refused_address(embedded)
            return f"{form} form of {embedded}, {reason}" if reason else None
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        # fec0::/10, deprecated but still routed inside some networks; not `is_private` in
        # every Python release.
        return "a site-local address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return "a shared (carrier-grade NAT) address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "not a globally routable address"
    return None


def _embedded(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address | None, str]:
    """The IPv4 address an IPv6 address stands for, and its form (with an article)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "an IPv4-mapped"
    if ip.sixtofour is not None:
        return ip.sixtofour, "a 6to4"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "a NAT64"
    return None, ""


def check_callback_url(url: str, allow_private: bool, param: str = "callback_url") -> None:
    """Raise InvalidParameter unless `url` may be called back; a name that does not resolve
    (or not within RESOLVE_TIMEOUT_SECONDS) is accepted, as delivery checks it again."""
    parsed, host = _parse(url, param)
    if allow_private:
        return
    try:
        ip: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        # A literal is judged as written, with no lookup: it is where delivery connects.
        if (reason := refused_address(ip)) is not None:
            raise InvalidParameter(param, url, f"{ip} is {reason}; {_WHY}")
        return
    try:
        # Numeric forms such as `2130706433` or `0x7f000001` get here too: glibc reads them
        # as addresses, and only its reading says where delivery would connect.
        addresses = resolve(host, _port(parsed), RESOLVE_TIMEOUT_SECONDS)
    except ValueError as error:  # UnicodeError from the idna codec, say
        raise InvalidParameter(param, url, f"the host is not a valid name: {error}") from None
    except OSError:  # gaierror, or TimeoutError from resolve
        # No DNS for it now (or none in time): delivery resolves again and refuses what it
        # cannot vet, so refusing here would only turn a resolver hiccup into a 422.
        return
    for address in addresses:
        if (reason := refused_address(address)) is not None:
            raise InvalidParameter(param, url, f"the host resolves to {address}, {reason}; {_WHY}")


_WHY = "callbacks must go to a public address"


def _parse(url: str, param: str) -> tuple[httpx.URL, str]:
    """The URL as httpx (which delivers it) reads it, and its host, or InvalidParameter."""
    try:
        # httpx is what connects, so its reading of the host is the one that counts.
        parsed = httpx.URL(url)
        scheme, host, port, userinfo = parsed.scheme, parsed.raw_host, parsed.port, parsed.userinfo
        name = host.decode("ascii")  # httpx has IDNA-encoded it
    except Exception as error:  # httpx.InvalidURL and whatever else odd text provokes
        raise InvalidParameter(param, url, f"not a valid URL: {error}") from None
    if scheme not in ("http", "https"):
        raise InvalidParameter(param, url, "callback URLs must be http:// or https://")
    if not host:
        raise InvalidParameter(param, url, "the URL has no host")
    if userinfo:
        raise InvalidParameter(param, url, "callback URLs may not carry credentials")
    if b"%" in host:
        # Percent-escapes and IPv6 zones in a host only serve to hide where it points.
        raise InvalidParameter(param, url, "the host may not contain '%'")
    if len(host) > 253 or any(len(label) > 63 for label in host.split(b".")):
        raise InvalidParameter(param, url, "the host is too long to be a name")
    if port is not None and not 1 <= port <= 65535:
        raise InvalidParameter(param, url, f"port {port} is out of range")
    return parsed, name


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def resolve(host: str, port: int, timeout: float) -> list[str]:
    """The addresses getaddrinfo gives for a host (numeric forms like `2130706433` included),
    waiting at most `timeout` seconds: TimeoutError past it, its own errors otherwise."""
    box: dict[str, Any] = {}

    def lookup() -> None:
        try:
            box["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except Exception as error:  # handed to the waiting thread, which raises it
            box["error"] = error

    # A daemon thread, not a pool: a lookup that never returns must not hold up exit.
    thread = threading.Thread(target=lookup, name="mbatch-resolve", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"resolving {host} took over {timeout} s")
    if "error" in box:
        raise box["error"]
    addresses: list[str] = []
    for *_, sockaddr in box["infos"]:
        if sockaddr[0] not in addresses:
            addresses.append(str(sockaddr[0]))
    return addresses


class GuardedBackend(httpcore.NetworkBackend):
    """Resolves a host itself and connects only to an address that passes refused_address,
    then checks the peer it reached, so DNS answering differently later cannot redirect a
    delivery; TLS still verifies the URL's host, which httpcore passes to start_tls.

    Everything it does ends by one deadline, `total` seconds after it was made: httpx's own
    timeout bounds each connect, read and write alone, so a receiver that answers a byte at
    a time, or a host with many dead addresses, could otherwise hold a delivery for hours."""

    def __init__(self, allow_private: bool, total: float = DELIVERY_TIMEOUT_SECONDS) -> None:
        self._inner = httpcore.SyncBackend()
        self._allow_private = allow_private
        self._deadline = time.monotonic() + total

    def remaining(self, timeout: float | None) -> float:
        """The time an operation may take: its own timeout, cut to what is left."""
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout("the delivery's time is up")
        return left if timeout is None else min(timeout, left)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = resolve(host, port, self.remaining(timeout))
        except (OSError, ValueError) as error:  # gaierror, TimeoutError, UnicodeError
            raise httpcore.ConnectError(f"{host} does not resolve: {error}") from error
        refusals: list[str] = []
        failure: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in addresses:
            reason = None if self._allow_private else refused_address(address)
            if reason is not None:
                refusals.append(f"{address} ({reason})")
                continue
            try:
                stream = self._inner.connect_tcp(
                    address, port, self.remaining(timeout), local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                failure = error  # another address of the host may answer
                continue
            except httpcore.ReadTimeout as error:  # out of time before this address
                raise httpcore.ConnectTimeout(str(error)) from error
            peer = stream.get_extra_info("server_addr")
            reason = None if self._allow_private else _peer_refused(peer)
            if reason is not None:
                stream.close()
                raise httpcore.ConnectError(f"{host} connected to a refused address: {reason}")
            return _DeadlineStream(stream, self)
        if failure is not None:
            raise failure
        if refusals:
            raise httpcore.ConnectError(
                f"{host} resolves to a refused address: {', '.join(refusals)}"
            )
        raise httpcore.ConnectError(f"{host} resolves to no address")

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("callbacks do not go to unix sockets")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read, write and TLS handshake waits no longer than its
    backend's deadline allows."""

    def __init__(self, inner: httpcore.NetworkStream, backend: GuardedBackend) -> None:
        self._inner, self._backend = inner, backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._backend.remaining(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._backend.remaining(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        tls = self._inner.start_tls(ssl_context, server_hostname, self._backend.remaining(timeout))
        return _DeadlineStream(tls, self._backend)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def _peer_refused(peer: Any) -> str | None:
    """Why the connected peer (a getpeername() tuple) is refused, or None."""
    if not isinstance(peer, tuple) or not peer:
        return "the peer address is unknown"
    reason = refused_address(str(peer[0]))
    return f"{peer[0]} is {reason}" if reason else None


class _GuardedTransport(httpx.HTTPTransport):
    """httpx's own transport (its error mapping and streams) over a GuardedBackend."""

    def __init__(self, allow_private: bool, total: float) -> None:
        super().__init__(trust_env=False)
        # HTTPTransport takes no network backend, so its pool is swapped for one that has
        # ours; the same options otherwise (HTTP/1.1, verified TLS).
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            network_backend=GuardedBackend(allow_private, total),
        )


def guarded_client(allow_private: bool, timeout: float = DELIVERY_TIMEOUT_SECONDS) -> httpx.Client:
    """A client for one delivery attempt: no redirects, no proxies, only vetted addresses,
    and all of it over within `timeout` seconds of being made, however the receiver answers."""
    return httpx.Client(
        transport=_GuardedTransport(allow_private, timeout),
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
    )
