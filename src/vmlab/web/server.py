"""The dashboard's HTTP server: the page, its assets, the live feed and full screenshots.

Endpoints:

    GET /                   the page (assets/index.html, with the title filled in)
    GET /static/{name}      app.js and style.css from assets/, nothing else (no CDN: the
                            machines this runs on may have no internet)
    GET /ws                 WebSocket: one JSON `state` message (the StatusBoard snapshot),
                            then one JSON `event` message per event: the history first, then
                            live events
    GET /screenshot/{node}  the node's latest screen as a full-size PNG; 404 for an unknown
                            node or before the first screen. Served from memory, so no path
                            the client sends reaches the filesystem.

aiohttp, not Starlette: it serves HTTP and WebSockets in one package on an event loop we
already own (the Env's), started and stopped with `AppRunner`; Starlette would need uvicorn,
which expects to own the loop and the process's signals.

Binding: 127.0.0.1 by default. Port 0 means a port derived from the test's name
(`stable_port`, so a rerun keeps its URL and an open tab reconnects), or any free port if
that one is taken. What the events mean is web/status.py's concern.
"""
from __future__ import annotations

import asyncio
import html
import json
import logging
import zlib
from importlib import resources

from aiohttp import WSMsgType, web

from ..errors import ConfigError, EnvironmentProblem
from .eventbus import EventBus
from .status import StatusBoard

__all__ = ["DashboardServer", "parse_addr", "stable_port", "DEFAULT_HOST"]

log = logging.getLogger("vmlab.web.server")

DEFAULT_HOST = "127.0.0.1"
#: `stable_port` picks from [STABLE_PORT_BASE, STABLE_PORT_BASE + STABLE_PORT_SPAN), as
#: natlab's vmtest does; below the Linux ephemeral range (32768+) would be nicer, but that
#: range is what users of the Go system already know.
STABLE_PORT_BASE = 20000
STABLE_PORT_SPAN = 20000
_ASSETS = {"app.js": "application/javascript", "style.css": "text/css"}
#: A WebSocket send that takes longer than this means the tab is gone or stalled.
WS_SEND_TIMEOUT_S = 10.0


def stable_port(name: str) -> int:
    """A port derived from `name`: the same test gets the same URL on every run."""
    return zlib.crc32(name.encode()) % STABLE_PORT_SPAN + STABLE_PORT_BASE


def parse_addr(addr: str | None) -> tuple[str, int]:
    """`"HOST:PORT"`, `":PORT"`, `"HOST"`, `"PORT"` or ""/None to (host, port); port 0 means
    "derive one". IPv6 hosts go in brackets: `"[::1]:8080"`."""
    addr = (addr or "").strip()
    host, port_text = DEFAULT_HOST, "0"
    if addr.startswith("["):
        end = addr.find("]")
        if end < 0:
            raise ConfigError(f"web address {addr!r}: missing ']'; write [::1]:8080")
        host, rest = addr[1:end], addr[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"web address {addr!r}: expected ':PORT' after ']'")
            port_text = rest[1:]
    elif addr.isdigit():
        port_text = addr
    elif ":" in addr:
        host, _, port_text = addr.rpartition(":")
        host = host or DEFAULT_HOST
    elif addr:
        host = addr
    try:
        port = int(port_text or "0")
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(f"web address {addr!r}: port {port_text!r} is not 0-65535; "
                          f"use e.g. 127.0.0.1:8080, or :0 for a port derived from the test")
    return host, port


def _asset(name: str) -> bytes:
    return resources.files("vmlab.web").joinpath("assets", name).read_bytes()


class DashboardServer:
    """Serves one Env's dashboard on the running loop. ``url = await server.start()``"""

    def __init__(self, bus: EventBus, board: StatusBoard, *, title: str, addr: str | None):
        self.bus = bus
        self.board = board
        self.title = title
        self.host, self.port = parse_addr(addr)
        self.url: str | None = None
        self._runner: web.AppRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()
        self._page = _asset("index.html").decode().replace(
            "{{title}}", html.escape(title)).encode()
        self._assets = {name: _asset(name) for name in _ASSETS}

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/screenshot/{node}", self._screenshot)
        app.router.add_get("/static/{name}", self._static)
        return app

    async def start(self) -> str:
        """Bind and serve; returns the URL. Raises EnvironmentProblem if the address is not
        usable (with port 0 only if no port at all can be had)."""
        self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        ports = [self.port] if self.port else [stable_port(self.title), 0]
        last: OSError | None = None
        for port in ports:
            site = web.TCPSite(self._runner, self.host, port, reuse_address=True)
            try:
                await site.start()
            except OSError as err:
                last = err
                log.info("dashboard: %s:%d is not free (%s)", self.host, port, err.strerror)
                continue
            bound = self._runner.addresses[0][1] if self._runner.addresses else port
            self.port = bound
            shown = f"[{self.host}]" if ":" in self.host else self.host
            self.url = f"http://{shown}:{bound}/"
            log.info("dashboard at %s", self.url)
            return self.url
        await self._runner.cleanup()
        self._runner = None
        raise EnvironmentProblem(f"dashboard: cannot listen on {self.host}:{ports[0]}: {last}; "
                                 f"pick another address with --vmlab-web=HOST:PORT")

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close(message=b"server stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ handlers

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store"})

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._assets:
            raise web.HTTPNotFound(text=f"no asset {name!r}")
        return web.Response(body=self._assets[name], content_type=_ASSETS[name],
                            headers={"Cache-Control": "no-cache"})

    async def _screenshot(self, request: web.Request) -> web.Response:
        node = request.match_info["node"]
        if node not in self.board.nodes:
            raise web.HTTPNotFound(text=f"no node named {node!r}")
        png = self.board.full_screens.get(node)
        if png is None:
            raise web.HTTPNotFound(text=f"node {node!r} has no screenshot yet")
        return web.Response(body=png, content_type="image/png",
                            headers={"Cache-Control": "no-store"})

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=20)
        await ws.prepare(request)
        self._sockets.add(ws)
        sub = self.bus.subscribe()
        reader = asyncio.ensure_future(self._drain_client(ws))
        try:
            await ws.send_str(json.dumps({"type": "state", **sub.snapshot}))
            while not ws.closed:
                getter = asyncio.ensure_future(sub.get())
                done, _ = await asyncio.wait({getter, reader},
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break  # the client went away
                if sub.missed:
                    # This tab fell behind and lost events; its state is stale. Closing makes
                    # the page reconnect and start from a fresh snapshot.
                    await ws.close(code=1013, message=b"fell behind; reconnect")
                    break
                event = getter.result()
                await asyncio.wait_for(
                    ws.send_str(json.dumps({"type": "event", **event.to_json()})),
                    WS_SEND_TIMEOUT_S)
        except (ConnectionError, asyncio.TimeoutError) as err:
            log.info("dashboard: a page went away: %r", err)
        finally:
            reader.cancel()
            sub.close()
            self._sockets.discard(ws)
        return ws

    @staticmethod
    async def _drain_client(ws: web.WebSocketResponse) -> None:
        # The page sends nothing; reading notices its close (and answers pings).
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
