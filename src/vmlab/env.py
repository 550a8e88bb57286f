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
import os
import re
import shutil
import tempfile
import time
from ipaddress import IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Callable

from .driver import Driver
from .node import ExecResult, HttpResponse, Network, Node, PingResult
from .hostchan import HostChannel
from .errors import (AgentTimeout, ConfigError, NodeCrashed, StateError,
                     VmlabError, VmlabTimeout)
from .loop import LoopThread
from .steps import StepPlan, agent_step, image_step, launch_step, snapshot_step
from .web.dashboard import Dashboard
from .paths import cache_root, ensure_writable_dir
from .vnet.conditions import LinkConditions
from .vnet.core import NetworkConfig, VNet, router_mac
from .vnet.services import DNS_VIP, DRIVER_VIP, http_handler
from .vnet.internet import TEST_DRIVER_IPV4, TEST_DRIVER_PORT
from .vnet.nat import NatBehavior, NatType, Translation, resolve_nat
from .vnet.portmap import parse_port_mapping
from .vnet.runtime import VNetRuntime

__all__ = ["Env", "Network", "Node", "ExecResult", "PingResult", "HttpResponse"]

log = logging.getLogger("vmlab.env")

#: Default budget from QEMU start to agent connected, per node. Generous: a cold TCG boot
#: here takes a few seconds, but a loaded CI machine booting many nodes may take far longer.
AGENT_TIMEOUT_S = 120.0
#: Addresses vmlab keeps for its own VIPs; a WAN IP there would shadow them.
RESERVED_PUBLIC = ip_network("52.52.0.0/24")
#: Documentation prefixes (RFC 3849, RFC 5737) that services may use as public addresses.
_DOCUMENTATION_NETS = ("2001:db8::/32", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
#: A node name is the guest's hostname and a folder name.
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


def _check_flags(where: str, **flags) -> None:
    """Options that are on or off take a bool (or None for "the default"): a truthy string
    such as "no" would silently turn them on."""
    for option, value in flags.items():
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{where}: {option}={value!r} must be True or False")


# --------------------------------------------------------------------------- Env

class Env:
    """One test's networks and nodes. Use as a context manager; `close()` leaves nothing
    running. ``Env(name="test_nat")``"""

    def __init__(self, *, name: str = "vmlab", work_dir: Path | None = None,
                 agent_timeout_s: float = AGENT_TIMEOUT_S, keep_work_dir: bool = False,
                 accel: str | None = None, progress: Callable[[str], None] | None = None,
                 snapshots: bool | None = None, web: str | None = None, web_keep: bool = False,
                 pcap: bool | str | os.PathLike = False, nic_transport: str = "stream"):
        """`pcap`: record vnet's traffic as pcapng (True: `<work_dir>/vnet.pcapng`, kept with
        the work dir of a failed test; or a path). `nic_transport`: "stream" (default) or
        "dgram" (unix datagram sockets, one frame per datagram; such nodes cold-boot, since
        snapshots are saved with stream NICs)."""
        if nic_transport not in ("stream", "dgram"):
            raise ConfigError(f"Env: nic_transport={nic_transport!r}; use 'stream' or 'dgram'")
        _check_flags("Env", snapshots=snapshots, keep_work_dir=keep_work_dir, web_keep=web_keep)
        if accel not in (None, "kvm", "tcg"):
            raise ConfigError(f"Env: accel={accel!r}; use 'kvm', 'tcg' or None (probe the host)")
        if isinstance(agent_timeout_s, bool) or not isinstance(agent_timeout_s, (int, float)) \
                or not agent_timeout_s > 0:
            raise ConfigError(f"Env: agent_timeout_s={agent_timeout_s!r} must be a positive "
                              f"number of seconds")
        self.nic_transport = nic_transport
        self._pcap_arg = pcap
        #: the pcapng file, once started with pcap on
        self.pcap_path: Path | None = None
        self._pcap = None
        #: services and DNS names declared before start(), applied when vnet starts
        self._pending: list[Callable[[], None]] = []
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
        self._image_specs: dict[str, object] = {}  # node.image -> images.ImageSpec
        #: restore nodes from snapshots (default on; VMLAB_SNAPSHOTS=0 turns it off)
        self.snapshots = (os.environ.get("VMLAB_SNAPSHOTS", "1") != "0") if snapshots is None \
            else snapshots
        if nic_transport == "dgram":
            self.snapshots = False  # a snapshot's NICs are stream netdevs; see the docstring
        self.snapshot_entries: dict[tuple, object] = {}
        #: progress, node status and the live page (vmlab/web); `web` is the page's address
        #: ("127.0.0.1:0"), None for no server; `web_keep`: close() serves it until Ctrl-C
        self.dashboard = Dashboard(name, web=web, keep=web_keep)
        self.plan = StepPlan(on_change=self.dashboard.step_changed)

    def step(self, name: str):
        """The test step `name` on the dashboard's progress list (created pending if new).
        ``with env.step("alice pings bob"): ...`` marks it running, then done or failed."""
        return self.plan.add(name)

    def _step(self, name: str):
        return self.plan.add(name, framework=True)

    def _plan_steps(self) -> None:
        """Every framework step and node status, before anything runs (DESIGN.md)."""
        for image in sorted({n.image for n in self.nodes}):
            self._step(image_step(image))
        for group in sorted({self._snapshot_group(n) for n in self.nodes
                             if self._needs_snapshot(n)}):
            self._step(snapshot_step(*group))
        for node in self.nodes:
            self._step(launch_step(node.name))
            self._step(agent_step(node.name))
            self.dashboard.plan_node(node.name, node.image,
                                     [(net.name, node.macs[i], str(node.lan_ip(net)))
                                      for i, net in enumerate(node.networks)])

    def _start_dashboard(self) -> None:
        self._plan_steps()
        if self.dashboard.enabled:
            self._loop = LoopThread(f"vmlab-{self.name}")
            url = self._loop.call(self.dashboard.start_server(), 30, what="dashboard start")
            self._progress(f"dashboard: {url}")

    # ------------------------------------------------------------------ declaring

    def add_network(self, *, wan_ip: str | None = None, lan: str = "192.168.0.0/24",
                    nat: str | NatType | NatBehavior = "easy",
                    name: str | None = None, port_mapping=None, ipv6: str | None = None,
                    ipv4: bool = True, latency_ms: float = 0.0, jitter_ms: float = 0.0,
                    loss: float = 0.0, bandwidth_kbit: float | None = None) -> Network:
        """A LAN (`lan` prefix, gateway at its first address) behind a router whose WAN
        address is `wan_ip`, with NAT behaviour `nat`: a preset ("easy", "easyaf", "hard",
        "one2one", "none", "full_cone", "restricted_cone", "port_restricted_cone",
        "symmetric"; see vmlab.vnet.nat) or a `NatBehavior(...)` with any RFC 4787 flags.
        With "none" nothing is translated: the LAN prefix itself is routed on the internet.

        `port_mapping` turns on port-mapping servers on the gateway: "natpmp", "pcp", "upnp",
        a list of them, or True for all three (default: none, like natlab).
        ``env.add_network(wan_ip="2.1.1.1", nat="hard", port_mapping=["natpmp", "pcp"])``

        `ipv6` gives the LAN an IPv6 /64 ("2001:db8:1::/64"): the router advertises it, nodes
        take SLAAC addresses (`node.ipv6()`), and it is routed without NAT. `ipv4=False` makes
        the network IPv6-only (no `wan_ip`, no DHCPv4; IPv4 frames are dropped).
        `latency_ms`, `jitter_ms`, `loss` (0.0-1.0) and `bandwidth_kbit` condition every
        frame delivered to the network's NICs (see vmlab.vnet.conditions; change them later
        with `env.set_link_conditions`).
        ``env.add_network(ipv4=False, ipv6="2001:db8:2::/64", latency_ms=20)``"""
        self._require_state("new", "add_network")
        conditions = LinkConditions(latency_ms=latency_ms, jitter_ms=jitter_ms, loss=loss,
                                    bandwidth_kbit=bandwidth_kbit)
        lan6 = self._parse_lan6(ipv6)
        if not ipv4:
            return self._add_ipv6_only_network(name, lan6, conditions, wan_ip, nat, port_mapping)
        if wan_ip is None:
            raise ConfigError("add_network: an IPv4 network needs wan_ip (like '2.1.1.1'); for an "
                              "IPv6-only network pass ipv4=False and ipv6='2001:db8:1::/64'")
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
        kind = resolve_nat(nat)
        portmap = parse_port_mapping(port_mapping)
        if portmap and kind.translation is not Translation.NAPT:
            raise ConfigError(f"add_network: port_mapping needs a translating NAT, but nat="
                              f"{kind.name!r} already lets every inbound packet in; drop "
                              f"port_mapping or pick a NAT like 'easy'")
        if kind.translation is Translation.NONE:
            if wan in lan_net or lan_net.overlaps(RESERVED_PUBLIC):
                raise ConfigError(f"add_network: routed (nat='none') LAN {lan_net} would contain "
                                  f"{'its own WAN IP' if wan in lan_net else RESERVED_PUBLIC}; "
                                  f"pick a LAN prefix apart from both")
            for other in self.networks:
                if other.wan_ip is not None and other.wan_ip in lan_net:
                    raise ConfigError(f"add_network: routed (nat='none') LAN {lan_net} contains "
                                      f"{other.name}'s WAN IP {other.wan_ip}; pick another prefix")
        name = name or f"net{len(self.networks) + 1}"
        if lan_net.overlaps(RESERVED_PUBLIC):
            raise ConfigError(f"add_network: LAN {lan_net} overlaps {RESERVED_PUBLIC}, where vmlab "
                              f"runs its own services (the driver at {TEST_DRIVER_IPV4}, DNS, "
                              f"STUN); pick another prefix, like 192.168.1.0/24")
        for other in self.networks:
            if other.name == name:
                raise ConfigError(f"add_network: a network named {name!r} exists already")
            if other.lan is not None and other.lan.overlaps(lan_net):
                default = " (lan defaults to 192.168.0.0/24)" if lan == "192.168.0.0/24" else ""
                raise ConfigError(f"add_network: LAN {lan_net}{default} overlaps {other.name}'s "
                                  f"LAN {other.lan}; give each network its own prefix, e.g. "
                                  f"lan=\"192.168.{len(self.networks) + 1}.0/24\"")
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
            if other.lan is not None and wan in other.lan:
                raise ConfigError(f"add_network: WAN IP {wan} lies inside {other.name}'s LAN")
        self._check_lan6(name, lan6)
        net = Network(name, lan_net, wan, kind, len(self.networks) + 1, port_mapping=portmap,
                      lan6=lan6, conditions=None if conditions.is_ideal else conditions)
        self.networks.append(net)
        return net

    @staticmethod
    def _parse_lan6(ipv6: str | None) -> IPv6Network | None:
        if ipv6 is None:
            return None
        try:
            lan6 = ip_network(ipv6, strict=False)
        except ValueError as err:
            raise ConfigError(f"add_network: ipv6={ipv6!r}: {err}; give a /64 like "
                              f"'2001:db8:1::/64'") from None
        if lan6.version != 6 or lan6.prefixlen != 64:
            raise ConfigError(f"add_network: ipv6={ipv6!r} must be an IPv6 /64 (SLAAC needs "
                              f"one), like '2001:db8:1::/64'")
        if lan6.is_link_local or lan6.is_multicast or lan6.overlaps(ip_network("2052::/16")):
            raise ConfigError(f"add_network: ipv6 {lan6} is link-local, multicast or inside "
                              f"2052::/16, which vmlab keeps for its VIPs; pick another /64")
        return lan6

    def _check_lan6(self, name: str, lan6: IPv6Network | None) -> None:
        for other in self.networks:
            if other.name == name:
                raise ConfigError(f"add_network: a network named {name!r} exists already")
            if lan6 is not None and other.lan6 == lan6:
                raise ConfigError(f"add_network: IPv6 prefix {lan6} is already {other.name}'s")

    def _add_ipv6_only_network(self, name, lan6, conditions, wan_ip, nat, port_mapping) -> Network:
        if lan6 is None:
            raise ConfigError("add_network: ipv4=False needs ipv6='2001:db8:1::/64' (a network "
                              "needs some address family)")
        if wan_ip is not None or port_mapping:
            raise ConfigError("add_network: an IPv6-only network has no IPv4 WAN, NAT or port "
                              "mapping; drop wan_ip and port_mapping")
        name = name or f"net{len(self.networks) + 1}"
        self._check_lan6(name, lan6)
        net = Network(name, None, None, resolve_nat(nat), len(self.networks) + 1, lan6=lan6,
                      conditions=None if conditions.is_ideal else conditions)
        self.networks.append(net)
        return net

    def add_node(self, *networks: Network, image="appliance", name: str | None = None,
                 memory_mb: int | None = None, cold_boot: bool = False, no_agent: bool = False,
                 provision=None) -> Node:
        """A VM from `image` with one NIC on each of `networks`, in order. It is restored from
        the image's snapshot unless `cold_boot` (or the Env has snapshots off).

        `image`: a name ("appliance", "debian") or a `vmlab.ImageSpec` (extra Debian packages,
        a cloud qcow2 by URL). `memory_mb`: the guest's RAM, by default what the image asks
        for (256 MB; a cloud image 512). `no_agent`: the node boots and takes its address but runs no
        agent (exec/ping/... raise; `env.lan_ping` reaches it). `provision`: a
        `vmlab.Provision` run once when the (disk image's) snapshot is prepared.
        ``env.add_node(lan, image="debian", provision=Provision("web", commands=[...]))``"""
        self._require_state("new", "add_node")
        _check_flags("add_node", cold_boot=cold_boot, no_agent=no_agent)
        from .images import ImageSpec, as_spec, list_images
        if not isinstance(image, (str, ImageSpec)):
            raise ConfigError(f"add_node: image={image!r} must be an image name like 'debian' "
                              f"or a vmlab.ImageSpec")
        if name is not None and (not isinstance(name, str) or not _NODE_NAME.match(name)):
            raise ConfigError(f"add_node: name={name!r} must be 1-63 letters, digits, '-' or "
                              f"'_', starting with a letter or digit (it is the guest's "
                              f"hostname and a folder in the work directory)")
        from .snapshot.provision import Provision
        if isinstance(image, ImageSpec):
            spec = image
            image = spec.name
            self._image_specs[image] = spec
        elif isinstance(image, str) and image in [k.name for k in list_images()]:
            self._image_specs[image] = as_spec(image)
        if provision is not None:
            if not isinstance(provision, Provision):
                raise ConfigError(f"add_node: provision must be a vmlab.Provision, not "
                                  f"{type(provision).__name__}")
            if image in self._image_specs and not self._image_specs[image].disk:
                raise ConfigError(f"add_node: image {image!r} cannot be provisioned: provisioning "
                                  f"runs over SSH in a disk image; use image='debian'")
            for other in self.nodes:
                if (other.provision is not None and other.provision.name == provision.name
                        and other.provision.digest != provision.digest):
                    raise ConfigError(f"add_node: node {other.name!r} already has a different "
                                      f"Provision named {provision.name!r}; one name, one step: "
                                      f"rename one of them")
        if not networks:
            raise ConfigError("add_node: a node needs at least one network; "
                              "pass the Network returned by env.add_network(...)")
        for net in networks:
            if not isinstance(net, Network) or net not in self.networks:
                raise ConfigError(f"add_node: {net!r} is not a network of this Env; "
                                  f"use the value env.add_network(...) returned")
        if memory_mb is not None and (isinstance(memory_mb, bool) or not isinstance(memory_mb, int)
                                      or not 64 <= memory_mb <= 65536):
            raise ConfigError(f"add_node: memory_mb={memory_mb!r} must be an int from 64 to "
                              f"65536 (MiB)")
        if len(set(map(id, networks))) != len(networks):
            raise ConfigError("add_node: the same network is given twice")
        known = [kind.name for kind in list_images()]
        if image not in self._image_specs:
            raise ConfigError(f"add_node: unknown image {image!r}; known images: {', '.join(known)}")
        num = len(self.nodes) + 1
        if num > 150:
            raise ConfigError("add_node: at most 150 nodes per Env")
        name = name or f"node{num}"
        if any(n.name == name for n in self.nodes):
            raise ConfigError(f"add_node: a node named {name!r} exists already")
        for net in networks:
            if net.nat.translation is Translation.ONE2ONE and net.nodes:
                raise ConfigError(f"add_node: network {net.name!r} has a one2one NAT, which maps "
                                  f"its WAN IP to exactly one node ({net.nodes[0].name}); "
                                  f"add another network for {name!r}")
        if memory_mb is None:
            memory_mb = self._image_specs[image].memory_mb
        node = Node(self, name, num, networks, image, memory_mb, cold_boot=cold_boot,
                    no_agent=no_agent, provision=provision)
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
            self._start_dashboard()
            self._start()
        except BaseException as err:
            self.plan.fail_running(err)
            self._state = "failed"
            if self.work_dir is not None and any(self.work_dir.iterdir()):
                # The consoles and QEMU logs are what explains a failed start: keep them
                # (the error message points into this directory).
                self.keep_work_dir = True
                log.warning("start failed; keeping %s for inspection", self.work_dir)
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
            with self._step(image_step(image)):
                self.images[image] = ensure_image(self._image_specs[image])
            self.dashboard.image_ready(image, str(getattr(self.images[image], "os", "") or ""))
        for node in self.nodes:
            node.os = self.images[node.image].os
            if node.name in self.dashboard.board.nodes:
                self.dashboard.board.nodes[node.name].os = node.os
        self._loop = self._loop or LoopThread(f"vmlab-{self.name}")
        self._loop.call(self._async_start(accel_name), None, what="Env.start")

    async def _async_start(self, accel: str) -> None:
        self._driver = Driver()
        self._vnet = VNet(on_event=self.dashboard.on_vnet_event)
        self._driver.on_connect = self.dashboard.on_agent_connect
        self._driver.on_disconnect = self.dashboard.on_agent_disconnect
        self._runtime = VNetRuntime(self._vnet)
        if self._pcap_arg:
            self._open_pcap()
        for net in self.networks:
            self._vnet.add_network(NetworkConfig(net.name, net.lan, net.wan_ip, net.nat, net.num,
                                                   port_mapping=net.port_mapping, lan6=net.lan6,
                                                   ipv4=net.ipv4, conditions=net.conditions))
        self._runtime.serve_tcp(TEST_DRIVER_IPV4, TEST_DRIVER_PORT, self._driver.handle,
                                "test driver")
        # IPv6 has no NAT to get past, so the driver's IPv6 VIP is an ordinary VIP service.
        self._runtime.serve_tcp_vip(DRIVER_VIP.ipv6, TEST_DRIVER_PORT, self._driver.handle,
                                    "test driver (IPv6)")
        for apply in self._pending:
            apply()
        self._pending.clear()
        await self._ensure_snapshots(accel)
        self._progress(f"starting {len(self.nodes)} node(s) in parallel")
        results = await asyncio.gather(*(self._boot(node, accel) for node in self.nodes),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            if len(errors) == 1:
                raise errors[0]
            raise VmlabError("several nodes failed to start:\n" +
                             "\n".join(f"- {e}" for e in errors)) from errors[0]

    def _snapshot_group(self, node: Node) -> tuple:
        label = node.image + (f"+{node.provision.name}" if node.provision else "")
        return (label, len(node.networks), node.memory_mb)

    def _needs_snapshot(self, node: Node) -> bool:
        # A disk image's agent is installed while its snapshot is prepared, so even its
        # cold-booted nodes need the entry (they boot its frozen disk).
        return self._image_specs[node.image].disk or (self.snapshots and not node.cold_boot)

    async def _ensure_snapshots(self, accel: str) -> None:
        """Make sure a snapshot exists for every (image, NIC count, RAM) the nodes need. A
        snapshot that cannot be made never fails the test: its nodes cold-boot instead."""
        from .snapshot import SnapshotSpec, ensure_snapshot
        from .vm.accel import qemu_binary
        groups = {self._snapshot_group(n): n for n in self.nodes if self._needs_snapshot(n)}
        for group in sorted(groups):
            _label, nics, memory_mb = group
            node = groups[group]
            spec = SnapshotSpec(self.images[node.image], nics, memory_mb, accel, qemu_binary(),
                                provision=node.provision)
            step = self._step(snapshot_step(*group)).begin()
            try:
                entry = await ensure_snapshot(spec, self._progress)
            except Exception as err:
                step.end(err)
                log.warning("snapshot %s cannot serve (%s); its nodes cold-boot", spec.name, err)
                self._progress(f"snapshot {spec.name}: cannot serve ({err}); cold-booting")
                self.snapshot_entries[group] = (spec, None, str(err))
                continue
            step.end()
            self.snapshot_entries[group] = (spec, entry, None)

    def _node_config(self, node: Node, *, static: bool) -> dict:
        """What the node's agent gets over the host channel."""
        import time as _time
        cfg: dict = {"hostname": node.name, "time": _time.time(),
                     "seed": base64.b64encode(os.urandom(32)).decode(),
                     "driver": f"{TEST_DRIVER_IPV4}:{TEST_DRIVER_PORT}",
                     "driver6": f"[{DRIVER_VIP.ipv6}]:{TEST_DRIVER_PORT}"}
        if node.no_agent:
            cfg["agent"] = False  # apply the network config, then never dial the driver
        if not static:
            cfg["dhcp"] = True
            return cfg
        # An IPv6-only NIC gets no IPv4 ("ip" None): the agent only sets its MAC and brings
        # it up, and SLAAC does the rest.
        # No interface names: NIC i is the guest's i-th NIC in PCI order, whatever it is called
        # there (eth0 here, ens3 in a cloud image with udev's predictable names).
        nics = [{"mac": node.macs[i],
                 "ip": str(node.lan_ip(net)) if net.ipv4 else None,
                 "mask": str(net.lan.netmask) if net.ipv4 else None,
                 "gw": str(net.gateway) if i == 0 and net.ipv4 else None,
                 "gw_mac": router_mac(net.num)}
                for i, net in enumerate(node.networks)]
        first = nics[0]
        first_net = node.networks[0]
        dns = ([str(DNS_VIP.ipv4)] if first_net.ipv4 else []) + \
            ([str(DNS_VIP.ipv6)] if first_net.lan6 is not None else [])
        cfg.update(nics=nics, ip=first["ip"], mask=first["mask"], gw=first["gw"],
                   mac=first["mac"], dns=dns)
        return cfg

    async def _boot(self, node: Node, accel: str) -> None:
        image = self.images[node.image]
        run_dir = self.work_dir / node.name
        run_dir.mkdir()
        sockets = [run_dir / f"nic{i}.sock" for i in range(len(node.networks))]
        hostchan_path = run_dir / "hostchan.sock"
        loop = asyncio.get_running_loop()
        vm_ready: asyncio.Future = loop.create_future()

        async def link_up(info: dict) -> None:
            # The guest has its own MAC and address now: only then plug the cable, so no
            # frame leaves it with the snapshot's MAC.
            vm = await vm_ready
            for i in range(len(node.networks)):
                await vm.set_link(i, True)
            if node.boot_mode == "restore":
                for i, net in enumerate(node.networks):
                    self.dashboard.nic_static(node.name, node.macs[i], str(node.lan_ip(net)))

        for i, net in enumerate(node.networks):
            port = self._vnet.add_port(f"{node.name}/eth{i}", net.name, node.macs[i],
                                       node.lan_ip(net) if net.ipv4 else None)
            if self.nic_transport == "dgram":
                # vnet binds its end first, so QEMU's first frames find it
                self._runtime.attach_dgram(port, self._dgram_peer(sockets[i]), sockets[i])
            else:
                self._runtime.attach_stream(port, sockets[i])
        node.hostchan = HostChannel(node.name, hostchan_path, on_applied=link_up)
        node.hostchan.start()
        node.started_at = loop.time()
        launch = self._step(launch_step(node.name)).begin()
        self.dashboard.node_state(node.name, "launching")
        snap = self.snapshot_entries.get(self._snapshot_group(node))
        if snap is not None and snap[1] is not None and not node.cold_boot and self.snapshots:
            node.vm = await self._restore(node, snap, run_dir, sockets, hostchan_path)
        elif snap is not None and snap[2] is not None:
            node.fallback_reason = snap[2]
        if node.vm is None:
            await self._cold_boot(node, accel, image, run_dir, sockets, hostchan_path)
        vm_ready.set_result(node.vm)
        launch.end()
        self.dashboard.node_state(node.name, "booting", f"{node.name}: {node.boot_mode} boot")
        self.dashboard.watch_node(node.name, node.vm)
        with self._step(agent_step(node.name)):
            await self._wait_agent(node)
        node.boot_to_agent_s = loop.time() - node.started_at
        self._progress(f"{node.name}: {'configured (no agent)' if node.no_agent else 'agent connected'}"
                       f" {node.boot_to_agent_s:.2f} s after "
                       f"{'restore' if node.boot_mode == 'restore' else 'cold boot'} began")

    async def _restore(self, node: Node, snap: tuple, run_dir: Path, sockets: list[Path],
                       hostchan_path: Path):
        from .snapshot import RestoreFailed, restore
        spec, entry, _ = snap
        problem = entry.problem()
        if problem is not None:
            reason = f"snapshot {entry.key} unusable: {problem}"
        else:
            node.hostchan.set_config(self._node_config(node, static=True))
            try:
                vm = await restore(spec, entry, name=node.name, run_dir=run_dir,
                                   nic_sockets=sockets, hostchan=hostchan_path)
                node.boot_mode = "restore"
                return vm
            except RestoreFailed as err:
                reason = str(err)
                if err.state_broken:
                    entry.mark_bad(reason)
                    problem = reason
        if problem is not None:
            entry.mark_bad(problem)
        node.fallback_reason = reason
        log.warning("%s: cold-booting instead of restoring: %s", node.name, reason)
        self._progress(f"{node.name}: cold-booting instead of restoring ({reason})")
        for stale in run_dir.glob("*.sock"):
            stale.unlink(missing_ok=True)
        return None

    async def _cold_boot(self, node: Node, accel: str, image, run_dir: Path,
                         sockets: list[Path], hostchan_path: Path) -> None:
        from .vm.qemu import NicConfig, QemuVm, VmConfig
        node.hostchan.set_config(self._node_config(node, static=False))
        disk = None
        if image.disk is not None:
            # The agent is installed while the snapshot is prepared: a disk image cold-boots
            # the snapshot's frozen disk (on its own overlay), never the bare image.
            from .snapshot.prepare import make_overlay
            snap = self.snapshot_entries.get(self._snapshot_group(node))
            if snap is None or snap[1] is None or snap[1].disk is None:
                why = snap[2] if snap is not None and snap[2] else "no snapshot entry"
                raise VmlabError(f"node {node.name!r}: image {node.image!r} cold-boots from its "
                                 f"snapshot's disk, where the agent is installed, but the "
                                 f"snapshot could not be prepared ({why}); fix that first")
            disk = run_dir / "disk.qcow2"
            await make_overlay(snap[1].disk, disk)
        cfg = VmConfig(name=node.name, kernel=image.kernel, initrd=image.initrd,
                       kernel_args=image.kernel_args, memory_mb=node.memory_mb,
                       nics=tuple(NicConfig(node.macs[i], sockets[i],
                                            dgram_peer=self._dgram_peer(sockets[i])
                                            if self.nic_transport == "dgram" else None)
                                  for i in range(len(sockets))),
                       run_dir=run_dir, accel=accel, hostchan_socket=hostchan_path,
                       disk=disk, seed=image.seed,
                       extra_kernel_args=f"vmlab.hostname={node.name} "
                                         f"vmlab.driver={TEST_DRIVER_IPV4}:{TEST_DRIVER_PORT} "
                                         f"vmlab.driver6=[{DRIVER_VIP.ipv6}]:{TEST_DRIVER_PORT}"
                       # an image without a kernel of ours (cloud) boots its own bootloader
                       if image.kernel is not None else "")
        node.vm = QemuVm(cfg)
        node.boot_mode = "cold"
        await node.vm.start()

    async def _wait_agent(self, node: Node) -> None:
        """Wait for the node's agent; fail at once if QEMU exits, or with the console tail
        when the budget runs out."""
        # A node without an agent is ready once its config is applied (its address is set).
        ready = (node.hostchan.applied.wait() if node.no_agent
                 else self._driver.wait_connected(node.mac))
        try:
            finished, _ = await node.vm.until(ready, self.agent_timeout_s)
        except asyncio.TimeoutError:
            finished = None
        if finished:
            return
        tail = node.console_tail(30)
        if finished is False:
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
            try:  # before the kills: a screendump of a dying QEMU only makes noise
                self._loop.call(self.dashboard.stop_feeds(), 10, what="dashboard feeds")
            except Exception as err:
                errors.append(f"dashboard: {err}")
            for node in self.nodes:
                try:
                    if node.vm is not None:
                        self._loop.call(node.vm.kill(), 15, what=f"{node.name}: kill")
                        self.dashboard.node_state(node.name, "stopped")
                    if node.hostchan is not None:
                        self._loop.call(node.hostchan.close(), 5, what=f"{node.name}: host channel")
                except Exception as err:  # keep going: every node must be released
                    errors.append(f"{node.name}: {err}")
            if self._runtime is not None:
                try:
                    self._loop.call(self._runtime.close(), 10, what="vnet close")
                except Exception as err:
                    errors.append(f"vnet: {err}")
            if self._pcap is not None:
                try:
                    self._loop.call(_sync(self._pcap.close), 10, what="pcap close")
                except Exception as err:
                    errors.append(f"pcap: {err}")
            self.plan.fail_running("the Env was closed while this step ran")
            try:
                self.dashboard.finish(self._loop, failed=self._state == "failed",
                                      say=self._progress)
            except Exception as err:
                errors.append(f"dashboard: {err}")
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

    def lan_ping(self, target: "Node | str", *, source: "Node | str | None" = None,
                 network: Network | None = None, timeout_s: float = 60.0,
                 interval_s: float = 0.5) -> PingResult:
        """Ping `target`'s LAN address until one echo comes back or `timeout_s` runs out.

        From `source` (a node with an agent, using the guest's own ping), or by default from
        vnet itself: the LAN's gateway sends ICMP echo requests, so this reaches a node that
        runs no agent. Raises VmlabTimeout (with the last attempt's output) if none answered.
        ``env.lan_ping("bob")``, ``env.lan_ping(bob, source=alice)``"""
        target = self.node(target) if isinstance(target, str) else target
        source = self.node(source) if isinstance(source, str) else source
        for role, node in (("target", target), ("source", source or target)):
            if node not in self.nodes:
                raise ConfigError(f"lan_ping: {role} {node!r} is not a node of this Env; pass "
                                  f"a Node from env.add_node(...) or its name")
        if isinstance(network, str):
            network = next((n for n in self.networks if n.name == network), None) or network
        net = network or (next((n for n in target.networks if n in source.networks), None)
                          if source is not None else target.networks[0])
        if net is None or net not in target.networks:
            on = ", ".join(n.name for n in target.networks)
            raise ConfigError(f"lan_ping: " + (f"network {getattr(net, 'name', net)!r} is not one "
                                                f"{target.name} is on"
                                                if network is not None else
                                                f"{target.name} and {source.name} share no LAN")
                              + f"; {target.name} is on: {on}; pass network= one of them")
        if source is not None and net not in source.networks:
            raise ConfigError(f"lan_ping: source {source.name} is not on {net.name}, where "
                              f"{target.name}'s address is; pick a source on {net.name}")
        address = target.lan_ip(net)
        if source is None and address.version == 6:
            raise ConfigError(f"lan_ping: {net.name} is IPv6-only and vnet's own echo requests "
                              f"are ICMPv4; pass source= a node with an agent on {net.name}")
        self._require_started("lan_ping")
        deadline = time.monotonic() + timeout_s
        sent = 0
        last = "(nothing tried)"
        while True:
            remaining = deadline - time.monotonic()
            if source is not None:
                r = source.ping(address, count=1, timeout_s=max(1.0, min(5.0, remaining)))
                sent += r.transmitted
                if r.ok:
                    return PingResult(str(address), sent, r.received,
                                      round(1 - r.received / sent, 6), r.rtts_ms, r.output)
                last = r.output.strip()[-500:]
            else:
                rtt = self._loop.call(
                    self._runtime.ping(net.name, address, timeout_s=max(0.2, min(2.0, remaining))),
                    10, what="lan_ping")
                sent += 1
                if rtt is not None:
                    return PingResult(str(address), sent, 1, round(1 - 1 / sent, 6),
                                      (rtt * 1000,), f"reply from {address} via {net.name}'s "
                                                     f"gateway after {sent} echo(es)")
                last = f"no reply to echo {sent} from {net.gateway}"
            if time.monotonic() + interval_s > deadline:
                raise VmlabTimeout(f"lan_ping: {target.name} ({address}) did not answer "
                                   f"{'from ' + source.name if source else 'vnet'} within "
                                   f"{timeout_s:.0f} s ({sent} echoes); last: {last}", last=last)
            time.sleep(interval_s)

    def vnet_drops(self) -> dict[str, int]:
        """Why vnet dropped packets so far (reason -> count)."""
        self._require_started("vnet_drops")
        return self._loop.call(_sync(self._vnet.drops), 5, what="vnet_drops")

    # ------------------------------------------------------------------ vnet knobs and services

    @staticmethod
    def _dgram_peer(qemu_socket: Path) -> Path:
        """vnet's end of a datagram NIC, beside QEMU's."""
        return qemu_socket.with_suffix(".vnet")

    def _open_pcap(self) -> None:
        from .vnet.pcap import PcapWriter
        path = self.work_dir / "vnet.pcapng" if self._pcap_arg is True else Path(self._pcap_arg)
        loop = asyncio.get_running_loop()
        self._pcap = PcapWriter(open(path, "wb"), epoch_offset=time.time() - loop.time())
        self._vnet.set_tap(self._pcap)
        self.pcap_path = path

    def flush_pcap(self) -> Path:
        """Write out what the capture buffered, so tshark can read the file now."""
        self._require_started("flush_pcap")
        if self._pcap is None:
            raise ConfigError("flush_pcap: this Env records no pcap; create it with Env(pcap=True)")
        self._loop.call(_sync(self._pcap.flush), 10, what="pcap flush")
        return self.pcap_path

    def _vnet_call(self, what: str, fn: Callable[[], object]) -> None:
        """Run `fn` on the loop now if vnet runs, else when it starts."""
        if self._state == "started":
            self._loop.call(_sync(fn), 10, what=what)
        elif self._state in ("new", "starting"):
            self._pending.append(fn)
        else:
            self._require_state("new", what)

    def _public_ip(self, ip, what: str):
        try:
            addr = ip_address(str(ip))
        except ValueError as err:
            raise ConfigError(f"{what}: {err}; give a public address like '8.8.8.8'") from None
        # Documentation ranges (2001:db8::/32, TEST-NET-1/2/3) count as public here: tests
        # use them for exactly this, and ipaddress calls them private.
        documentation = any(addr in ip_network(n) for n in _DOCUMENTATION_NETS
                            if ip_network(n).version == addr.version)
        if ((addr.is_private and not documentation) or addr.is_loopback or addr.is_multicast
                or addr.is_unspecified or addr.is_link_local):
            raise ConfigError(f"{what}: {addr} is not a public address; services live on the "
                              f"simulated internet, so pick one like 8.8.8.8 or 2001:4860::8888")
        reserved = RESERVED_PUBLIC if addr.version == 4 else ip_network("2052::/16")
        if addr in reserved:
            raise ConfigError(f"{what}: {addr} is in {reserved}, which vmlab keeps for its own "
                              f"VIPs; pick another address")
        for net in self.networks:
            if addr == net.wan_ip or (net.lan6 is not None and addr in net.lan6):
                raise ConfigError(f"{what}: {addr} belongs to network {net.name!r}; run the "
                                  f"server on a node there instead, or pick a free address")
        return addr

    def serve_tcp(self, ip: str, port: int, handler) -> None:
        """Serve TCP on public address ip:port of the simulated internet. Every connection
        runs ``await handler(stream)`` on the Env's loop; `stream` has asyncio-stream methods
        (read, readline, readexactly, write, drain, close) and `stream.remote` is the client
        as the internet sees it (after NAT). Reached from any network, through any NAT,
        over IPv4 or IPv6.

            async def echo(stream):
                stream.write(await stream.readline()); await stream.drain()
            env.serve_tcp("8.8.8.8", 7, echo)
        """
        addr = self._public_ip(ip, "serve_tcp")

        async def run(stream, _router) -> None:
            await handler(stream)
        self._vnet_call("serve_tcp", lambda: self._runtime.serve_tcp_vip(
            addr, port, run, f"test TCP service {addr}:{port}"))

    def serve_udp(self, ip: str, port: int, handler) -> None:
        """Answer UDP to public address ip:port: ``handler(payload, (src_ip, src_port))``
        runs on the Env's loop for each datagram and returns the reply payload or None.
        It must not block. ``env.serve_udp("9.9.9.9", 9999, lambda data, src: data.upper())``"""
        addr = self._public_ip(ip, "serve_udp")
        self._vnet_call("serve_udp", lambda: self._runtime.serve_udp(
            addr, port, handler, f"test UDP service {addr}:{port}"))

    def serve_http(self, ip: str, port: int, routes: dict) -> None:
        """Serve HTTP/1.1 on public address ip:port. `routes` maps a path to a body (str or
        bytes), a `vmlab.vnet.services.HttpResponse`, or a function of the
        `HttpRequest` returning either (it may be async).
        ``env.serve_http("8.8.4.4", 80, {"/": "hello", "/echo": lambda req: req.body})``"""
        handle = http_handler(routes)
        self.serve_tcp(ip, port, handle)

    def dns_register(self, name: str, *addresses: str, split: bool = False) -> None:
        """Make vnet's resolver (DHCP's DNS server) answer `name` with `addresses` (A and
        AAAA records). With `split=True` only the split-zone resolver
        (`vmlab.vnet.services.SPLIT_DNS_VIP`) knows the name; the default one says NXDOMAIN.
        ``env.dns_register("web.test", "8.8.4.4", "2001:db8:9::1")``"""
        try:
            ips = [ip_address(str(a)) for a in addresses]
        except ValueError as err:
            raise ConfigError(f"dns_register: {err}") from None

        def apply() -> None:
            self._vnet.dns_records.register(name, ips, split=split)
        # Validate now (a bad name should fail at the call), on a scratch table.
        from .vnet.dns import DnsRecords
        try:
            DnsRecords().register(name, ips, split=split)
        except ValueError as err:
            raise ConfigError(f"dns_register: {err}") from None
        self._vnet_call("dns_register", apply)

    def set_link_conditions(self, network: Network, *, latency_ms: float = 0.0,
                            jitter_ms: float = 0.0, loss: float = 0.0,
                            bandwidth_kbit: float | None = None) -> None:
        """Change a network's link conditions now (all zero: an ideal link again); frames in
        flight keep their delivery times. ``env.set_link_conditions(home, loss=0.2)``"""
        cond = LinkConditions(latency_ms=latency_ms, jitter_ms=jitter_ms, loss=loss,
                              bandwidth_kbit=bandwidth_kbit)
        if network not in self.networks:
            raise ConfigError(f"set_link_conditions: {network!r} is not a network of this Env")
        network.conditions = None if cond.is_ideal else cond
        self._vnet_call("set_link_conditions",
                        lambda: self._vnet.set_conditions(network.name, cond))

    def blackhole(self, network: Network, on: bool = True) -> None:
        """Cut (or with on=False restore) `network`'s WAN in both directions and both
        families. The LAN, DHCP, DNS and the driver keep working.
        ``env.blackhole(home); ...; env.blackhole(home, on=False)``"""
        if network not in self.networks:
            raise ConfigError(f"blackhole: {network!r} is not a network of this Env")
        self._vnet_call("blackhole", lambda: self._vnet.set_blackhole(network.name, on))


async def _sync(fn):
    return fn()
