"""Env: one test's world of networks and nodes, and the handles tests use.

A test declares networks and nodes, then `start()` builds what is missing (images),
starts vnet and the driver on the Env's loop, boots every node in parallel and waits
until each agent has dialled in. `Network` and `Node` are the user-facing handles; the
runtime objects live in vnet and the QEMU backend.

    with Env() as env:
        lan = env.add_network(wan_ip="2.1.1.1", lan="192.168.1.0/24", nat="easy")
        a = env.add_node(lan)
        b = env.add_node(lan)
        env.start()
        assert a.ping(b.lan_ip()).received > 0
"""
from __future__ import annotations

import asyncio
import base64
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network
from pathlib import Path
from typing import Callable, Sequence

from .driver import Driver
from .errors import (AgentTimeout, CommandFailed, ConfigError, NodeCrashed, StateError,
                     VmlabError, VmlabTimeout)
from .loop import LoopThread
from .paths import cache_root, ensure_writable_dir
from .vnet.core import NetworkConfig, VNet, node_mac
from .vnet.internet import TEST_DRIVER_IPV4, TEST_DRIVER_PORT
from .vnet.nat import NatType, parse_nat_type
from .vnet.runtime import VNetRuntime

__all__ = ["Env", "Network", "Node", "ExecResult", "PingResult", "HttpResponse"]

log = logging.getLogger("vmlab.env")

#: Default budget from QEMU start to agent connected, per node. Generous: a cold TCG boot
#: here takes a few seconds, but a loaded CI machine booting many nodes may take far longer.
AGENT_TIMEOUT_S = 120.0
#: Addresses vmlab keeps for its own VIPs; a WAN IP there would shadow them.
RESERVED_PUBLIC = ip_network("52.52.0.0/24")


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
    nat: NatType
    num: int
    nodes: list["Node"] = field(default_factory=list, repr=False)

    @property
    def gateway(self) -> IPv4Address:
        return self.lan.network_address + 1

    def __repr__(self) -> str:
        return f"<Network {self.name} {self.lan} wan={self.wan_ip} nat={self.nat.value}>"


class Node:
    """A VM on one or more networks. Created by `Env.add_node`; usable after `Env.start`."""

    def __init__(self, env: "Env", name: str, num: int, networks: Sequence[Network],
                 image: str, memory_mb: int):
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

    def __repr__(self) -> str:
        return f"<Node {self.name} #{self.num} on {[n.name for n in self.networks]}>"

    @property
    def mac(self) -> str:
        return self.macs[0]

    def lan_ip(self, network: Network | None = None) -> IPv4Address:
        """This node's address on `network` (default: its first)."""
        net = network or self.networks[0]
        if net not in self.networks:
            raise ConfigError(f"node {self.name!r} is not on network {net.name!r}")
        return net.lan.network_address + 100 + self.num

    def wan_ip(self) -> IPv4Address:
        """The public address this node's traffic leaves its first network with."""
        return self.networks[0].wan_ip

    # ------------------------------------------------------------------ agent calls

    def _agent(self, method: str, path: str, body: dict | None, timeout_s: float) -> dict:
        self.env._require_started(f"{self.name}: {path.strip('/')}")
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
        else:
            body["argv"] = list(cmd)
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
            from .errors import AgentError
            raise AgentError(f"{self.name}: GET {url} failed in the guest: {r['error']}")
        return HttpResponse(int(r["status"]), dict(r.get("headers", {})),
                            base64.b64decode(r.get("body_b64", "")))

    def status(self) -> dict:
        """The agent's view: hostname, interfaces and addresses, uptime, agent version."""
        return self._agent("GET", "/status", None, 15)

    def console_tail(self, lines: int = 40) -> str:
        return self.vm.console_tail(lines) if self.vm is not None else ""

    @property
    def console_path(self) -> Path | None:
        return self.vm.console_path if self.vm is not None else None


# --------------------------------------------------------------------------- Env

class Env:
    """One test's networks and nodes. Use as a context manager; `close()` leaves nothing
    running. ``Env(name="test_nat")``"""

    def __init__(self, *, name: str = "vmlab", work_dir: Path | None = None,
                 agent_timeout_s: float = AGENT_TIMEOUT_S, keep_work_dir: bool = False,
                 accel: str | None = None, progress: Callable[[str], None] | None = None):
        self.name = name
        self.networks: list[Network] = []
        self.nodes: list[Node] = []
        self.agent_timeout_s = agent_timeout_s
        self.keep_work_dir = keep_work_dir
        self._accel_override = accel
        self._progress = progress or (lambda msg: log.info("%s", msg))
        self._work_dir_arg = work_dir
        self.work_dir: Path | None = None
        self._state = "new"  # new -> starting -> started -> closed (or failed -> closed)
        self._loop: LoopThread | None = None
        self._driver: Driver | None = None
        self._vnet: VNet | None = None
        self._runtime: VNetRuntime | None = None
        self.accel = None
        self.images: dict[str, object] = {}

    # ------------------------------------------------------------------ declaring

    def add_network(self, *, wan_ip: str, lan: str = "192.168.0.0/24", nat: str | NatType = "easy",
                    name: str | None = None) -> Network:
        """A LAN (`lan` prefix, gateway at its first address) behind a router whose WAN
        address is `wan_ip`, with NAT behaviour `nat` ("easy", "hard", "one2one")."""
        self._require_state("new", "add_network")
        try:
            lan_net = ip_network(lan, strict=False)
            wan = ip_address(wan_ip)
        except ValueError as err:
            raise ConfigError(f"add_network: {err}; give wan_ip like '2.1.1.1' and lan like "
                              f"'192.168.1.0/24'") from None
        if lan_net.version != 4 or wan.version != 4:
            raise ConfigError("add_network: only IPv4 LANs and WAN IPs are supported so far")
        if lan_net.prefixlen > 24:
            raise ConfigError(f"add_network: LAN {lan_net} is too small; vmlab puts node N at "
                              f"host address 100+N, so use a /24 or larger")
        kind = parse_nat_type(nat)
        name = name or f"net{len(self.networks) + 1}"
        for other in self.networks:
            if other.name == name:
                raise ConfigError(f"add_network: a network named {name!r} exists already")
            if other.lan.overlaps(lan_net):
                raise ConfigError(f"add_network: LAN {lan_net} overlaps {other.name}'s LAN "
                                  f"{other.lan}; give each network its own prefix")
            if other.wan_ip == wan:
                raise ConfigError(f"add_network: WAN IP {wan} is already {other.name}'s; "
                                  f"each network needs its own WAN IP")
        if wan in RESERVED_PUBLIC:
            raise ConfigError(f"add_network: WAN IP {wan} is in {RESERVED_PUBLIC}, which vmlab "
                              f"keeps for its own services (the driver is {TEST_DRIVER_IPV4})")
        if wan.is_private or wan.is_loopback or wan.is_multicast or wan.is_unspecified:
            raise ConfigError(f"add_network: WAN IP {wan} is not a public address; pick one "
                              f"like 2.1.1.1")
        for other in self.networks:
            if wan in other.lan:
                raise ConfigError(f"add_network: WAN IP {wan} lies inside {other.name}'s LAN")
        net = Network(name, lan_net, wan, kind, len(self.networks) + 1)
        self.networks.append(net)
        return net

    def add_node(self, *networks: Network, image: str = "appliance", name: str | None = None,
                 memory_mb: int = 256) -> Node:
        """A VM from `image` with one NIC on each of `networks`, in order."""
        self._require_state("new", "add_node")
        from .images import list_images
        if not networks:
            raise ConfigError("add_node: a node needs at least one network; "
                              "pass the Network returned by env.add_network(...)")
        for net in networks:
            if not isinstance(net, Network) or net not in self.networks:
                raise ConfigError(f"add_node: {net!r} is not a network of this Env; "
                                  f"use the value env.add_network(...) returned")
        if len(set(map(id, networks))) != len(networks):
            raise ConfigError("add_node: the same network is given twice")
        known = [kind.name for kind in list_images()]
        if image not in known:
            raise ConfigError(f"add_node: unknown image {image!r}; known images: {', '.join(known)}")
        num = len(self.nodes) + 1
        if num > 150:
            raise ConfigError("add_node: at most 150 nodes per Env")
        name = name or f"node{num}"
        if any(n.name == name for n in self.nodes):
            raise ConfigError(f"add_node: a node named {name!r} exists already")
        for net in networks:
            if net.nat == NatType.ONE2ONE and net.nodes:
                raise ConfigError(f"add_node: network {net.name!r} has a one2one NAT, which maps "
                                  f"its WAN IP to exactly one node ({net.nodes[0].name}); "
                                  f"add another network for {name!r}")
        node = Node(self, name, num, networks, image, memory_mb)
        for net in networks:
            net.nodes.append(node)
        self.nodes.append(node)
        return node

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(f"no node named {name!r}; nodes: {', '.join(n.name for n in self.nodes)}")

    # ------------------------------------------------------------------ lifecycle

    def _require_state(self, state: str, what: str) -> None:
        if self._state != state:
            hint = {"started": "declare networks and nodes before start()",
                    "closed": "create a new Env",
                    "new": "call env.start() first"}.get(self._state, "")
            raise StateError(f"{what}: the Env is {self._state}; {hint}")

    def _require_started(self, what: str) -> None:
        if self._state != "started":
            self._require_state("started", what)

    def start(self) -> None:
        """Build missing images, start vnet, boot every node in parallel, wait for agents."""
        self._require_state("new", "start")
        if not self.nodes:
            raise ConfigError("start: the Env has no nodes; add some with env.add_node(...)")
        self._state = "starting"
        try:
            self._start()
        except BaseException:
            self._state = "failed"
            self.close()
            raise
        self._state = "started"

    def _start(self) -> None:
        from .images import ensure_image
        from .vm.accel import choose_accel

        ensure_writable_dir(cache_root())
        self.work_dir = Path(tempfile.mkdtemp(prefix="vmlab-", dir=self._work_dir_arg))
        self.accel = choose_accel() if self._accel_override is None else self._accel_override
        accel_name = getattr(self.accel, "name", self.accel)
        self._progress(f"accelerator: {accel_name} ({getattr(self.accel, 'reason', 'given')})")
        for image in sorted({n.image for n in self.nodes}):
            self.images[image] = ensure_image(image)
        self._loop = LoopThread(f"vmlab-{self.name}")
        self._loop.call(self._async_start(accel_name), None, what="Env.start")

    async def _async_start(self, accel: str) -> None:
        self._driver = Driver()
        self._vnet = VNet()
        self._runtime = VNetRuntime(self._vnet)
        for net in self.networks:
            self._vnet.add_network(NetworkConfig(net.name, net.lan, net.wan_ip, net.nat, net.num))
        self._runtime.serve_tcp(TEST_DRIVER_IPV4, TEST_DRIVER_PORT, self._driver.handle,
                                "test driver")
        self._progress(f"booting {len(self.nodes)} node(s) in parallel")
        results = await asyncio.gather(*(self._boot(node, accel) for node in self.nodes),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            if len(errors) == 1:
                raise errors[0]
            raise VmlabError("several nodes failed to start:\n" +
                             "\n".join(f"- {e}" for e in errors)) from errors[0]

    async def _boot(self, node: Node, accel: str) -> None:
        from .vm.qemu import NicConfig, QemuVm, VmConfig

        image = self.images[node.image]
        run_dir = self.work_dir / node.name
        run_dir.mkdir()
        nics = []
        for i, net in enumerate(node.networks):
            sock = run_dir / f"nic{i}.sock"
            nics.append(NicConfig(mac=node.macs[i], socket_path=sock))
        cfg = VmConfig(name=node.name, kernel=image.kernel, initrd=image.initrd,
                       kernel_args=image.kernel_args, memory_mb=node.memory_mb, nics=tuple(nics),
                       run_dir=run_dir, accel=accel,
                       extra_kernel_args=f"vmlab.hostname={node.name} "
                                         f"vmlab.driver={TEST_DRIVER_IPV4}:{TEST_DRIVER_PORT}")
        loop = asyncio.get_running_loop()
        node.started_at = loop.time()
        node.vm = QemuVm(cfg)
        await node.vm.start()
        for i, net in enumerate(node.networks):
            port = self._vnet.add_port(f"{node.name}/eth{i}", net.name, node.macs[i],
                                       node.lan_ip(net))
            self._runtime.attach_stream(port, nics[i].socket_path)
        await self._wait_agent(node)
        node.boot_to_agent_s = loop.time() - node.started_at
        self._progress(f"{node.name}: agent connected after {node.boot_to_agent_s:.1f} s")

    async def _wait_agent(self, node: Node) -> None:
        """Wait for the node's agent; fail at once if QEMU exits, or with the console tail
        when the budget runs out."""
        connected = asyncio.ensure_future(self._driver.wait_connected(node.mac))
        exited = asyncio.ensure_future(node.vm.wait_exit(None))
        try:
            done, _ = await asyncio.wait({connected, exited}, timeout=self.agent_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (connected, exited):
                if not f.done():
                    f.cancel()
        if connected in done:
            return
        tail = node.console_tail(30)
        if exited in done:
            raise NodeCrashed(f"node {node.name!r}: QEMU exited (code {node.vm.returncode}) before "
                              f"its agent connected; console tail:\n{tail}")
        raise AgentTimeout(f"node {node.name!r}: agent did not connect within "
                           f"{self.agent_timeout_s:.0f} s; console ({node.console_path}) tail:\n"
                           f"{tail}", node.name, tail)

    def close(self) -> None:
        """Kill every node, stop vnet, remove the work dir (kept if `keep_work_dir`)."""
        if self._state == "closed":
            return
        errors: list[str] = []
        if self._loop is not None:
            for node in self.nodes:
                if node.vm is None:
                    continue
                try:
                    self._loop.call(node.vm.kill(), 15, what=f"{node.name}: kill")
                except Exception as err:  # keep going: every node must be released
                    errors.append(f"{node.name}: {err}")
            if self._runtime is not None:
                try:
                    self._loop.call(self._runtime.close(), 10, what="vnet close")
                except Exception as err:
                    errors.append(f"vnet: {err}")
            self._loop.stop()
        self._state = "closed"
        if self.work_dir is not None and not self.keep_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        if errors:
            raise VmlabError("errors while closing the Env:\n" + "\n".join(errors))

    def __enter__(self) -> "Env":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.work_dir is not None:
            self.keep_work_dir = True  # keep consoles for a failed test
            log.warning("keeping %s for inspection", self.work_dir)
        self.close()

    # ------------------------------------------------------------------ introspection

    def vnet_drops(self) -> dict[str, int]:
        """Why vnet dropped packets so far (reason -> count)."""
        self._require_started("vnet_drops")
        return self._loop.call(_sync(self._vnet.drops), 5, what="vnet_drops")


async def _sync(fn):
    return fn()
