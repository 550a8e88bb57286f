"""NodeStatus and the StatusBoard: the dashboard's current state, derived from events.

The board is the EventBus's reducer: every published event is applied here (under the bus's
lock), so the state a new page receives always matches the events it has not seen yet. It
owns one `NodeStatus` per node (addresses, DHCP progress, agent state, the last
`CONSOLE_LINES` console lines, the latest screenshot), the step list and the test status.
It does not produce events (the Env, vnet callbacks and web/feeds.py do) and does no I/O.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .eventbus import Event, EventKind

__all__ = ["NicStatus", "NodeStatus", "TestStatus", "StatusBoard", "CONSOLE_LINES"]

#: Console lines kept per node (the page shows these; console.log keeps everything).
CONSOLE_LINES = 200

_DHCP_TEXT = {
    EventKind.DHCP_DISCOVER: "Discover sent",
    EventKind.DHCP_OFFER: "Offered {ip}",
    EventKind.DHCP_REQUEST: "Requesting {ip}",
    EventKind.DHCP_ACK: "Got {ip}",
    EventKind.DHCP_NAK: "Refused (NAK)",
}


@dataclass
class NicStatus:
    network: str
    mac: str
    ip: str          # the address vnet will hand out (node N is host 100+N)
    dhcp: str = "waiting"

    def to_json(self) -> dict:
        return {"network": self.network, "mac": self.mac, "ip": self.ip, "dhcp": self.dhcp}


@dataclass
class NodeStatus:
    """What the dashboard shows of one node."""
    name: str
    image: str
    os: str = ""
    nics: list[NicStatus] = field(default_factory=list)
    state: str = "planned"     # planned, launching, booting, running, exited, stopped
    agent: str = "not connected"
    console: deque[str] = field(default_factory=lambda: deque(maxlen=CONSOLE_LINES))
    screenshot: str | None = None   # data:image/jpeg;base64,... thumbnail
    screenshot_at: float | None = None
    screen_size: tuple[int, int] | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "image": self.image, "os": self.os,
                "nics": [n.to_json() for n in self.nics], "state": self.state,
                "agent": self.agent, "console": list(self.console),
                "screenshot": self.screenshot, "screenshot_at": self.screenshot_at,
                "screen_size": self.screen_size}


@dataclass
class TestStatus:
    state: str = "running"    # running, passed, failed
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    detail: str = ""

    def to_json(self) -> dict:
        return {"state": self.state, "started_at": self.started_at,
                "ended_at": self.ended_at, "detail": self.detail}


class StatusBoard:
    """Current state of one Env's run. Give `apply` and `snapshot` to the EventBus."""

    def __init__(self, title: str):
        self.title = title
        self.nodes: dict[str, NodeStatus] = {}
        self.steps: dict[int, dict] = {}
        self.test = TestStatus()
        self.last_seq = 0
        # Full-size PNG of each node's latest screen, served by /screenshot/{node}; kept
        # out of the events (a thumbnail is enough for the page).
        self.full_screens: dict[str, bytes] = {}

    def add_node(self, status: NodeStatus) -> None:
        """Register a node before its events arrive (done when the Env plans its steps)."""
        self.nodes.setdefault(status.name, status)

    def _nic(self, node: NodeStatus, mac: str) -> NicStatus | None:
        for nic in node.nics:
            if nic.mac == mac:
                return nic
        return None

    def apply(self, ev: Event) -> None:
        self.last_seq = ev.seq
        node = self.nodes.get(ev.node)
        kind = ev.kind
        if kind is EventKind.STEP_CHANGED:
            self.steps[int(ev.data["key"])] = dict(ev.data)
        elif kind is EventKind.TEST_STATUS:
            self.test.state = ev.data.get("state", self.test.state)
            self.test.detail = ev.message
            if self.test.state != "running":
                self.test.ended_at = ev.time
        elif node is None:
            return
        elif kind is EventKind.CONSOLE:
            node.console.append(ev.message)
        elif kind in _DHCP_TEXT:
            nic = self._nic(node, ev.data.get("mac", ""))
            if nic is not None:
                nic.dhcp = _DHCP_TEXT[kind].format(ip=ev.data.get("ip") or "?")
        elif kind is EventKind.NIC_STATIC:
            nic = self._nic(node, ev.data.get("mac", ""))
            if nic is not None:
                nic.dhcp = f"static {ev.data.get('ip')} (host channel)"
        elif kind is EventKind.AGENT_CONNECTED:
            node.agent = "connected"
            node.state = "running"
        elif kind is EventKind.AGENT_DISCONNECTED:
            node.agent = "disconnected"
        elif kind is EventKind.NODE_STATE:
            node.state = ev.data.get("state") or node.state
            node.os = ev.data.get("os") or node.os
        elif kind is EventKind.SCREENSHOT:
            node.screenshot = ev.data.get("thumbnail")
            node.screenshot_at = ev.time
            size = ev.data.get("size")
            node.screen_size = tuple(size) if size else None

    def snapshot(self) -> dict[str, Any]:
        """The state as one JSON-able dict; `seq` is the last event it includes."""
        return {"title": self.title, "seq": self.last_seq, "test": self.test.to_json(),
                "steps": sorted(self.steps.values(),
                                key=lambda s: (not s.get("framework"), s["key"])),
                "nodes": [n.to_json() for n in self.nodes.values()]}
