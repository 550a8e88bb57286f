"""Dashboard: the one object an Env talks to for progress, status and the web page.

It owns the `EventBus`, the `StatusBoard` (each node's `NodeStatus`), the Env's `StepPlan`
hook, the per-node feeds (console, screen) and, when asked for, the `DashboardServer`. The
Env calls it at the points where things happen (`publish`, `on_vnet_event`,
`on_agent_connect`, `watch_node`, ...); the bus and board exist even without a server, so
the hooks cost nothing to call. Everything async runs on the Env's loop.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Callable, Iterable

from ..steps import Step
from .eventbus import Event, EventBus, EventKind
from .feeds import SCREENDUMP_FORMAT, Screen, poll_screen, tail_console
from .status import NicStatus, NodeStatus, StatusBoard

__all__ = ["Dashboard"]

log = logging.getLogger("vmlab.web")

_DHCP_KINDS = {"discover": EventKind.DHCP_DISCOVER, "offer": EventKind.DHCP_OFFER,
               "request": EventKind.DHCP_REQUEST, "ack": EventKind.DHCP_ACK,
               "nak": EventKind.DHCP_NAK}


class Dashboard:
    """``dash = Dashboard("test_nat", web="127.0.0.1:0")``; `web=None`: events only."""

    def __init__(self, title: str, *, web: str | None = None, keep: bool = False):
        self.title = title
        self.web = web
        self.keep = keep
        self.board = StatusBoard(title)
        self.bus = EventBus(reducer=self.board.apply, snapshot=self.board.snapshot)
        self.server = None
        self._mac_to_node: dict[str, str] = {}
        self._feeds: dict[str, list[asyncio.Task]] = {}

    @property
    def enabled(self) -> bool:
        return self.web is not None

    @property
    def url(self) -> str | None:
        return self.server.url if self.server is not None else None

    # ------------------------------------------------------------------ producers

    def publish(self, kind: EventKind, node: str = "", message: str = "", **data) -> Event:
        return self.bus.publish(Event(kind, node, message, data))

    def plan_node(self, name: str, image: str, nics: Iterable[tuple[str, str, str]],
                  os: str = "") -> None:
        """Register a node before it boots: `nics` are (network, mac, ip)."""
        nic_list = [NicStatus(net, mac.lower(), str(ip)) for net, mac, ip in nics]
        for nic in nic_list:
            self._mac_to_node[nic.mac] = name
        self.board.add_node(NodeStatus(name, image, os, nic_list))

    def node_state(self, node: str, state: str, message: str = "") -> None:
        self.publish(EventKind.NODE_STATE, node, message or f"{node} {state}", state=state)

    def image_ready(self, image: str, os_text: str) -> None:
        """Tell the nodes of `image` what OS it holds (known once the image is built)."""
        for node in self.board.nodes.values():
            if node.image == image and os_text:
                self.publish(EventKind.NODE_STATE, node.name, f"{node.name}: {os_text}",
                             os=os_text)

    def step_changed(self, step: Step) -> None:
        """The StepPlan's listener."""
        info = step.to_json()
        text = {"pending": "planned", "running": "started", "done": "done",
                "failed": "failed"}[info["status"]]
        detail = f" in {info['elapsed_s']:.1f} s" if step.status.value in ("done", "failed") else ""
        err = f": {step.error}" if step.error else ""
        self.publish(EventKind.STEP_CHANGED, "", f"{step.name}: {text}{detail}{err}", **info)

    def on_vnet_event(self, kind: str, data: object) -> None:
        """vnet's `on_event` (runs on the loop, inside vnet's frame handling: stays cheap)."""
        if kind != "dhcp" or not isinstance(data, dict):
            return
        ev_kind = _DHCP_KINDS.get(str(data.get("kind", "")).lower())
        mac = str(data.get("mac", "")).lower()
        if ev_kind is None:
            return
        ip = data.get("ip")
        self.publish(ev_kind, self._mac_to_node.get(mac, ""),
                     f"DHCP {ev_kind.value.split('_')[1]} {mac}{' ' + ip if ip else ''}",
                     network=data.get("network"), mac=mac, ip=ip)

    def on_agent_connect(self, mac: str, hello: object) -> None:
        node = self._mac_to_node.get(mac.lower(), "")
        version = getattr(hello, "version", "")
        self.publish(EventKind.AGENT_CONNECTED, node, f"agent connected (version {version})",
                     mac=mac)

    def on_agent_disconnect(self, mac: str) -> None:
        node = self._mac_to_node.get(mac.lower(), "")
        self.publish(EventKind.AGENT_DISCONNECTED, node, "agent disconnected", mac=mac)

    def nic_static(self, node: str, mac: str, ip: str) -> None:
        self.publish(EventKind.NIC_STATIC, node, f"address {ip} set over the host channel",
                     mac=mac.lower(), ip=str(ip))

    def test_status(self, state: str, detail: str = "") -> None:
        """`state`: running, passed, failed or finished."""
        elapsed = time.time() - self.board.test.started_at
        self.publish(EventKind.TEST_STATUS, "", detail or f"{state} after {elapsed:.1f} s",
                     state=state, elapsed_s=elapsed)

    # ------------------------------------------------------------------ loop side

    async def start_server(self) -> str | None:
        """Start the web server if the dashboard is enabled; returns its URL."""
        if not self.enabled or self.server is not None:
            return self.url
        from .server import DashboardServer  # aiohttp is only needed with the dashboard
        self.server = DashboardServer(self.bus, self.board, title=self.title, addr=self.web)
        return await self.server.start()

    def watch_node(self, node: str, vm) -> None:
        """Start the console and screen feeds of a node whose QEMU is running (no-op when the
        dashboard is disabled: nobody would look)."""
        if not self.enabled or node in self._feeds:
            return
        loop = asyncio.get_running_loop()
        console: Path = vm.console_path
        dump = Path(vm.cfg.run_dir) / "screen.ppm"

        async def screendump(path: str) -> None:
            await vm.qmp("screendump", filename=path, format=SCREENDUMP_FORMAT)

        def on_screen(screen: Screen) -> None:
            self.board.full_screens[node] = screen.png
            self.publish(EventKind.SCREENSHOT, node, "screenshot", thumbnail=screen.thumbnail,
                         size=list(screen.size))

        self._feeds[node] = [
            loop.create_task(tail_console(console, node, self.bus.publish),
                             name=f"vmlab-console-{node}"),
            loop.create_task(poll_screen(node, screendump, dump, on_screen),
                             name=f"vmlab-screen-{node}"),
        ]

    async def stop_feeds(self) -> None:
        tasks = [t for ts in self._feeds.values() for t in ts]
        self._feeds.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def finish(self, loop, *, failed: bool, say: Callable[[str], None]) -> None:
        """At Env.close, after the nodes are gone (sync; `loop` is the Env's LoopThread):
        publish the final status unless a test did, then, with `keep`, serve the page until
        Ctrl-C, so a failed run can be inspected; then stop the server."""
        if self.board.test.state == "running":
            self.test_status("failed" if failed else "finished")
        if self.server is None:
            return
        if self.keep:
            say(f"dashboard: keeping {self.url} up for inspection; press Ctrl-C to stop it")
            try:
                while True:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                say("dashboard: stopping")
        loop.call(self.stop_server(), 10, what="dashboard stop")

    async def stop_server(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None
