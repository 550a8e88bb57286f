"""Node and Network: the handles a test holds, and what agent calls return.

`Env.add_network` and `Env.add_node` make them; after `Env.start()` a Node's methods reach
its guest through the agent (`exec`, `ping`, `http_get`, `status`, `put`, `get`) or through
QEMU (`set_link`). The machinery that boots nodes lives in `env.py`.
"""
from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .errors import AgentError, CommandFailed, ConfigError, StateError
from .hostchan import HostChannel
from .vnet.conditions import LinkConditions
from .vnet.core import node_mac
from .vnet.ipv6 import eui64_address
from .vnet.nat import NatBehavior
from .vnet.portmap import PortMapProtocol

if TYPE_CHECKING:
    from .env import Env

__all__ = ["Network", "Node", "ExecResult", "PingResult", "HttpResponse"]


# --------------------------------------------------------------------------- results

@dataclass(frozen=True)
class ExecResult:
    """What a command did in the guest. `stdout`/`stderr` are decoded as UTF-8 (with
    replacement); the exact bytes are in `stdout_bytes`/`stderr_bytes`."""
    argv: object
    exit_code: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    timed_out: bool
    duration_s: float

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


@dataclass(frozen=True)
class PingResult:
    address: str
    transmitted: int
    received: int
    loss: float
    rtts_ms: tuple[float, ...]
    output: str

    @property
    def ok(self) -> bool:
        return self.received > 0


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict
    body: bytes


# --------------------------------------------------------------------------- handles

@dataclass(eq=False)
class Network:
    """A LAN behind a router with `wan_ip` on the simulated internet and a NAT behaviour."""
    name: str
    lan: IPv4Network
    wan_ip: IPv4Address
    nat: NatBehavior
    num: int
    nodes: list["Node"] = field(default_factory=list, repr=False)
    #: port-mapping protocols its gateway serves (empty: none)
    port_mapping: frozenset[PortMapProtocol] = frozenset()
    #: the LAN's IPv6 /64, routed without NAT (None: no IPv6)
    lan6: IPv6Network | None = None
    #: latency, jitter, loss, bandwidth on delivery to its NICs, as declared (None: ideal)
    conditions: LinkConditions | None = None

    @property
    def ipv4(self) -> bool:
        """False for an IPv6-only network (then `lan`, `wan_ip` and `gateway` are None)."""
        return self.lan is not None

    @property
    def gateway(self) -> IPv4Address | None:
        return self.lan.network_address + 1 if self.lan is not None else None

    def __repr__(self) -> str:
        v6 = f" ipv6={self.lan6}" if self.lan6 is not None else ""
        return f"<Network {self.name} {self.lan} wan={self.wan_ip} nat={self.nat.name}{v6}>"


class Node:
    """A VM on one or more networks. Created by `Env.add_node`; usable after `Env.start`."""

    def __init__(self, env: "Env", name: str, num: int, networks: Sequence[Network],
                 image: str, memory_mb: int, cold_boot: bool = False, no_agent: bool = False,
                 provision=None):
        self.env = env
        self.name = name
        self.num = num
        self.networks = list(networks)
        self.image = image
        self.memory_mb = memory_mb
        self.macs = [node_mac(num, i) for i in range(len(networks))]
        self.vm = None  # the QemuVm, once started
        self.boot_to_agent_s: float | None = None
        self.started_at: float | None = None
        #: "restore" (from a snapshot) or "cold" (booted from scratch), once started
        self.boot_mode: str | None = None
        #: why a snapshot could not serve this node, if it cold-booted instead
        self.fallback_reason: str | None = None
        self.cold_boot = cold_boot
        self.hostchan: HostChannel | None = None
        #: runs no agent: it boots, takes its address and answers ICMP (see Env.lan_ping)
        self.no_agent = no_agent
        #: the provisioning step its snapshot was prepared with (vmlab.Provision), if any
        self.provision = provision
        #: the guest OS, from the image (set by Env.start)
        self.os: str = ""

    def __repr__(self) -> str:
        return f"<Node {self.name} #{self.num} on {[n.name for n in self.networks]}>"

    @property
    def mac(self) -> str:
        return self.macs[0]

    def lan_ip(self, network: Network | None = None) -> IPv4Address | IPv6Address:
        """This node's address on `network` (default: its first): IPv4, or on an IPv6-only
        network its IPv6 address."""
        net = network or self.networks[0]
        if net not in self.networks:
            raise ConfigError(f"node {self.name!r} is not on network {net.name!r}")
        if net.lan is None:
            return self.ipv6(net)
        return net.lan.network_address + 100 + self.num

    def ipv6(self, network: Network | None = None) -> IPv6Address:
        """This node's SLAAC address on `network` (default: its first): the network's /64
        plus the EUI-64 of the NIC's MAC. ``bob.ping(alice.ipv6())``"""
        net = network or self.networks[0]
        if net not in self.networks:
            raise ConfigError(f"node {self.name!r} is not on network {net.name!r}")
        if net.lan6 is None:
            raise ConfigError(f"network {net.name!r} has no IPv6; give add_network(ipv6=...)")
        from .vnet.frames import mac_bytes
        return eui64_address(net.lan6, mac_bytes(self.macs[self.networks.index(net)]))

    def set_link(self, up: bool, *, nic: int = 0) -> None:
        """Plug (True) or pull (False) the cable of NIC `nic`: the guest sees carrier change
        (QMP set_link) and vnet passes no frame either way while it is out.
        ``alice.set_link(False); ...; alice.set_link(True)``"""
        self.env._require_started(f"{self.name}: set_link")
        if not 0 <= nic < len(self.networks):
            raise ConfigError(f"node {self.name!r} has NICs 0..{len(self.networks) - 1}, not {nic}")
        port = f"{self.name}/eth{nic}"

        async def flip() -> None:
            self.env._vnet.set_link(port, up)
            await self.vm.set_link(nic, up)
        self.env._loop.call(flip(), 15, what=f"{self.name}: set_link")

    def wan_ip(self) -> IPv4Address:
        """The public address this node's traffic leaves its first network with."""
        return self.networks[0].wan_ip

    # ------------------------------------------------------------------ agent calls

    def _agent(self, method: str, path: str, body: dict | None, timeout_s: float) -> dict:
        self.env._require_started(f"{self.name}: {path.strip('/')}")
        if self.no_agent:
            raise StateError(f"node {self.name!r} was added with no_agent=True, so it runs no "
                             f"agent and {path.strip('/')} cannot reach it; ping it with "
                             f"env.lan_ping({self.name!r}) or drop no_agent")
        return self.env._loop.call(
            self.env._driver.request(self.mac, method, path, body, timeout_s=timeout_s),
            timeout_s + 10, what=f"{self.name}: {method} {path}")

    def exec(self, cmd: str | Sequence[str], *, timeout_s: float = 60.0, check: bool = False,
             stdin: bytes | None = None, env: dict[str, str] | None = None) -> ExecResult:
        """Run a command in the guest and return its exit code and output.

        A string runs through the guest's shell; a list runs as argv. With ``check=True`` a
        non-zero exit raises `CommandFailed`. ``node.exec("ip -br addr").stdout``
        """
        body: dict = {"timeout_s": timeout_s}
        if isinstance(cmd, str):
            body["shell"] = cmd
        elif isinstance(cmd, (list, tuple)) and cmd and all(
                isinstance(a, (str, os.PathLike)) for a in cmd):
            body["argv"] = [os.fspath(a) for a in cmd]
        else:
            raise ConfigError(f"exec: {cmd!r} must be a shell command line (str) or a non-empty "
                              f"argv list of str, like ['ip', '-br', 'addr']")
        if stdin is not None:
            body["stdin_b64"] = base64.b64encode(stdin).decode()
        if env:
            body["env"] = env
        r = self._agent("POST", "/exec", body, timeout_s + 15)
        result = ExecResult(cmd, int(r["exit_code"]), base64.b64decode(r["stdout_b64"]),
                            base64.b64decode(r["stderr_b64"]), bool(r.get("timed_out")),
                            float(r.get("duration_s", 0.0)))
        if check and not result.ok:
            raise CommandFailed(self.name, cmd, result.exit_code, result.stdout, result.stderr)
        return result

    def ping(self, address: str | IPv4Address, *, count: int = 3, timeout_s: float = 5.0,
             interval_s: float = 0.2) -> PingResult:
        """Ping `address` from this node with the guest's own ping (real ICMP).
        ``assert node.ping("192.168.1.1").ok``"""
        r = self._agent("POST", "/ping", {"address": str(address), "count": count,
                                         "timeout_s": timeout_s, "interval_s": interval_s},
                        timeout_s + count * interval_s + 10)
        return PingResult(str(address), int(r["transmitted"]), int(r["received"]),
                          float(r["loss"]), tuple(r.get("rtts_ms", ())), r.get("output", ""))

    def http_get(self, url: str, *, timeout_s: float = 10.0) -> HttpResponse:
        """Fetch `url` from inside the guest. Raises AgentError if the fetch itself failed."""
        r = self._agent("POST", "/http_get", {"url": url, "timeout_s": timeout_s}, timeout_s + 10)
        if "error" in r:
            raise AgentError(f"{self.name}: GET {url} failed in the guest: {r['error']}")
        return HttpResponse(int(r["status"]), dict(r.get("headers", {})),
                            base64.b64decode(r.get("body_b64", "")))

    def status(self) -> dict:
        """The agent's view: hostname, interfaces and addresses, uptime, agent version, and
        `os` (what the guest says it runs)."""
        return self._agent("GET", "/status", None, 15)

    def put(self, local: str | os.PathLike, remote: str, *, timeout_s: float = 120.0) -> None:
        """Copy a local file or folder to `remote` (an absolute guest path; a folder's content
        lands under it). ``node.put("app/", "/opt/app")``"""
        from .files import pack
        dest, tar_b64 = pack(Path(local), remote)
        self._agent("POST", "/files/put", {"path": dest, "tar_b64": tar_b64}, timeout_s)

    def get(self, remote: str, local: str | os.PathLike, *, timeout_s: float = 120.0) -> Path:
        """Copy a guest file or folder `remote` to `local`, which it creates or replaces.
        ``node.get("/var/log/app.log", tmp_path / "app.log")``"""
        from .files import guest_path, unpack
        r = self._agent("POST", "/files/get", {"path": guest_path(remote, "get")}, timeout_s)
        return unpack(r["tar_b64"], Path(local))

    def console_tail(self, lines: int = 40) -> str:
        return self.vm.console_tail(lines) if self.vm is not None else ""

    @property
    def console_path(self) -> Path | None:
        return self.vm.console_path if self.vm is not None else None
