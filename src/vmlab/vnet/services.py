"""Services on virtual IPs: vmlab's own VIP table, and the helpers tests use to put their
own servers on the simulated internet.

Owns: the `VIPS` table of vmlab's well-known VIPs (name, IPv4, IPv6; checked for collisions
at import, after natlab's vip.go: the integer x means 52.52.0.x and 2052::x), the
`UdpHandler` contract, and `http_handler`, which turns a table of routes into a TCP
handler speaking enough HTTP/1.1 for tests (GET/POST/..., Content-Length bodies,
keep-alive).

Leaves to others: routing packets to VIPs and answering ICMP echo for them (`internet.py`),
the TCP state machine (`tcp.py`, `tcp_stream.py`), running handlers on the loop
(`runtime.py`) and DNS (`dns.py`).
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Awaitable, Callable, Union

__all__ = ["Vip", "VIPS", "vip", "DRIVER_VIP", "DNS_VIP", "SPLIT_DNS_VIP", "UdpHandler",
           "HttpRequest", "HttpResponse", "http_handler", "MAX_HTTP_HEADER_BYTES",
           "MAX_HTTP_BODY_BYTES"]

log = logging.getLogger("vmlab.vnet.services")

IPAddress = Union[IPv4Address, IPv6Address]


@dataclass(frozen=True)
class Vip:
    """One of vmlab's own virtual IPs: a DNS name and an address per family."""
    name: str
    ipv4: IPv4Address
    ipv6: IPv6Address

    @property
    def addresses(self) -> tuple[IPAddress, IPAddress]:
        return (self.ipv4, self.ipv6)


#: name -> Vip; every address appears once (checked by `_register`)
VIPS: dict[str, Vip] = {}


def _register(name: str, x: int) -> Vip:
    """VIP number x: 52.52.0.x and 2052::x, x written in decimal in both (so 53 is
    52.52.0.53 and 2052::53), as natlab's newVIP does."""
    v = Vip(name, IPv4Address(f"52.52.0.{x}"), IPv6Address(f"2052::{x}"))
    for other in VIPS.values():
        if other.name == name or set(other.addresses) & set(v.addresses):
            raise RuntimeError(f"VIP {name!r} collides with {other}")
    VIPS[name] = v
    return v


#: The test driver's VIP (agents dial it; `internet.TEST_DRIVER_IPV4` is its IPv4).
DRIVER_VIP = _register("driver.vmlab.test", 2)
#: The resolver DHCP and router advertisements hand out (UDP and TCP port 53).
DNS_VIP = _register("dns.vmlab.test", 53)
#: A second resolver that answers only names registered for the split zone, so getting an
#: answer proves the query took the split route.
SPLIT_DNS_VIP = _register("split-dns.vmlab.test", 54)


def vip(name: str) -> Vip:
    try:
        return VIPS[name]
    except KeyError:
        raise KeyError(f"no VIP named {name!r}; known: {', '.join(VIPS)}") from None


#: A UDP service: called on vnet's loop with (payload, (src_ip, src_port)) for each datagram
#: to its ip:port; returns the reply payload (sent back to the source) or None. It must not
#: block: vnet stands still while it runs.
UdpHandler = Callable[[bytes, tuple], Union[bytes, None]]


# --------------------------------------------------------------------------- HTTP

#: Bounds on one request, so a guest cannot make a test's server buffer without limit.
MAX_HTTP_HEADER_BYTES = 64 * 1024
MAX_HTTP_BODY_BYTES = 16 * 1024 * 1024

_REASONS = {200: "OK", 201: "Created", 204: "No Content", 301: "Moved Permanently",
            302: "Found", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 500: "Internal Server Error"}


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str          # without the query string
    query: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    remote: tuple       # (ip, port) as the server sees it: after NAT


@dataclass(frozen=True)
class HttpResponse:
    status: int = 200
    body: bytes | str = b""
    headers: dict[str, str] = field(default_factory=dict)


#: What a route may be: a fixed body, a response, or a function (sync or async) of the
#: request returning either.
Route = Union[bytes, str, HttpResponse, Callable[[HttpRequest], object]]


def http_handler(routes: dict[str, Route]) -> Callable[[object], Awaitable[None]]:
    """A TCP handler serving `routes` ({"/path": route}) over HTTP/1.1.

    A route is bytes/str (200 with that body), an `HttpResponse`, or a callable taking the
    `HttpRequest` and returning either (it may be async). Unknown paths get 404, and a route
    that raises gets 500 with the error text, which is logged too.

        env.serve_http("8.8.4.4", 80, {"/": "hello", "/echo": lambda r: r.body})
    """
    routes = dict(routes)
    for path in routes:
        if not path.startswith("/"):
            raise ValueError(f"HTTP route {path!r} must start with '/'")

    async def handle(stream) -> None:
        while True:
            request = await _read_request(stream)
            if request is None:
                return
            response = await _respond(routes, request)
            body = response.body.encode() if isinstance(response.body, str) else response.body
            headers = {"Content-Type": "text/plain; charset=utf-8", **response.headers,
                       "Content-Length": str(len(body))}
            keep = request.headers.get("connection", "").lower() != "close"
            if not keep:
                headers["Connection"] = "close"
            head = f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Status')}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
            stream.write(head.encode("latin-1") + (b"" if request.method == "HEAD" else body))
            await stream.drain()
            if not keep:
                return

    return handle


async def _respond(routes: dict[str, Route], request: HttpRequest) -> HttpResponse:
    route = routes.get(request.path)
    if route is None:
        return HttpResponse(404, f"no route for {request.path}; routes: {', '.join(routes)}\n")
    try:
        result = route(request) if callable(route) else route
        if inspect.isawaitable(result):
            result = await result
    except Exception as err:  # the test's own handler failed: answer 500 and say why
        log.exception("HTTP route %s failed", request.path)
        return HttpResponse(500, f"route {request.path} raised {err!r}\n")
    if isinstance(result, HttpResponse):
        return result
    if isinstance(result, (bytes, str)):
        return HttpResponse(200, result)
    if result is None:
        return HttpResponse(204)
    return HttpResponse(500, f"route {request.path} returned {type(result).__name__}; "
                             f"return bytes, str or HttpResponse\n")


async def _read_request(stream) -> HttpRequest | None:
    line = await stream.readline()
    if not line:
        return None
    total = len(line)
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        stream.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        return None
    headers: dict[str, str] = {}
    while True:
        h = await stream.readline()
        total += len(h)
        if total > MAX_HTTP_HEADER_BYTES:
            stream.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return None
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        length = -1
    if length < 0 or length > MAX_HTTP_BODY_BYTES:
        stream.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        return None
    body = await stream.readexactly(length) if length else b""
    path, _, query = parts[1].partition("?")
    return HttpRequest(parts[0].upper(), path, query, headers, body, stream.remote)


def run_udp_handler(handler: UdpHandler, payload: bytes, src: tuple) -> bytes | None:
    """Call a test's UDP handler; a failure is logged and answered with silence."""
    try:
        reply = handler(payload, src)
    except Exception:
        log.exception("UDP service handler failed on a datagram from %s", src)
        return None
    if reply is not None and not isinstance(reply, (bytes, bytearray)):
        log.error("UDP service handler returned %s; return bytes or None", type(reply).__name__)
        return None
    return bytes(reply) if reply is not None else None

