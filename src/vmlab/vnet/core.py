"""VNet: the whole simulated network of one Env, as a pure state machine.

It owns the networks (switch + router each), the internet between them, and the ports
nodes' NICs plug into. Input is a frame from a port plus `now`; output is a list of
(port, frame) to send. No sockets and no clock here: `vnet/runtime.py` does the I/O.

Addressing is deterministic so tests and pcaps read well (after natlab):
node NIC MACs are 52:cc:cc:cc:NN:KK (node NN, NIC KK), router MACs 52:ee:ee:ee:ee:NN, and a
node's LAN IPv4 is the network's prefix with host part 100 + NN.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Callable

from .frames import mac_bytes
from .internet import TEST_DRIVER_IPV4, TEST_DRIVER_PORT, Internet
from .nat import NatType
from .router import Router
from .switch import Emit, Port
from .tcp import TcpConnection

__all__ = ["VNet", "NetworkConfig", "node_mac", "router_mac", "TEST_DRIVER_IPV4",
           "TEST_DRIVER_PORT"]

log = logging.getLogger("vmlab.vnet")


def node_mac(node_num: int, nic_num: int = 0) -> str:
    """MAC of NIC `nic_num` (0-based) of node `node_num` (1-based): 52:cc:cc:cc:NN:KK."""
    return f"52:cc:cc:cc:{node_num:02x}:{nic_num:02x}"


def router_mac(net_num: int) -> str:
    return f"52:ee:ee:ee:ee:{net_num:02x}"


@dataclass(frozen=True)
class NetworkConfig:
    name: str
    lan: IPv4Network
    wan_ip: IPv4Address
    nat: NatType
    num: int  # 1-based, for the router MAC

    @property
    def gateway(self) -> IPv4Address:
        return self.lan.network_address + 1


class VNet:
    def __init__(self, *, seed: int = 0,
                 on_event: Callable[[str, object], None] | None = None):
        self.internet = Internet()
        self.routers: dict[str, Router] = {}
        self.ports: dict[str, Port] = {}
        #: network name -> {mac: ip} for DHCP's deterministic answers
        self._addresses: dict[str, dict[bytes, IPv4Address]] = {}
        self._tcp_listeners: list[tuple[IPv4Address, int, Callable]] = []
        self._rng = random.Random(seed)
        self.on_event = on_event or (lambda kind, data: None)

    def add_network(self, cfg: NetworkConfig) -> Router:
        if cfg.name in self.routers:
            raise ValueError(f"network {cfg.name!r} added twice")
        table: dict[bytes, IPv4Address] = {}
        self._addresses[cfg.name] = table
        router = Router(name=cfg.name, mac=mac_bytes(router_mac(cfg.num)), lan=cfg.lan,
                        gateway=cfg.gateway, wan_ip=cfg.wan_ip, nat=cfg.nat,
                        internet=self.internet, address_for=table.get, dns=[cfg.gateway],
                        rng=random.Random(self._rng.getrandbits(64)), on_event=self.on_event)
        self.internet.add_router(router)
        self.routers[cfg.name] = router
        for ip, port, on_accept in self._tcp_listeners:
            router.tcp.listen(ip, port, self._accept_cb(router, on_accept))
        return router

    def add_port(self, name: str, network: str, mac: str, ip: IPv4Address) -> Port:
        """Plug a NIC with `mac` into `network`; DHCP will give it `ip`."""
        router = self.routers[network]
        if name in self.ports:
            raise ValueError(f"port {name!r} added twice")
        port = Port(name=name, mac=mac_bytes(mac), network=network)
        self._addresses[network][port.mac] = ip
        router.switch.attach(port)
        self.ports[name] = port
        return port

    def listen_tcp(self, ip: IPv4Address, port: int,
                   on_accept: Callable[[Router, TcpConnection], None], what: str) -> None:
        """Terminate TCP to ip:port in vnet itself, on every network's LAN side."""
        self.internet.add_vip(ip, what)
        self._tcp_listeners.append((ip, port, on_accept))
        for router in self.routers.values():
            router.tcp.listen(ip, port, self._accept_cb(router, on_accept))

    @staticmethod
    def _accept_cb(router: Router, on_accept):
        return lambda conn: on_accept(router, conn)

    # ------------------------------------------------------------------ the packet path

    def receive(self, port: Port, frame: bytes, now: float) -> list[Emit]:
        router = self.routers[port.network]
        return router.switch.from_port(port, frame, now)

    def tick(self, now: float) -> list[Emit]:
        out: list[Emit] = []
        for router in self.routers.values():
            out += router.flush_tcp(now)
        return out

    def next_deadline(self) -> float | None:
        deadlines = [d for r in self.routers.values() if (d := r.tcp.next_deadline()) is not None]
        return min(deadlines, default=None)

    def drops(self) -> dict[str, int]:
        """Every drop reason with its count, across switches, routers and the internet."""
        total: dict[str, int] = dict(self.internet.drops)
        for r in self.routers.values():
            for table in (r.drops, r.switch.drops):
                for reason, n in table.items():
                    total[f"{r.name}: {reason}"] = total.get(f"{r.name}: {reason}", 0) + n
        return total
