"""The SSRF guard for callback URLs: every refused form at submission, and a delivery client
that will not connect to a refused address however the URL names it."""

import http.server
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.errors import InvalidParameter
from jobs.webhooks import addresses
from jobs.webhooks.addresses import check_callback_url, guarded_client, refused_address

# Each resolves (through getaddrinfo where it is a name or a numeric form) to an address no
# callback may reach.
REFUSED_ADDRESSES = [
    "http://127.0.0.1/",
    "http://127.0.0.1:8000/hook",
    "http://[::1]/",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/",
    "http://192.168.1.1/",
    "http://172.16.0.1/",
    "http://[::ffff:10.0.0.1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
    "http://[64:ff9b::a00:1]/",  # NAT64 of 10.0.0.1
    "http://[2001::1]/",  # Teredo
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://127.1/",
    "http://0/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://localhost/",
    "http://localhost:8080/hook",
    "http://100.64.0.1/",
    "http://224.0.0.1/",
    "http://[ff02::1]/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
]

# Refused whatever the addresses: not http(s), no host, credentials, and hosts that hide
# where they point.
REFUSED_FORMS = [
    "ftp://8.8.8.8/",
    "file:///etc/passwd",
    "gopher://8.8.8.8/",
    "javascript:alert(1)",
    "8.8.8.8",
    "",
    "http://",
    "http:///path",
    "http://user:pass@8.8.8.8/",
    "http://user@8.8.8.8/",
    "http://:@8.8.8.8/",
    "https://8.8.8.8@127.0.0.1/",
    "http://%31%32%37.0.0.1/",
    "http://[fe80::1%25eth0]/",
    "http://8.8.8.8:0/",
    "http://8.8.8.8:99999/",
    "http://0177.0.0.1/",
    "http://a\u0000b/",
    "http://[::1/",
    "http://" + "a" * 64 + ".test/",
    "http://" + "a." * 127 + "test/",
]

ALLOWED = [
    "http://8.8.8.8/",
    "https://8.8.8.8:8443/hook?x=1",
    "http://[2001:4860:4860::8888]/",
    "http://[::ffff:8.8.8.8]/",
    "HTTPS://8.8.8.8/",
    # .invalid never resolves: accepted at submission, refused at delivery.
    "https://mbatch-no-such-host.invalid/hook",
]


@pytest.mark.parametrize("url", REFUSED_ADDRESSES + REFUSED_FORMS)
def test_a_refused_url_is_invalid_naming_the_field(url: str) -> None:
    with pytest.raises(InvalidParameter) as raised:
        check_callback_url(url, allow_private=False)
    assert raised.value.param == "callback_url"
    assert raised.value.status_code == 422


def test_the_field_name_can_be_given() -> None:
    with pytest.raises(InvalidParameter) as raised:
        check_callback_url("http://10.0.0.1/", allow_private=False, param="job.callback_url")
    assert raised.value.param == "job.callback_url"


def test_the_reason_names_the_address_a_numeric_form_resolves_to() -> None:
    with pytest.raises(InvalidParameter) as raised:
        check_callback_url("http://0x7f000001/", allow_private=False)
    assert "127.0.0.1" in raised.value.message and "loopback" in raised.value.message


@pytest.mark.parametrize("url", ALLOWED)
def test_a_public_or_unresolvable_url_is_allowed(url: str) -> None:
    check_callback_url(url, allow_private=False)


@pytest.mark.parametrize("url", REFUSED_ADDRESSES)
def test_allow_private_lets_any_address_through(url: str) -> None:
    check_callback_url(url, allow_private=True)


@pytest.mark.parametrize("url", REFUSED_FORMS)
def test_allow_private_still_refuses_bad_forms(url: str) -> None:
    with pytest.raises(InvalidParameter):
        check_callback_url(url, allow_private=True)


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("10.1.2.3", True),
        ("100.64.0.1", True),
        ("100.127.255.255", True),
        ("100.128.0.1", False),
        ("169.254.169.254", True),
        ("224.0.0.1", True),
        ("0.0.0.0", True),
        ("::", True),
        ("::ffff:169.254.169.254", True),
        ("fe80::1%eth0", True),
        ("fec0::1", True),
        ("2002:a00:1::", True),
        ("2002:808:808::", False),
        ("64:ff9b::808:808", False),
        ("8.8.8.8", False),
        ("2001:4860:4860::8888", False),
        ("not an address", True),
    ],
)
def test_refused_address(address: str, refused: bool) -> None:
    reason = refused_address(address)
    assert (reason is not None) is refused, reason
    if isinstance(reason, str):
        assert reason


@given(st.ip_addresses())
def test_refused_address_takes_any_address(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    reason = refused_address(ip)
    assert reason is None or reason
    if reason is None:
        assert ip.is_global or ip.ipv4_mapped or ip.sixtofour or ip in addresses._NAT64  # type: ignore[union-attr]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_is_either_accepted_or_invalid(text: str) -> None:
    # allow_private skips the lookup, so this never waits on a resolver.
    for url in (text, "http://" + text, "https://" + text + "/"):
        try:
            check_callback_url(url, allow_private=True)
        except InvalidParameter as error:
            assert error.param == "callback_url"


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses())
def test_any_address_literal_is_judged_as_refused_address_judges_it(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    refused = refused_address(ip) is not None
    try:
        check_callback_url(f"http://{host}/", allow_private=False)
    except InvalidParameter:
        assert refused
    else:
        assert not refused


def test_a_resolver_that_hangs_is_waited_on_for_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """getaddrinfo has no timeout: a submission waits at most RESOLVE_TIMEOUT_SECONDS, then
    accepts (delivery resolves again)."""
    release = threading.Event()

    def hang(*args: object, **kwargs: object) -> object:
        release.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "gave up")

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    monkeypatch.setattr(addresses, "RESOLVE_TIMEOUT_SECONDS", 0.3)
    started = time.monotonic()
    try:
        check_callback_url("https://slow-resolver.test/hook", allow_private=False)
    finally:
        release.set()
    assert time.monotonic() - started < 2


# -- delivery --------------------------------------------------------------------------------


class Receiver(http.server.BaseHTTPRequestHandler):
    """Answers 200, or a 302 to an outside address at /redirect."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(302 if self.path == "/redirect" else 200)
        self.send_header("Location", "http://8.8.8.8/")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def receiver_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "0x7f000001"])
def test_the_guarded_client_refuses_to_connect_to_loopback(receiver_port: int, host: str) -> None:
    with guarded_client(allow_private=False) as client, pytest.raises(httpx.ConnectError) as raised:
        client.post(f"http://{host}:{receiver_port}/", content=b"{}")
    assert "refused address: 127.0.0.1" in str(raised.value)


def test_the_guarded_client_refuses_a_name_that_does_not_resolve() -> None:
    with guarded_client(allow_private=False) as client, pytest.raises(httpx.ConnectError):
        client.post("http://mbatch-no-such-host.invalid/", content=b"{}")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_the_guarded_client_reaches_loopback_when_private_is_allowed(
    receiver_port: int, host: str
) -> None:
    with guarded_client(allow_private=True) as client:
        response = client.post(f"http://{host}:{receiver_port}/", content=b"{}")
    assert response.status_code == 200
    assert response.text == "ok"


def test_the_guarded_client_returns_a_redirect_without_following_it(receiver_port: int) -> None:
    with guarded_client(allow_private=True) as client:
        response = client.post(f"http://127.0.0.1:{receiver_port}/redirect", content=b"{}")
    assert response.status_code == 302
    assert response.next_request is not None  # there was somewhere to go; it did not go


def test_the_guarded_client_ignores_proxy_settings(
    receiver_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy named in the environment would connect for us, past the guard."""
    monkeypatch.setenv("HTTP_PROXY", "http://10.255.255.1:9/")
    monkeypatch.setenv("ALL_PROXY", "http://10.255.255.1:9/")
    with guarded_client(allow_private=True, timeout=3) as client:
        response = client.post(f"http://127.0.0.1:{receiver_port}/", content=b"{}")
    assert response.status_code == 200


def test_the_guarded_client_times_out_after_ten_seconds_by_default() -> None:
    with guarded_client(allow_private=False) as client:
        assert client.timeout == httpx.Timeout(10.0)
        assert client.follow_redirects is False


@pytest.fixture
def dribbling_port() -> Iterator[int]:
    """A receiver that answers a byte every 0.2 s: each read is quick, the answer never ends
    in time."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" * 100:
                if stop.is_set():
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.2)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    server.close()


def test_an_answer_that_trickles_in_is_cut_off_at_the_timeout_whole(dribbling_port: int) -> None:
    started = time.monotonic()
    with (
        guarded_client(allow_private=True, timeout=1.0) as client,
        pytest.raises(httpx.TimeoutException),
    ):
        client.post(f"http://127.0.0.1:{dribbling_port}/", content=b"{}")
    # Every read is under the per-read timeout; only the attempt's one deadline stops it.
    assert time.monotonic() - started < 2.0
